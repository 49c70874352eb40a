#!/usr/bin/env bash
# Records the golden fixtures tests/fixtures/slurm/VERSION/ from a running dev cluster: squeue,
# sinfo and `scontrol show nodes` JSON (and `scontrol show config`) for four jobs of alice's:
# a finished one, a held GPU job (--gres=gpu:a100:2), a running one, an array (0-3%2).
#   make cluster SLURM=24.11
#   bash contrib/devcluster/chroot.sh run 24.11 -- bash contrib/devcluster/record-fixtures.sh 24.11
# (22.05 has no `scontrol show nodes --json`: its scontrol_nodes.json holds what it printed.)
set -u
V=$1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
# shellcheck disable=SC1090
source ".devcluster-$V/env.sh"
OUT=tests/fixtures/slurm/$V
mkdir -p "$OUT"
sb() { runuser -u alice -- sbatch --parsable -o /dev/null --comment=project=vit-scaling,cost_center=CC1001 "$@"; }
fin=$(sb -t 5 --wrap true)
held=$(sb -t 60 --gres=gpu:a100:2 --hold --wrap 'sleep 300')
run=$(sb -t 10 --gres=gpu:h100:1 --wrap 'sleep 300')
arr=$(sb -t 7 --array=0-3%2 --gres=gpu:a100:1 --wrap 'sleep 300')
sleep 10
echo "{\"finished\": $fin, \"held\": $held, \"running\": $run, \"array\": ${arr%%;*}}" > $OUT/jobs.json
SLURM_BITSTR_LEN=0 squeue --all --states=all --json > $OUT/squeue.json
sinfo --all --json > $OUT/sinfo.json
scontrol show nodes --json > $OUT/scontrol_nodes.json 2>$OUT/scontrol_nodes.err || true
scontrol show config > $OUT/scontrol_show_config.txt
sinfo --version > $OUT/version.txt; scontrol --version >> $OUT/version.txt
squeue --help 2>&1 | grep -i json >> $OUT/version.txt
scancel $held $run ${arr%%;*}
rm -f $OUT/scontrol_nodes.err
cat $OUT/jobs.json
