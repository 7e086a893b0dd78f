#!/usr/bin/env bash
# The application image of the dev cluster: real HPC programs from Debian sid
# (LAMMPS, GROMACS, Open MPI, AutoDock Vina; NWChem built with MPICH) in a SIF, for tests/tests/apps.rs
# and the demo.
# Sourced by cluster/devcluster, which calls ensure_apps_sif once the cluster
# is up (`devcluster apps`): Apptainer builds the SIF inside the ctl host
# (it refuses a plain chroot, FIELD-NOTES §3).
#
# The tree is a copy of the cached bare sid tree of cluster/rootfs.sh with
# the packages installed (no recommends); the SIF is cached in
# $CACHE_DIR/apps-<key>.sif, the key a hash of what shapes it (the bare tree's
# key, the packages, the preparation function): a warm cache costs a hard
# link.

APPS_SIF_NAME=apps.sif
APPS_PACKAGES=(lammps gromacs openmpi-bin autodock-vina mpich nwchem-mpich)

apps_key() {
  { rootfs_key; printf '%s\n' "${APPS_PACKAGES[@]}"; declare -f prepare_apps_tree; } | sha256sum | cut -c1-16
}

# Runs inside the tree (chroot): installs the programs and the inputs: one
# file of lammps-examples (259 MB installed, of which the tests need 1 KB),
# and the docking case autodock-vina's own package test uses (a protein, a
# ligand and the search box; its documentation directory is not installed
# in this tree, so they are taken from the package file).
prepare_apps_tree() {
  set -euo pipefail
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  cd /tmp
  apt-get download -qq lammps-examples
  mkdir -p /opt/apps
  dpkg-deb --fsys-tarfile lammps-examples_*.deb |
    tar -xO --wildcards '*/examples/melt/in.melt' > /opt/apps/in.melt
  [ -s /opt/apps/in.melt ]
  apt-get download -qq autodock-vina
  mkdir -p /opt/apps/vina
  dpkg-deb --fsys-tarfile autodock-vina_*.deb | tar -x --wildcards --strip-components=6 -C /opt/apps/vina '*/test-data/*'
  gunzip /opt/apps/vina/protein.pdbqt.gz
  for f in protein.pdbqt ligand.pdbqt conf.txt; do [ -s "/opt/apps/vina/$f" ]; done
  rm -f lammps-examples_*.deb autodock-vina_*.deb
  # NWChem (MPICH, PMI-2: what `srun --mpi=pmi2 -n N` can launch here):
  # a water dimer's B3LYP/6-31G* geometry optimisation, ~12 s on 2 ranks.
  mkdir -p /opt/apps/nwchem
  cat > /opt/apps/nwchem/dimer.nw <<'NW'
start dimer
title "water dimer B3LYP/6-31G* optimisation"
geometry units angstrom noautosym
 O   -1.551007  -0.114520   0.000000
 H   -1.934259   0.762503   0.000000
 H   -0.599677   0.040712   0.000000
 O    1.350625   0.111469   0.000000
 H    1.680398  -0.373741  -0.758561
 H    1.680398  -0.373741   0.758561
end
basis
 * library 6-31G*
end
dft
 xc b3lyp
 iterations 100
end
driver
 maxiter 30
end
task dft optimize
NW
  apt-get clean
  rm -rf /var/lib/apt/lists/*
}

# Puts the application SIF at /shared/images/apps.sif, building it when no
# cached one matches the recipe. Needs the cluster up (ctl builds it).
ensure_apps_sif() {
  local key cached tree started
  key=$(apps_key)
  cached="$CACHE_DIR/apps-$key.sif"
  mkdir -p "$CACHE_DIR" "$SHARED/images"
  # Several dev clusters may share the cache: one builds, the others wait.
  exec {lock}> "$CACHE_DIR/.apps.lock"
  flock "$lock"
  if [[ ! -s $cached ]]; then
    started=$SECONDS
    say "building the application SIF ($(printf '%s ' "${APPS_PACKAGES[@]}")from Debian sid; a few minutes, done once)"
    # Below /shared so that ctl sees it; root-only while it exists.
    tree="$SHARED/.apps-build-$key"
    rm -rf --one-file-system "$tree" "$tree.sif"
    install -d -m 0700 "$tree"
    cp -a "$(ensure_rootfs).image/." "$tree/"
    echo 'Acquire::Check-Valid-Until "false";' > "$tree/etc/apt/apt.conf.d/99no-check-valid"
    printf '#!/bin/sh\nexit 101\n' > "$tree/usr/sbin/policy-rc.d"
    chmod 755 "$tree/usr/sbin/policy-rc.d"
    mount -t proc proc "$tree/proc"
    if ! chroot "$tree" bash -c "$(declare -f prepare_apps_tree); prepare_apps_tree $(printf '%q ' "${APPS_PACKAGES[@]}")" >&2; then
      umount -l "$tree/proc"
      die "installing ${APPS_PACKAGES[*]} into the application tree failed"
    fi
    umount -l "$tree/proc"
    rm -f "$tree/usr/sbin/policy-rc.d" "$tree/etc/apt/apt.conf.d/99no-check-valid"
    run_in ctl root apptainer -s build --force "/shared/.apps-build-$key.sif" "/shared/.apps-build-$key" >&2 {lock}>&- ||
      die "apptainer build of the application SIF failed"
    mv "$tree.sif" "$cached.tmp"
    mv "$cached.tmp" "$cached"
    rm -rf --one-file-system "$tree"
    say "application SIF built in $((SECONDS - started)) s: $(du -m "$cached" | cut -f1) MB"
    # Old builds of other recipes are dead weight.
    find "$CACHE_DIR" -maxdepth 1 -name 'apps-*.sif' ! -name "apps-$key.sif" -delete 2>/dev/null || true
  fi
  flock -u "$lock"
  # A hard link when the cache and /shared share a filesystem (600 MB).
  if ! [[ "$cached" -ef "$SHARED/images/$APPS_SIF_NAME" ]]; then
    rm -f "$SHARED/images/$APPS_SIF_NAME"
    ln "$cached" "$SHARED/images/$APPS_SIF_NAME" 2>/dev/null ||
      install -m 0644 "$cached" "$SHARED/images/$APPS_SIF_NAME"
  fi
  chmod 0644 "$SHARED/images/$APPS_SIF_NAME"
}
