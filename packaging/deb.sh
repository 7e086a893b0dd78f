#!/usr/bin/env bash
# Builds the Debian package from a release build (`./dev package` calls it):
#   packaging/deb.sh TARGET_DIR CRIU SLURM_INCLUDE OUT_DIR [PLUGIN_DIR]
# TARGET_DIR holds the release binaries (PLUGIN_DIR the plugin, when it was
# built apart against another Slurm's headers), CRIU is the statically linked CRIU
# shipped with the helper, SLURM_INCLUDE the Slurm headers the plugin was
# built against (its version decides the slurmd the package depends on: Slurm
# loads a SPANK plugin only from its own release).
#
# Layout, where Debian's admins and Slurm look:
#   /usr/lib/<multiarch>/slurm-wlm/spank_checkpoint_container.so   the plugin
#   /usr/libexec/checkpoint-container/checkpoint-container          the helper (root-owned, never setuid)
#   /usr/libexec/checkpoint-container/criu                          static CRIU
#   /usr/libexec/checkpoint-container/checkpoint-container-ranks    static: starts a step's ranks in one container
#   /usr/libexec/checkpoint-container/shim/{apptainer,singularity}  links to the helper: the runtime shim
#                                                                    first on the PATH of protected scripts
#   /etc/slurm/plugstack.conf.d/checkpoint-container.conf           commented snippet (conffile)
#   /var/spool/checkpoint-container                                  default checkpoint_dir (root, 0755)
#   /usr/share/doc/checkpoint-container/                             README, docs, examples
set -euo pipefail
HERE=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
target=$1 criu=$2 slurm_include=$3 out=$4 plugin_dir=${5:-$1}

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/Cargo.toml" | head -1)
arch=$(dpkg --print-architecture)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$(uname -m)-linux-gnu")
# SLURM_VERSION_NUMBER 0xMMmmuu: the package works with that major.minor only.
slurm_hex=$(sed -n 's/^#define SLURM_VERSION_NUMBER 0x\([0-9a-fA-F]*\)/\1/p' "$slurm_include/slurm/slurm_version.h")
slurm_major=$((16#${slurm_hex:0:2})) slurm_minor=$((16#${slurm_hex:2:2}))
slurm_release=$(printf '%d.%02d' "$slurm_major" "$slurm_minor")
slurm_next=$(printf '%d.%02d' "$slurm_major" $((slurm_minor + 1)))

root=$(mktemp -d)
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT
doc=$root/usr/share/doc/checkpoint-container
install -D -m 0644 "$plugin_dir/libspank_checkpoint_container.so" "$root/usr/lib/$multiarch/slurm-wlm/spank_checkpoint_container.so"
install -D -m 0755 "$target/checkpoint-container" "$root/usr/libexec/checkpoint-container/checkpoint-container"
install -D -m 0755 "$criu" "$root/usr/libexec/checkpoint-container/criu"
# Statically linked (./dev build's build_ranks): it runs inside users' images.
ranks=$target/../static/release/checkpoint-container-ranks
if [[ ! -f $ranks ]] || readelf -lW "$ranks" | grep -q 'program interpreter'; then
  echo "deb.sh: $ranks is missing or not statically linked (./dev build builds it)" >&2
  exit 1
fi
install -D -m 0755 "$ranks" "$root/usr/libexec/checkpoint-container/checkpoint-container-ranks"
install -d -m 0755 "$root/usr/libexec/checkpoint-container/shim"
for runtime in apptainer singularity; do
  ln -s ../checkpoint-container "$root/usr/libexec/checkpoint-container/shim/$runtime"
done
install -D -m 0644 "$HERE/plugstack.conf.d/checkpoint-container.conf" "$root/etc/slurm/plugstack.conf.d/checkpoint-container.conf"
install -d -m 0755 "$root/var/spool/checkpoint-container"
install -D -m 0644 "$REPO/README.md" "$doc/README.md"
install -D -m 0644 -t "$doc/docs" "$REPO"/docs/*.md
install -D -m 0644 -t "$doc/examples" "$REPO/slurm-conf/checkpoint-container.toml" "$REPO/slurm-conf/plugstack.conf" \
  "$REPO/slurm-conf/slurm.conf.example" "$REPO/slurm-conf/cgroup.conf.example"
criu_version=$("$criu" --version | sed -n 's/^Version: //p')
cat > "$doc/copyright" <<COPYRIGHT
checkpoint-container: GPL-2.0-or-later (it is loaded by Slurm, GPL-2.0-or-later).
The bundled /usr/libexec/checkpoint-container/criu is CRIU $criu_version, built
statically from its release tarball: GPL-2.0.
COPYRIGHT
installed_kb=$(du -sk "$root" | cut -f1)
install -d "$root/DEBIAN"
cat > "$root/DEBIAN/control" <<CONTROL
Package: checkpoint-container
Version: $version
Architecture: $arch
Maintainer: checkpoint-container developers <root@localhost>
Section: admin
Priority: optional
Installed-Size: $installed_kb
Depends: slurmd (>= $slurm_release), slurmd (<< $slurm_next), libc6
Recommends: apptainer
Description: Slurm SPANK plugin: checkpoint Apptainer containers with CRIU
 Jobs that ask for --checkpoint-container get their Apptainer containers
 checkpointed with CRIU when they are preempted or requeued, and restored when
 they run again, on the same node or another one. Contains the SPANK plugin,
 its root helper (not setuid) and a statically linked CRIU. Enable it in
 /etc/slurm/plugstack.conf.d/checkpoint-container.conf.
CONTROL
echo /etc/slurm/plugstack.conf.d/checkpoint-container.conf > "$root/DEBIAN/conffiles"
mkdir -p "$out"
deb="$out/checkpoint-container_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
