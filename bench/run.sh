#!/usr/bin/env bash
# The benchmark: ./dev bench (after ./dev build). For containers holding
# BENCH_SIZES MiB of touched memory (default 1 and 4 GiB; half random, half
# compressible), measures in one run the checkpoint and restore time of this
# project, of plain CRIU, and of the raw storage bound (dd of the same bytes
# to the same target), BENCH_REPS times after a warm-up, and writes
# bench/results/RESULTS.md (min/median/max and ratios) and bench/results/plot.png.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
DC="$HERE/../cluster/devcluster"
# 8 GiB needs a target with room for two 8 GiB images beside the container
# (BENCH_TARGET=/shared on this 24 GiB machine).
SIZES=${BENCH_SIZES:-"1024 4096"}
REPS=${BENCH_REPS:-3}
TARGET=${BENCH_TARGET:-/dev/shm}
OUT="$HERE/results"
mkdir -p "$OUT"
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install --quiet matplotlib
raw="$OUT/raw.txt"
: > "$raw"
"$DC" up
for size in $SIZES; do
  echo "bench: $size MiB, $REPS repetitions after a warm-up, images in $TARGET on node1" >&2
  "$DC" exec node1 -- bash -s "$size" "$REPS" "$TARGET" < "$HERE/node-bench.sh" | tee -a "$raw"
done
python3 "$HERE/report.py" "$raw" "$OUT" "$(uname -r), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, images in $TARGET"
