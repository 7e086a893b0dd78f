#!/usr/bin/env bash
# Runs inside the dev cluster's node1 as root (bench/run.sh puts it there,
# with checkpoint_interval_min lowered): periodic checkpoints of one
# container size. alice's --checkpoint-container job asks for one every
# INTERVAL seconds; after a warm-up checkpoint, REPS of them are read from
# this node's agent log. Prints "SIZE_MIB frozen periodic S" (how long the
# tree was stopped) and "SIZE_MIB dump periodic S" (until the checkpoint was
# in checkpoint_dir; the tree runs again after the frozen part).
set -euo pipefail
SIZE_MIB=$1 REPS=$2 INTERVAL=${3:-10}
SIF=/shared/images/test.sif
WORKLOAD=/opt/checkpoint-container/bin/ckpt-workload
LOG=/var/log/slurm/checkpoint-container.log
dir=/shared/bench-periodic-$$
install -d -o alice -g alice "$dir"
cat > "$dir/job.sh" <<EOS
#!/bin/bash
#SBATCH --checkpoint-container
#SBATCH -o $dir/job.out
export CHECKPOINT_CONTAINER_INTERVAL=$INTERVAL
srun apptainer -s exec --bind /opt/checkpoint-container --bind $dir:/data $SIF $WORKLOAD --mem-mib $SIZE_MIB --steps 1000000000 --interval-ms 20 --out /data/out.txt
EOS
trap 'scancel "$job" 2>/dev/null; rm -rf "$dir"' EXIT
job=$(cd "$dir" && runuser -u alice -- sbatch --parsable -c 2 -w node1 job.sh)
taken() { grep -c "of step $job.0: periodic checkpoint (" "$LOG" || true; }
n=0
until (($(taken) > REPS)); do
  sleep 1
  ((++n < 60 + (REPS + 1) * (INTERVAL + 30))) || { echo "bench: periodic checkpoints did not come: $(tail -n 3 "$dir/job.out")" >&2; exit 1; }
done
grep "of step $job.0: periodic checkpoint (" "$LOG" | tail -n "$REPS" |
  sed -E 's/.*tree stopped ([0-9.]+) s, in place ([0-9.]+) s later.*/\1 \2/' |
  while read -r frozen commit; do
    echo "$SIZE_MIB frozen periodic $frozen"
    echo "$SIZE_MIB dump periodic $(awk -v a="$frozen" -v b="$commit" 'BEGIN { printf "%.4f", a + b }')"
  done
