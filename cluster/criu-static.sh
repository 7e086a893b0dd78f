#!/usr/bin/env bash
# Builds (or reuses) a statically linked CRIU for the dev cluster and prints
# its path.
#
# Why static: the helper runs CRIU with CAP_CHECKPOINT_RESTORE and
# CAP_SYS_PTRACE inside the user's container's mount namespace. A dynamically
# linked CRIU would have its loader read that namespace's /etc/ld.so.preload
# and /etc/ld.so.cache; a static one loads nothing (see docs/security.md).
#
# How: Debian sid's orig tarball of CRIU (its checksum pinned below), built in
# a throw-away chroot copied from the cached bare sid tree of cluster/rootfs.sh
# (never modified) with the build dependencies installed there. Recipe:
# `make NO_GNUTLS=1 criu`, then the final link again with GMONLDOPT=-static
# (LDFLAGS=-static would break the parasite blobs). The result is cached in
# $CACHE_DIR/criu-static-<key>/criu, the key a hash of what shapes it (the
# tarball, the packages, the build function): a warm cache costs nothing.
set -euo pipefail

HERE=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
CACHE_DIR=${CKPT_CACHE_DIR:-/var/cache/ckpt-devcluster}
CRIU_VERSION=4.2.1
CRIU_ORIG=criu_$CRIU_VERSION.orig.tar.xz
CRIU_ORIG_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
# Build dependencies (every library ships a .a); no GnuTLS (page-server TLS is
# not used), no nftables (the engine never locks a network namespace).
BUILD_PACKAGES=(
  gcc make pkg-config xz-utils python3-protobuf
  libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
  libnl-3-dev libnl-route-3-dev libnet1-dev libcap-dev libbsd-dev uuid-dev
)

criu_key() {
  { echo "$CRIU_ORIG $CRIU_ORIG_SHA256"; printf '%s\n' "${BUILD_PACKAGES[@]}"; declare -f build_in_chroot; } |
    sha256sum | cut -c1-16
}

# Runs inside the builder chroot, in /build.
build_in_chroot() {
  set -euo pipefail
  cd /build
  tar -xf "$1"
  cd "criu-$2"
  make -s -j"$(nproc)" NO_GNUTLS=1 criu >/dev/null
  rm criu/criu
  make -s NO_GNUTLS=1 criu GMONLDOPT=-static >/dev/null 2>build-static.log || {
    cat build-static.log >&2
    exit 1
  }
  install -m 0755 criu/criu /build/criu
}

# Prints the path of the cached static CRIU, building it when needed.
ensure_criu_static() {
  local key dir image sums
  key=$(criu_key)
  dir="$CACHE_DIR/criu-static-$key"
  if [[ -x $dir/criu ]]; then
    echo "$dir/criu"
    return
  fi
  # shellcheck source=rootfs.sh
  source "$HERE/rootfs.sh"
  image="$(ensure_rootfs).image"
  [[ -d $image ]] || { echo "criu-static: no bare sid tree at $image" >&2; exit 1; }
  # Global: the EXIT trap removes it however this ends.
  BUILDER="$CACHE_DIR/.criu-builder-$key"
  local builder=$BUILDER
  echo "criu-static: building CRIU $CRIU_VERSION statically in $builder (a few minutes, done once)" >&2
  cleanup_builder
  cp -a "$image" "$builder"
  trap cleanup_builder EXIT
  echo 'Acquire::Check-Valid-Until "false";' > "$builder/etc/apt/apt.conf.d/99no-check-valid"
  printf '#!/bin/sh\nexit 101\n' > "$builder/usr/sbin/policy-rc.d"
  chmod 755 "$builder/usr/sbin/policy-rc.d"
  # Source lines from the tree's own binary lines (no host name written here).
  sed -n 's/^deb /deb-src /p' "$builder/etc/apt/sources.list" > "$builder/etc/apt/sources.list.d/criu-src.list"
  [[ -s $builder/etc/apt/sources.list.d/criu-src.list ]] || { echo "criu-static: no deb line in the tree's sources.list" >&2; exit 1; }
  mount -t proc proc "$builder/proc"
  chroot "$builder" apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive chroot "$builder" apt-get install -y -qq \
      --no-install-recommends "${BUILD_PACKAGES[@]}" >/dev/null
  mkdir -p "$builder/build"
  # Only the orig tarball is needed: apt checks it against the signed Sources
  # index (and fails if some registry lacks the Debian diff, which is not
  # used), the pin below makes sure it is the release this cache key names.
  chroot "$builder" sh -c 'cd /build && apt-get source -qq --download-only criu' >&2 2>/dev/null || true
  [[ -f $builder/build/$CRIU_ORIG ]] ||
    { echo "criu-static: Debian's criu source is not $CRIU_VERSION (have: $(ls "$builder/build"))" >&2; exit 1; }
  sums=$(sha256sum "$builder/build/$CRIU_ORIG" | cut -d' ' -f1)
  [[ $sums == "$CRIU_ORIG_SHA256" ]] ||
    { echo "criu-static: $CRIU_ORIG has sha256 $sums, expected $CRIU_ORIG_SHA256" >&2; exit 1; }
  chroot "$builder" bash -c "$(declare -f build_in_chroot); build_in_chroot /build/$CRIU_ORIG $CRIU_VERSION" >&2
  if file_is_dynamic "$builder/build/criu"; then
    echo "criu-static: the CRIU built is not statically linked" >&2
    exit 1
  fi
  rm -rf "$dir.tmp"
  install -d -m 0755 "$dir.tmp"
  install -m 0755 "$builder/build/criu" "$dir.tmp/criu"
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
  # Old builds of other keys are dead weight.
  find "$CACHE_DIR" -maxdepth 1 -name 'criu-static-*' ! -name "criu-static-$key" -exec rm -rf {} + 2>/dev/null || true
  echo "$dir/criu"
}

# Removes the builder chroot, never crossing into a mount (its /proc).
cleanup_builder() {
  umount -l "$BUILDER/proc" 2>/dev/null || true
  rm -rf --one-file-system "$BUILDER"
}

# Whether an ELF file asks for a program interpreter (a PT_INTERP header).
file_is_dynamic() {
  LC_ALL=C readelf -lW "$1" 2>/dev/null | grep -q 'Requesting program interpreter' && return 0
  # Without readelf (binutils), look for the loader's name in the headers.
  head -c 4096 "$1" | grep -qa 'ld-linux'
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  ensure_criu_static
fi
