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
as_alice "rm -f demo-*.out"
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

step "preemption: alice's job is checkpointed, requeued, and restored on the other node"
dir=/shared/demo-$$
"$DC" exec node1 -- install -d -o alice -g alice "$dir"
WL="/opt/checkpoint-container/bin/ckpt-workload --mem-mib 256 --steps 100 --interval-ms 100"
job=$(as_alice "cat > demo-preempt.sh <<'EOS'
#!/bin/bash
#SBATCH --checkpoint-container
#SBATCH -o $dir/job.out
#SBATCH --open-mode=append
#SBATCH -c 2
echo \"run \${SLURM_RESTART_COUNT:-0} on \$(hostname)\"
srun apptainer -s exec --bind /opt/checkpoint-container --bind $dir:/data $SIF $WL --out /data/out.txt
EOS
sbatch --parsable -p low -w node1 demo-preempt.sh")
state() { "$DC" exec ctl -- scontrol -o show job "$1" | grep -o 'JobState=[A-Z]*' | cut -d= -f2; }
steps_done() { "$DC" exec node1 -- sh -c "cat $dir/out.txt 2>/dev/null | wc -l"; }
until [[ $(steps_done) -ge 20 ]]; do sleep 0.5; done
echo "alice's job $job is at step $(steps_done); bob submits to the high partition:"
"$DC" exec node1 --user bob -- sbatch -p high -w node1 -c 2 --wrap "sleep 5"
until [[ $(state "$job") == PENDING ]]; do sleep 0.5; done
echo "job $job was preempted and requeued; sending it to node2 without the usual requeue delay"
"$DC" exec ctl -- scontrol update jobid="$job" NodeList=node2
"$DC" exec ctl -- scontrol update jobid="$job" StartTime=now
until [[ $(state "$job") =~ COMPLETED|FAILED|CANCELLED ]]; do sleep 0.5; done
echo "--- job $job: $(state "$job"); its output:"
"$DC" exec node1 -- grep -v '^counter=' "$dir/job.out"
echo "--- steps written: $("$DC" exec node1 -- grep -c '^counter=' "$dir/out.txt") (each exactly once)"
echo "--- last line:      $("$DC" exec node1 -- tail -n 1 "$dir/out.txt")"
echo "--- uninterrupted:  $("$DC" exec node1 -- $WL --expect)"

step "the cluster stays up: try it yourself"
cat <<MSG
  cluster/devcluster exec node1 --user alice -- srun --checkpoint-container apptainer exec $SIF hostname
  cluster/devcluster status
  cluster/devcluster down
MSG
