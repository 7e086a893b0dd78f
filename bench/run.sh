#!/usr/bin/env bash
# The benchmark: ./dev bench (after ./dev build). For containers holding
# BENCH_SIZES MiB of touched memory (default 1, 4 and 8 GiB; half random,
# half compressible), measures in one run, BENCH_REPS times after a warm-up:
# checkpoint and restore of this project (as configured by default, with
# zstd, with tmpfs staging), of plain CRIU and of the raw storage bound (dd
# of the same bytes to the same target), image sizes, and the end-to-end
# downtime of preempt -> requeue -> restore in Slurm; and periodic
# checkpoints of a running job (bench/periodic.sh: how long its tree is
# stopped, against plain CRIU's --leave-running dump). Writes
# bench/results/RESULTS.md and bench/results/plot.png.
#
# BENCH_TARGET is where images go, on node1: /shared (default, a disk, as a
# shared filesystem would be) or /dev/shm (memory: the fastest bound).
# BENCH_PARTS=periodic measures only the periodic part and, beside it, the
# --leave-running dumps of plain CRIU and of the CLI (no restore, no
# end-to-end cycle).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DC="$HERE/../cluster/devcluster"
SIZES=${BENCH_SIZES:-"1024 4096 8192"}
REPS=${BENCH_REPS:-3}
TARGET=${BENCH_TARGET:-/shared}
PARTS=${BENCH_PARTS:-all}
OUT="$HERE/results"
mkdir -p "$OUT"
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet matplotlib
raw="$OUT/raw.txt"
: > "$raw"
"$DC" up
plugstack="$("$DC" paths | awk '$1 == "etc" { print $2 }')/plugstack.conf"
trap '[[ -f $OUT/plugstack.conf.orig ]] && cp "$OUT/plugstack.conf.orig" "$plugstack"; rm -f "$OUT/plugstack.conf.orig"' EXIT
for size in $SIZES; do
  echo "bench: $size MiB, $REPS repetitions after a warm-up, images in $TARGET on node1" >&2
  "$DC" exec node1 -- env PARTS="$PARTS" bash -s "$size" "$REPS" "$TARGET/bench-images" < "$HERE/node-bench.sh" | tee -a "$raw"
  for kind in ours ours-staged; do
    [[ $PARTS == periodic ]] && break
    echo "bench: $size MiB, preempt -> requeue -> restore in Slurm ($kind)" >&2
    if [[ $kind == ours-staged ]]; then
      # Every node's /etc/slurm is this directory; each node has its own /dev/shm.
      cp "$plugstack" "$OUT/plugstack.conf.orig"
      sed -i '/spank_checkpoint_container/ s|$| staging_dir=/dev/shm/ckpt-staging|' "$plugstack"
      for node in node1 node2; do "$DC" exec "$node" -- mkdir -p /dev/shm/ckpt-staging; done
    fi
    "$DC" exec ctl -- bash -s "$size" "$REPS" "$kind" < "$HERE/e2e.sh" | tee -a "$raw"
    [[ $kind == ours-staged ]] && cp "$OUT/plugstack.conf.orig" "$plugstack"
  done
  echo "bench: $size MiB, periodic checkpoints of a running job" >&2
  cp "$plugstack" "$OUT/plugstack.conf.orig"
  sed -i '/spank_checkpoint_container/ s|$| checkpoint_interval_min=5|' "$plugstack"
  "$DC" exec node1 -- bash -s "$size" "$REPS" < "$HERE/periodic.sh" | tee -a "$raw"
  cp "$OUT/plugstack.conf.orig" "$plugstack"
done
# When slurmd sent each preempted step its SIGTERM (the nodes' logs, ms).
for job in $(awk '$2 == "e2e-cycle" { print $4 }' "$raw" | sort -u); do
  for node in node1 node2; do
    "$DC" exec "$node" -- grep -h "Sent signal 15 to StepId=$job.0\$" /var/log/slurm/slurmd.log || true
  done | sed 's/^\[\([^]]*\)\].*/\1/' | while read -r stamp; do
    echo "0 e2e-signal $job $(date -d "$stamp" +%s.%N)"
  done >> "$raw"
done
python3 "$HERE/report.py" "$raw" "$OUT" \
  "$(uname -r), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); images in $TARGET"
