#!/bin/bash
# `make demo`: a sample workload on the local dev cluster, then the admin TUI.
# Expects the cluster to be up (make demo starts it) and its env sourced.
set -uo pipefail

SG=${SLURMGATE:-slurmgate}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d /tmp/slurmgate-demo.XXXXXX)
chmod 1777 "$WORK"
cd "$WORK" || exit 1

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
as() { local user=$1; shift; runuser -u "$user" -- "$@"; }

say "A researcher forgets the tags: slurmgate rejects the job and says how to fix it"
as alice sbatch -t 10 --gres=gpu:1 --wrap 'nvidia-smi || true' || true

say "The same job with tags: accepted, with its worst-case cost and the team's budget"
as alice sbatch -t 10 --gres=gpu:a100:2 -J vit-probe -o /dev/null \
    --comment project=vit-scaling,cost_center=CC1001 --wrap 'sleep 20'

say "A dry run first: slurmgate estimate reads the same options sbatch would"
as bob "$SG" --config "$SLURMGATE_CONFIG" estimate -t 2-00:00:00 -N 2 --gres=gpu:4 \
    --comment project=llm-pretrain,cost_center=CC2002 --wrap true || true

say "A two-node job for team nlp, and a checkpointing training job for team vision"
as bob sbatch -t 10 -N 2 --gres=gpu:2 -J llm-2node -o /dev/null \
    --comment project=llm-pretrain,cost_center=CC2002 --wrap 'sleep 15'
as alice sbatch -J demo-train -o "$WORK/demo-train.out" \
    --export=ALL,SLURMGATE=/opt/slurmgate/venv/bin/slurmgate,TOTAL_STEPS=30 \
    "$HERE/train_bash.sbatch"
as bob sbatch -t 5 -p scavenger --gres=gpu:h100:1 -J scavenger-sweep -o /dev/null \
    --comment project=llm-eval,cost_center=CC2002 --wrap 'sleep 30'

say "The queue as Slurm sees it"
squeue -o '%.6i %.10P %.16j %.8u %.2t %.10M %.6D %R'

say "Budgets (slurmgate quota)"
"$SG" quota

echo
echo "Job output lands in $WORK. Next: the admin TUI (keys: 1-5 views, ? help, q quit)."
if [ -t 0 ] && [ -t 1 ]; then
    read -r -t 15 -p "Press Enter to open it (or wait 15 s)... " _ || true
    exec "$SG" tui
else
    open_tui="source ${DEVCLUSTER_DIR:-.devcluster}/env.sh && slurmgate tui"
    if [ -n "${SLURMGATE_CHROOT:-}" ]; then   # make demo SLURM=<version>: the TUI runs in there
        open_tui="bash contrib/devcluster/chroot.sh run $SLURMGATE_CHROOT -- bash -c '$open_tui'"
    fi
    echo "(no terminal: run \`$open_tui\` yourself)"
fi
