#!/usr/bin/env bash
# Runs inside a dev-cluster node as root (bench/run.sh puts it there): for one
# container size, measures side by side, on the same container and the same
# storage target,
#   raw    writing / reading the image's number of bytes with dd (the bound),
#   plain  `criu dump` / `criu restore` from the command line, with the same
#          way of running CRIU the engine uses (as the user, in the
#          container's mount namespace, two capabilities),
#   ours   `checkpoint-container checkpoint` / `restore`.
# Prints one line per measurement: SIZE_MIB OP KIND SECONDS.
set -euo pipefail
SIZE_MIB=$1 REPS=$2 TARGET=$3
HELPER=/opt/checkpoint-container/bin/checkpoint-container
WORKLOAD=/opt/checkpoint-container/bin/ckpt-workload
SIF=/shared/images/test.sif
dir=/shared/bench-$$
CMD=(apptainer -s exec --security uid:2001,gid:2001 --bind /opt/checkpoint-container --bind "$dir:/data" "$SIF"
     "$WORKLOAD" --mem-mib "$SIZE_MIB" --steps 1000000000 --interval-ms 200 --out /data/out.txt)
now() { date +%s.%N; }
elapsed() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.4f", a - b }'; }
report() { printf '%s %s %s %.3f\n' "$SIZE_MIB" "$1" "$2" "$3"; }

start_container() {
  rm -f "$dir/out.txt"
  setsid -f "${CMD[@]}" < /dev/null > /dev/null 2>&1
  until [[ -s $dir/out.txt ]]; do sleep 0.2; done
  pid=$(pgrep -u alice -o -f "^$WORKLOAD --mem-mib $SIZE_MIB ")
}
# Ends every process of the bench user and waits until they are gone (exiting
# ones too: their pids are not free yet).

stop_container() { while pgrep -u alice > /dev/null; do pkill -KILL -u alice || true; sleep 0.1; done; }

# CRIU exactly as the engine starts it, for the plain measurements.
criu_as_user() {
  local ns_pid=$1; shift
  local root=/proc/$$/root caps=+checkpoint_restore,+sys_ptrace,+dac_read_search
  nsenter -t "$ns_pid" -m -- setpriv --reuid 2001 --regid 2001 --clear-groups --inh-caps "$caps" --ambient-caps "$caps" -- \
    "$root/lib64/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" \
    "$root/usr/sbin/criu" "$@"
}

# Each sets t to its start time.
dump_ours() {  # OURS_OPTIONS: site options (--compression zstd, --staging-dir DIR)
  t=$(now)
  "$HELPER" $OURS_OPTIONS checkpoint --pid "$pid" --images "$TARGET/bench-ours" --leave-running -- "${CMD[@]}" 2>/dev/null
}
dump_plain() {
  install -d -o alice "$TARGET/bench-plain"
  t=$(now)
  criu_as_user "$pid" dump --unprivileged --shell-job --manage-cgroups=ignore --leave-running -t "$pid" \
    -D "$TARGET/bench-plain" -o dump.log > /dev/null 2>&1
}

install -d -o alice -g alice "$dir"
mkdir -p "$TARGET"
trap 'stop_container; rm -rf "$dir" "$TARGET"/bench-*' EXIT
start_container
for rep in $(seq 0 "$REPS"); do   # rep 0 warms memory and caches up
  out=()
  rm -rf "$TARGET/bench-ours" "$TARGET/bench-plain"
  # the raw bound first, on an empty target: the bytes of the last image
  # (the container's size before the first image exists), written and made
  # durable, then read back
  bytes=${bytes:-$((SIZE_MIB * 1048576))}
  t=$(now); dd if=/dev/zero of="$TARGET/bench-raw" bs=16M count=$((bytes / 16777216)) conv=fsync status=none
  out+=("dump raw $(elapsed "$t")")
  t=$(now); dd if="$TARGET/bench-raw" of=/dev/null bs=16M status=none
  out+=("restore raw $(elapsed "$t")")
  rm -f "$TARGET/bench-raw"
  # ours, then plain CRIU, each alone on the target (no memory pressure
  # from the other's images)
  dump_ours
  out+=("dump ours $(elapsed "$t")")
  bytes=$(du -sb "$TARGET/bench-ours" | cut -f1)
  rm -rf "$TARGET/bench-ours"
  dump_plain
  out+=("dump plain $(elapsed "$t")")
  rm -rf "$TARGET/bench-plain"
  ((rep > 0)) && for o in "${out[@]}"; do report $o; done
done
# One image of each kind for the restores.
dump_ours
dump_plain
# Restores need the pids free: the container goes, and comes back each time.
stop_container
for rep in $(seq 0 "$REPS"); do
  # ours: until the tree runs again
  rm -f "$dir/status"; mkfifo "$dir/status"
  t=$(now)
  "$HELPER" restore --images "$TARGET/bench-ours" --status-fd 3 3> "$dir/status" > /dev/null 2>> "$dir/restore.err" &
  read -r _ < "$dir/status" || { echo "bench: our restore failed: $(cat "$dir/restore.err")" >&2; exit 1; }
  d_ours=$(elapsed "$t")
  stop_container
  wait
  # plain CRIU, into a container started the same way beforehand
  setsid -f "${CMD[@]:0:10}" /bin/sh -c 'sleep 1000000' < /dev/null > /dev/null 2>&1
  until ph=$(pgrep -n -u alice -x sleep); do sleep 0.1; done
  t=$(now); criu_as_user "$ph" restore --unprivileged --shell-job --manage-cgroups=ignore -d -D "$TARGET/bench-plain" \
    -o restore.log > /dev/null 2>&1 || true
  d_plain=$(elapsed "$t")
  stop_container
  if ((rep > 0)); then report restore ours "$d_ours"; report restore plain "$d_plain"; fi
done
