#!/usr/bin/env bash
# Builds (or reuses) the Debian root filesystem every dev-cluster host runs
# from, plus the directory the test SIF image is built from.
#
# CKPT_DEVCLUSTER_SUITE picks the Debian suite, hence the Slurm release the
# cluster runs: sid (default, Slurm 26.05) or trixie (Slurm 24.11). Why sid by
# default: Apptainer is packaged only there (trixie's tree takes sid's
# apptainer, pinned so that nothing else comes from sid). The cache is keyed by
# a hash of what shapes the tree, so changing the package set below rebuilds
# it; a warm cache costs nothing. Only the suite, the packages and the
# configuration steps are hashed, so editing comments or other functions keeps
# the cache.
set -euo pipefail

CACHE_DIR=${CKPT_CACHE_DIR:-/var/cache/ckpt-devcluster}
SUITE=${CKPT_DEVCLUSTER_SUITE:-sid}
case $SUITE in
  sid | trixie) ;;
  *) echo "rootfs: CKPT_DEVCLUSTER_SUITE=$SUITE is not supported (sid or trixie)" >&2; exit 2 ;;
esac
# Everything a cluster host needs: Slurm (controller, node daemon, client and
# headers for building the plugin), munge, Apptainer, CRIU and what they use.
PACKAGES=(
  slurmctld slurmd slurm-client libslurm-dev munge
  apptainer squashfs-tools criu
  iproute2 iputils-ping procps psmisc less ca-certificates
)

rootfs_key() {
  {
    echo "$SUITE"
    printf '%s\n' "${PACKAGES[@]}"
    declare -f configure_rootfs
    [[ $SUITE == sid ]] || declare -f add_sid_apptainer
  } | sha256sum | cut -c1-16
}

# Cache entries of this suite are named $(rootfs_prefix)KEY (sid keeps the
# names it had before there were other suites).
rootfs_prefix() {
  if [[ $SUITE == sid ]]; then echo rootfs-; else echo "rootfs-$SUITE-"; fi
}

# Where cargo builds the plugin for this suite's Slurm, given the workspace's
# target directory: the plugin binds to one release's headers, so each suite
# has its own (the rest of the workspace is built once, in the first).
plugin_target_dir() {
  if [[ $SUITE == sid ]]; then echo "$1"; else echo "$1/$SUITE"; fi
}

# Apptainer is not packaged for trixie: take sid's, and only what it strictly
# needs, by an apt source for sid (the mirror line debootstrap wrote, suite
# changed) pinned below the tree's own suite.
add_sid_apptainer() {
  local root=$1
  sed -n "s/^\(deb [^ ]* \)$SUITE\( .*\)/\1sid\2/p" "$root/etc/apt/sources.list" > "$root/etc/apt/sources.list.d/sid.list"
  [[ -s $root/etc/apt/sources.list.d/sid.list ]] || { echo "rootfs: no deb line for $SUITE in the tree's sources.list" >&2; exit 1; }
  printf 'Package: *\nPin: release n=sid\nPin-Priority: 100\n' > "$root/etc/apt/preferences.d/sid"
}

# Prints the path of a complete root filesystem, building it when needed.
ensure_rootfs() {
  local key dir tmp
  key=$(rootfs_key)
  dir="$CACHE_DIR/$(rootfs_prefix)$key"
  if [[ -f "$dir/.complete" ]]; then
    [[ $SUITE != sid ]] || ln -sfn "rootfs-$key" "$CACHE_DIR/rootfs"
    echo "$dir"
    return
  fi
  mkdir -p "$CACHE_DIR"
  tmp="$CACHE_DIR/.building-$key"
  rm -rf "$tmp"
  echo "rootfs: debootstrap $SUITE into $tmp (a few minutes, done once)" >&2
  debootstrap --variant=minbase "$SUITE" "$tmp" >&2
  # The SIF image is built from the bare base system (small, no Slurm in it).
  cp -a "$tmp" "$tmp.image"
  # sid's Release files are short-lived; a cache built a few days ago must still
  # be able to install packages.
  echo 'Acquire::Check-Valid-Until "false";' > "$tmp/etc/apt/apt.conf.d/99no-check-valid"
  # No service may start inside the chroot while packages install.
  printf '#!/bin/sh\nexit 101\n' > "$tmp/usr/sbin/policy-rc.d"
  chmod 755 "$tmp/usr/sbin/policy-rc.d"
  mount -t proc proc "$tmp/proc"
  trap 'umount "$tmp/proc" 2>/dev/null || true' RETURN
  local packages=("${PACKAGES[@]}")
  if [[ $SUITE != sid ]]; then
    add_sid_apptainer "$tmp"
    packages=("${packages[@]/#apptainer/apptainer/sid}")
  fi
  chroot "$tmp" apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive chroot "$tmp" apt-get install -y -qq \
      --no-install-recommends "${packages[@]}" >&2
  chroot "$tmp" apt-get clean
  umount "$tmp/proc"
  trap - RETURN
  configure_rootfs "$tmp"
  rm -rf "$dir" "$dir.image"
  mv "$tmp.image" "$dir.image"
  mv "$tmp" "$dir"
  touch "$dir/.complete"
  [[ $SUITE != sid ]] || ln -sfn "rootfs-$key" "$CACHE_DIR/rootfs"
  # Old caches of this suite's other package sets are dead weight (sid's
  # names have no second dash, other suites' do).
  local prefix
  prefix=$(rootfs_prefix)
  if [[ $SUITE == sid ]]; then
    find "$CACHE_DIR" -maxdepth 1 -name 'rootfs-*' ! -name 'rootfs-*-*' ! -name "rootfs-$key*" \
        -exec rm -rf {} + 2>/dev/null || true
  else
    find "$CACHE_DIR" -maxdepth 1 -name "$prefix*" ! -name "$prefix$key*" \
        -exec rm -rf {} + 2>/dev/null || true
  fi
  echo "$dir"
}

# Static settings of every host, applied once to the cached tree.
configure_rootfs() {
  local root=$1
  # Test users: two ordinary accounts so tests can check isolation between users.
  chroot "$root" groupadd -g 2001 alice
  chroot "$root" useradd -m -u 2001 -g 2001 -s /bin/bash alice
  chroot "$root" groupadd -g 2002 bob
  chroot "$root" useradd -m -u 2002 -g 2002 -s /bin/bash bob
  # This sandbox withholds CAP_SYS_RESOURCE from every process; Apptainer as
  # root would otherwise ask for it and abort.
  sed -i 's/^root default capabilities = .*/root default capabilities = no/' \
      "$root/etc/apptainer/apptainer.conf"
  # One munge key for the whole cluster: every host shares this tree.
  if [[ ! -s "$root/etc/munge/munge.key" ]]; then
    dd if=/dev/urandom of="$root/etc/munge/munge.key" bs=1024 count=1 status=none
  fi
  chroot "$root" chown munge:munge /etc/munge/munge.key
  chmod 0400 "$root/etc/munge/munge.key"
  mkdir -p "$root/shared" "$root/opt/checkpoint-container"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  ensure_rootfs
fi
