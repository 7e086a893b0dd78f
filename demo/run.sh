#!/usr/bin/env bash
# The main job, shown on the running dev cluster (./dev demo starts it):
# a user runs Apptainer containers with --checkpoint-container through srun
# and sbatch, on both compute nodes; then a LAMMPS job is preempted on node1,
# finishes on node2, and its output is compared with an uninterrupted run's.
# Exits 1, saying why, when the comparison fails.
set -euo pipefail
DC="$(dirname "$0")/../cluster/devcluster"
SIF=/shared/images/test.sif

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
as_alice() { "$DC" exec node1 --user alice -- bash -c "$1"; }

step "srun --checkpoint-container on each node, two tasks (alice, unprivileged Apptainer)"
for node in node1 node2; do
  as_alice "srun --checkpoint-container -w $node -n2 apptainer -s exec $SIF \
    sh -c 'echo \"rank \$SLURM_PROCID: container on \$(hostname), \$(. /etc/os-release; echo \$PRETTY_NAME)\"'"
done

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

step "preemption: alice's LAMMPS job is checkpointed on node1 and finishes on node2"
# A real application: Debian's LAMMPS (linked with Open MPI) in the
# application SIF (cluster/apps.sh, built once: a few minutes the first time).
"$DC" apps
APPS=/shared/images/apps.sif
dir=/shared/demo-lammps-$$
"$DC" exec node1 -- install -d -o alice -g alice "$dir" "$dir/ref"
# The package's Lennard-Jones melt, scaled to 6912 atoms and 3000 steps.
as_alice "cd $dir && srun --checkpoint-container apptainer -s exec $APPS cat /opt/apps/in.melt 2>/dev/null |
  sed -e 's/^region .*/region box block 0 12 0 12 0 12/' -e 's/^thermo .*/thermo 100\nthermo_modify flush yes/' \
      -e 's/^run .*/run 3000/' > in.melt && cp in.melt ref/"
lammps_job() {  # lammps_job DIR NODE: a protected LAMMPS job in DIR on NODE
  as_alice "cd $1 && cat > lammps.sh <<'EOS'
#!/bin/bash
#SBATCH --checkpoint-container
#SBATCH -o job.out
#SBATCH --open-mode=append
#SBATCH -c 2
echo \"run \${SLURM_RESTART_COUNT:-0} on \$(hostname)\"
srun apptainer -s exec $APPS lmp -in in.melt -log log.lammps
EOS
sbatch --parsable -p low -w $2 lammps.sh"
}
state() { "$DC" exec ctl -- scontrol -o show job "$1" | grep -o 'JobState=[A-Z]*' | cut -d= -f2; }
# Thermo rows (Step Temp E_pair E_mol TotEng Press) of a LAMMPS output.
shared=$("$DC" paths | awk '$1 == "shared" { print $2 }')
thermo() { awk 'NF == 6 && $1 ~ /^[0-9]+$/ && $2 ~ /^[-0-9.e]+$/' "$shared${1#/shared}" 2>/dev/null || true; }
job=$(lammps_job "$dir" node1)
ref=$(lammps_job "$dir/ref" node2)
echo "alice's job $job runs LAMMPS on node1; job $ref runs the same input, uninterrupted, on node2"
until [[ $(thermo "$dir/log.lammps" | wc -l) -ge 10 ]]; do sleep 0.5; done
echo "job $job is at step $(thermo "$dir/log.lammps" | tail -n 1 | awk '{print $1}'); bob submits to the high partition:"
"$DC" exec node1 --user bob -- sbatch -p high -w node1 -c 2 --wrap "sleep 5"
until [[ $(state "$job") == PENDING ]]; do sleep 0.5; done
echo "job $job was preempted and requeued; once node2 is free it goes there, without the usual requeue delay"
until [[ $(state "$ref") =~ COMPLETED|FAILED|CANCELLED ]]; do sleep 0.5; done
"$DC" exec ctl -- scontrol update jobid="$job" NodeList=node2
"$DC" exec ctl -- scontrol update jobid="$job" StartTime=now
until [[ $(state "$job") =~ COMPLETED|FAILED|CANCELLED ]]; do sleep 0.5; done
echo "--- job $job: $(state "$job"); what it said:"
"$DC" exec node1 -- grep -E '^run |checkpoint-container' "$dir/job.out"
echo "--- thermo output (Step Temp E_pair E_mol TotEng Press), last rows of the preempted and restored run:"
thermo "$dir/job.out" | tail -n 3
echo "--- and of the uninterrupted run:"
thermo "$dir/ref/job.out" | tail -n 3
steps=$(thermo "$dir/job.out" | awk '{print $1}')
echo "--- thermo rows written: $(wc -l <<<"$steps") (uninterrupted: $(thermo "$dir/ref/job.out" | wc -l), one per 100 steps)"
if ! grep -q 'checkpoint-container: restored process' "$shared${dir#/shared}/job.out"; then
  echo "DEMO FAILED: job $job was not restored on node2; it started over (the reason is in the lines above)" >&2
  exit 1
elif [[ $(sort -n <<<"$steps" | uniq -d) || $(thermo "$dir/job.out") != "$(thermo "$dir/ref/job.out")" ]]; then
  echo "DEMO FAILED: the restored run's thermo output differs from the uninterrupted run's" >&2
  exit 1
fi
echo "--- identical: all $(wc -l <<<"$steps") thermo rows, each step once, to the last digit"

step "the cluster stays up: try it yourself"
cat <<MSG
  cluster/devcluster exec node1 --user alice -- srun --checkpoint-container apptainer exec $SIF hostname
  cluster/devcluster status
  cluster/devcluster down
MSG
