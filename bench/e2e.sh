#!/usr/bin/env bash
# Runs inside the dev cluster's ctl node as root (bench/run.sh puts it there):
# the end-to-end downtime of preempt -> requeue -> restore in Slurm, for one
# container size. alice's --checkpoint-container job (partition low) runs the
# workload; bob's job (partition high) preempts it; the requeued job is let
# run again at once, on the other node, where it restores. KIND names the
# site configuration bench/run.sh set up. Prints, per cycle,
# "SIZE_MIB e2e-cycle KIND JOB T0 T1 T2 T3" (epoch seconds):
#   T0  bob submits             T2  alice's job runs again (released at T1)
#   T1  alice's job is pending  T3  the program prints its next step
# bench/run.sh adds when slurmd sent the SIGTERM (from the nodes' logs) and
# report.py splits each cycle into Slurm's part and ours.
set -euo pipefail
SIZE_MIB=$1 REPS=$2 KIND=${3:-ours}
SIF=/shared/images/test.sif
WORKLOAD=/opt/checkpoint-container/bin/ckpt-workload
dir=/shared/bench-e2e-$$
install -d -o alice -g alice "$dir"
cat > "$dir/job.sh" <<EOF
#!/bin/bash
#SBATCH --checkpoint-container
#SBATCH -o $dir/job.out
#SBATCH --open-mode=append
srun apptainer -s exec --bind /opt/checkpoint-container --bind $dir:/data $SIF $WORKLOAD --mem-mib $SIZE_MIB --steps 1000000000 --interval-ms 20 --out /data/out.txt
EOF
now() { date +%s.%N; }
state() { squeue -h -j "$job" -o %T 2>/dev/null || true; }
lines() { if [[ -f $dir/out.txt ]]; then wc -l < "$dir/out.txt"; else echo 0; fi; }
# until COMMAND...: polls every 10 ms, for at most 10 minutes.
until_() { local n=0; until "$@"; do sleep 0.01; ((++n < 60000)) || { echo "bench: timed out waiting for: $*" >&2; exit 1; }; done; }
is() { [[ $(state) == "$1" ]]; }
grew() { (($(lines) > $1)); }

trap 'scancel "$job" 2>/dev/null; squeue -h -u bob -o %i | xargs -r scancel; rm -rf "$dir"' EXIT
job=$(cd "$dir" && runuser -u alice -- sbatch --parsable -p low -c 2 -w node1 job.sh)
node=node1 other=node2
until_ is RUNNING
until_ grew 2
for rep in $(seq 0 "$REPS"); do
  until_ grew "$(lines)"
  t0=$(now)
  runuser -u bob -- sbatch --parsable -p high -c 2 -w "$node" -o /dev/null --wrap "sleep 1" > /dev/null
  until_ is PENDING
  t1=$(now); saved=$(lines)
  scontrol update jobid="$job" NodeList="$other" StartTime=now
  until_ is RUNNING
  t2=$(now)
  until_ grew "$saved"
  t3=$(now)
  ((rep > 0)) && echo "$SIZE_MIB e2e-cycle $KIND $job $t0 $t1 $t2 $t3"
  read -r node other <<< "$other $node"
done
# The restored run went on from its saved counter: one line per step, in order.
awk -F'[ =]' '$1 == "counter" && $2 != NR { print "bench: step " NR " is " $2 > "/dev/stderr"; bad = 1 } END { exit bad }' "$dir/out.txt"
