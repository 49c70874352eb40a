#!/bin/bash
# Submission throughput: N sbatch submissions with slurmgate enforcing vs the same cluster with
# JobSubmitPlugins unset, alternated in the same run (this machine is shared and noisy: the
# ratio is the number to read). Jobs are submitted held (--hold) and cancelled after each
# round, so only the submit path is measured. Needs the dev cluster up (make cluster) and
# exclusive use of it while it runs; it restores slurm.conf at the end.
#
#   bash bench/bench_submit.sh [N=500] [ROUNDS=2]
set -euo pipefail
N=${1:-500}
ROUNDS=${2:-2}
DIR=${DEVCLUSTER_DIR:-$(cd "$(dirname "$0")/.." && pwd)/.devcluster}
source "$DIR/env.sh"
CONF="$DIR/etc/slurm.conf"
cp "$CONF" "$CONF.bench-orig"
restore() { cp "$CONF.bench-orig" "$CONF"; rm -f "$CONF.bench-orig"; scontrol reconfigure; }
trap restore EXIT

set_plugin() {  # on | off
    if [ "$1" = on ]; then cp "$CONF.bench-orig" "$CONF"
    else grep -v '^JobSubmitPlugins=' "$CONF.bench-orig" > "$CONF"; fi
    scontrol reconfigure
    # wait until the controller answers again after the reconfigure
    for _ in $(seq 1 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
}

submit_n() {  # prints seconds for N submissions as alice
    runuser -u alice -- bash -c '
        cd /tmp; start=$(date +%s.%N)
        for i in $(seq 1 '"$N"'); do
            sbatch --hold -t 10 --gres=gpu:1 -o /dev/null -J bench \
              --comment project=vit-scaling,cost_center=CC1001 --wrap true >/dev/null || exit 1
        done
        end=$(date +%s.%N); python3 -c "print($end - $start)"'
    scancel -u alice -n bench
    settle
}

settle() {  # let the cancellations' jobcomp hooks and their ingest finish before timing more
    local quiet=0
    for _ in $(seq 1 600); do
        if [ -z "$(squeue -h -u alice -n bench -o %i)" ] && ! pgrep -f "hook jobcomp" >/dev/null \
            && [ -z "$(find "$DIR/spool" -maxdepth 1 -name '*.json' -print -quit)" ]; then
            quiet=$((quiet + 1)); [ "$quiet" -ge 5 ] && return 0
        else quiet=0; fi
        sleep 0.2
    done
}

declare -a vanilla enforced
settle
for r in $(seq 1 "$ROUNDS"); do
    set_plugin off; vanilla+=("$(submit_n)")
    set_plugin on;  enforced+=("$(submit_n)")
done
python3 - "$N" "${vanilla[*]}" "${enforced[*]}" <<'PY'
import statistics, sys
n = int(sys.argv[1]); v = [float(x) for x in sys.argv[2].split()]; e = [float(x) for x in sys.argv[3].split()]
mv, me = statistics.median(v), statistics.median(e)
print(f"submissions per round: {n}; rounds: {len(v)}")
print("vanilla  (JobSubmitPlugins unset): " + ", ".join(f"{x:.2f}s" for x in v)
      + f"  -> {n / mv:.1f} jobs/s (median)")
print("slurmgate (job_submit/lua + daemon): " + ", ".join(f"{x:.2f}s" for x in e)
      + f"  -> {n / me:.1f} jobs/s (median)")
print(f"throughput ratio slurmgate / vanilla: {mv / me:.3f} (medians), "
      f"{min(v) / min(e):.3f} (fastest rounds: the least disturbed by other load)")
PY
