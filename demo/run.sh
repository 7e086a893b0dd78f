#!/usr/bin/env bash
# The main job, shown on the running dev cluster (./dev demo starts it):
# a user runs Apptainer containers with --checkpoint-container through srun
# and sbatch, on both compute nodes.
set -euo pipefail
DC="$(dirname "$0")/../cluster/devcluster"
SIF=/shared/images/test.sif

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
as_alice() { "$DC" exec node1 --user alice -- bash -c "$1"; }

step "srun --checkpoint-container on both nodes (alice, unprivileged Apptainer)"
as_alice "srun --checkpoint-container -N2 -n2 --ntasks-per-node=1 apptainer -s exec $SIF \
  sh -c 'echo \"rank \$SLURM_PROCID: container on \$(hostname), \$(. /etc/os-release; echo \$PRETTY_NAME)\"'"

step "sbatch with '#SBATCH --checkpoint-container', one job per node"
jobs=()
for node in node1 node2; do
  jobs+=("$(as_alice "cat > demo-job.sh <<'EOS'
#!/bin/bash
#SBATCH --checkpoint-container
#SBATCH -o demo-%j.out
echo \"batch step on \$(hostname)\"
srun apptainer -s exec $SIF sh -c 'echo \"container step on \$(hostname)\"'
EOS
sbatch --parsable -w $node demo-job.sh")")
done
for job in "${jobs[@]}"; do
  until [[ $("$DC" exec ctl -- scontrol -o show job "$job" | grep -o 'JobState=[A-Z]*') =~ COMPLETED|FAILED|CANCELLED ]]; do
    sleep 0.5
  done
  echo "--- job $job: $("$DC" exec ctl -- scontrol -o show job "$job" | grep -o 'JobState=[A-Z]*')"
  as_alice "cat demo-$job.out"
done

step "the cluster stays up: try it yourself"
cat <<MSG
  cluster/devcluster exec node1 --user alice -- srun --checkpoint-container apptainer exec $SIF hostname
  cluster/devcluster status
  cluster/devcluster down
MSG
