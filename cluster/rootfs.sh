#!/usr/bin/env bash
# Builds (or reuses) the Debian sid root filesystem every dev-cluster host runs
# from, plus the directory the test SIF image is built from.
#
# Why sid: Apptainer is packaged only there, and CRIU >= 4 is needed on this
# kernel (bookworm's 3.17 fails at start). The cache is keyed by a hash of
# what shapes the tree, so changing the package set below rebuilds it; a warm
# cache costs nothing. Only the suite, the packages and the configuration step
# are hashed, so editing comments or other functions keeps the cache.
set -euo pipefail

CACHE_DIR=${CKPT_CACHE_DIR:-/var/cache/ckpt-devcluster}
SUITE=sid
# Everything a cluster host needs: Slurm (controller, node daemon, client and
# headers for building the plugin), munge, Apptainer, CRIU and what they use.
PACKAGES=(
  slurmctld slurmd slurm-client libslurm-dev munge
  apptainer squashfs-tools criu
  iproute2 iputils-ping procps psmisc less ca-certificates
)

rootfs_key() {
  { echo "$SUITE"; printf '%s\n' "${PACKAGES[@]}"; declare -f configure_rootfs; } |
    sha256sum | cut -c1-16
}

# Prints the path of a complete root filesystem, building it when needed.
ensure_rootfs() {
  local key dir tmp
  key=$(rootfs_key)
  dir="$CACHE_DIR/rootfs-$key"
  if [[ -f "$dir/.complete" ]]; then
    ln -sfn "rootfs-$key" "$CACHE_DIR/rootfs"
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
  chroot "$tmp" apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive chroot "$tmp" apt-get install -y -qq \
      --no-install-recommends "${PACKAGES[@]}" >&2
  chroot "$tmp" apt-get clean
  umount "$tmp/proc"
  trap - RETURN
  configure_rootfs "$tmp"
  rm -rf "$dir" "$dir.image"
  mv "$tmp.image" "$dir.image"
  mv "$tmp" "$dir"
  touch "$dir/.complete"
  ln -sfn "rootfs-$key" "$CACHE_DIR/rootfs"
  # Old caches of other package sets are dead weight.
  find "$CACHE_DIR" -maxdepth 1 -name 'rootfs-*' ! -name "rootfs-$key*" \
      -exec rm -rf {} + 2>/dev/null || true
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
