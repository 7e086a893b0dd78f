#!/usr/bin/env bash
# Runs inside a dev-cluster node as root (bench/run.sh puts it there): for one
# container size, measures side by side, on the same container and the same
# storage target TARGET,
#   raw         writing (made durable) / reading back with dd as many bytes
#               as plain CRIU's image holds: the storage bound;
#   plain       `criu dump` + sync / start an empty container + `criu restore`
#               into it (CRIU alone cannot re-create Apptainer's mounts), with
#               the engine's way of running CRIU (as the user, in the
#               container's mount namespace, two capabilities);
#   ours        `checkpoint-container checkpoint` / `restore` (images streamed
#               straight to TARGET);
#   ours-zstd   the same with compression = "zstd";
#   ours-staged the same with staging_dir = STAGING (node-local tmpfs), when
#               TARGET is not itself tmpfs.
# Every image is alone on the target when it is written (no memory pressure
# from another). With PARTS=periodic (env): only plain and ours, dumps only. Prints one line per measurement: SIZE_MIB OP KIND SECONDS,
# and SIZE_MIB size KIND BYTES for image sizes.
set -euo pipefail
SIZE_MIB=$1 REPS=$2 TARGET=$3 STAGING=${4:-/dev/shm/ckpt-staging}
HELPER=/usr/libexec/checkpoint-container/checkpoint-container
WORKLOAD=/opt/checkpoint-container/bin/ckpt-workload
SIF=/shared/images/test.sif
dir=/shared/bench-$$
CMD=(apptainer -s exec --security uid:2001,gid:2001 --bind /opt/checkpoint-container --bind "$dir:/data" "$SIF"
     "$WORKLOAD" --mem-mib "$SIZE_MIB" --steps 1000000000 --interval-ms 200 --out /data/out.txt)
now() { date +%s.%N; }
elapsed() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.4f", a - b }'; }
report() { printf '%s %s %s %s\n' "$SIZE_MIB" "$1" "$2" "$3"; }

start_container() {
  rm -f "$dir/out.txt"
  setsid -f "${CMD[@]}" < /dev/null > /dev/null 2>&1
  until [[ -s $dir/out.txt ]]; do sleep 0.2; done
  pid=$(pgrep -u alice -o -f "^$WORKLOAD --mem-mib $SIZE_MIB ")
}
# Ends every process of the bench user and waits until they are gone (exiting
# ones too: their pids are not free yet).
stop_container() { while pgrep -u alice > /dev/null; do pkill -KILL -u alice || true; sleep 0.1; done; }

# CRIU exactly as the engine starts it, for the plain measurements. Paths are
# given through /proc/$$/root: CRIU runs in the container's mount namespace.
criu_as_user() {
  local ns_pid=$1; shift
  local root=/proc/$$/root caps=+checkpoint_restore,+sys_ptrace
  nsenter -t "$ns_pid" -m -- setpriv --reuid 2001 --regid 2001 --clear-groups --inh-caps "$caps" --ambient-caps "$caps" -- \
    "$root/lib64/ld-linux-x86-64.so.2" --library-path "$root/usr/lib/x86_64-linux-gnu:$root/lib/x86_64-linux-gnu" \
    "$root/usr/sbin/criu" "$@"
}

options_of() {
  case $1 in
    ours) ;;
    ours-zstd) echo --compression zstd ;;
    ours-staged) echo --staging-dir "$STAGING" ;;
  esac
}

# dump KIND [--leave-running]: one checkpoint into $TARGET/bench-KIND; sets t
# to its start.
dump() {
  local kind=$1; shift
  rm -rf "${TARGET:?}/bench-$kind"
  if [[ $kind == plain ]]; then
    install -d -o alice "$TARGET/bench-plain"
    t=$(now)
    criu_as_user "$pid" dump --unprivileged --shell-job --manage-cgroups=ignore "$@" -t "$pid" \
      -D "/proc/$$/root$TARGET/bench-plain" -o dump.log > /dev/null 2>&1
    frozen=$(elapsed "$t")
    sync "$TARGET/bench-plain"/*
  else
    # shellcheck disable=SC2046
    t=$(now); "$HELPER" $(options_of "$kind") checkpoint --pid "$pid" --images "$TARGET/bench-$kind" "$@" -- "${CMD[@]}" 2>/dev/null
  fi
}

# restore KIND: until the tree runs again; the container is gone afterwards.
restore() {
  local kind=$1
  if [[ $kind == plain ]]; then
    # As the engine does: no process the restore starts may take a pid the
    # tree needs.
    (($(cat /proc/sys/kernel/ns_last_pid) < maxpid)) && echo "$maxpid" > /proc/sys/kernel/ns_last_pid
    t=$(now)
    setsid -f "${CMD[@]:0:10}" /bin/sh -c 'sleep 1000000' < /dev/null > /dev/null 2>&1
    until ph=$(pgrep -n -u alice -x sleep); do sleep 0.01; done
    criu_as_user "$ph" restore --unprivileged --shell-job --manage-cgroups=ignore -d -D "/proc/$$/root$TARGET/bench-plain" \
      -o restore.log > /dev/null 2>&1 || { echo "bench: plain restore failed" >&2; exit 1; }
    d=$(elapsed "$t")
  else
    rm -f "$dir/status"; mkfifo "$dir/status"
    t=$(now)
    "$HELPER" restore --images "$TARGET/bench-$kind" --status-fd 3 3> "$dir/status" > /dev/null 2>> "$dir/restore.err" &
    read -r _ < "$dir/status" || { echo "bench: our restore failed: $(cat "$dir/restore.err")" >&2; exit 1; }
    d=$(elapsed "$t")
  fi
  stop_container
  wait
}

mkdir -p "$TARGET"
kinds=(ours ours-zstd)
[[ $(stat -f -c %T "$TARGET") != tmpfs ]] && kinds+=(ours-staged) && mkdir -p "$STAGING"
[[ ${PARTS:-all} == periodic ]] && kinds=(ours)
install -d -o alice -g alice "$dir"
trap 'stop_container; rm -rf "$dir" "${TARGET:?}"/bench-* "$STAGING"' EXIT
start_container
for rep in $(seq 0 "$REPS"); do   # rep 0 warms memory and caches up
  out=()
  dump plain --leave-running
  out+=("dump plain $(elapsed "$t")")
  out+=("frozen plain $frozen")
  bytes=$(du -sb "$TARGET/bench-plain" | cut -f1)
  rm -rf "$TARGET/bench-plain"
  # 1 MiB blocks: measured several times faster than 16 MiB ones here (the
  # buffer stays in the CPU cache), so the bound is a real bound.
  t=$(now); dd if=/dev/zero of="$TARGET/bench-raw" bs=1M count=$((bytes / 1048576 + 1)) conv=fsync status=none
  out+=("dump raw $(elapsed "$t")")
  t=$(now); dd if="$TARGET/bench-raw" of=/dev/null bs=1M status=none
  out+=("restore raw $(elapsed "$t")")
  rm -f "$TARGET/bench-raw"
  for kind in "${kinds[@]}"; do
    dump "$kind" --leave-running
    out+=("dump $kind $(elapsed "$t")")
    # How long the container was stopped: until CRIU and the streamer were
    # done (a staged checkpoint is copied to TARGET after that).
    out+=("frozen $kind $(awk -F' = ' '/^dump_seconds/ { print $2 }' "$TARGET/bench-$kind/manifest.toml")")
    ((rep == REPS)) && report size "$kind" "$(du -sb "$TARGET/bench-$kind" | cut -f1)"
    rm -rf "${TARGET:?}/bench-$kind"
  done
  ((rep == REPS)) && report size plain "$bytes"
  ((rep > 0)) && for o in "${out[@]}"; do report $o; done
done
[[ ${PARTS:-all} == periodic ]] && exit 0
# Restores: one image at a time; the container goes, and comes back for the
# next kind's image (the pids must be free).
for kind in plain ours ours-zstd; do
  [[ -n ${pid:-} ]] || start_container
  maxpid=$(ps -L -u alice -o lwp= | sort -n | tail -1)
  dump "$kind"
  pid=
  stop_container
  for rep in $(seq 0 "$REPS"); do
    restore "$kind"
    ((rep > 0)) && report restore "$kind" "$d"
  done
  rm -rf "${TARGET:?}/bench-$kind"
done
