#!/usr/bin/env bash
# Installs Open MPI (mpirun and the headers/libraries the `mpi` feature links against) and
# libclang (which the MPI bindings' build uses to read mpi.h) from Debian, for the data-parallel
# tests. Idempotent: does nothing when mpicc, mpirun and libclang are already there. Needs root
# (or sudo), as any Debian package install does.
set -euo pipefail
have_libclang() { ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; }
if command -v mpicc >/dev/null && command -v mpirun >/dev/null && have_libclang; then
    echo "install-mpi: Open MPI and libclang already installed ($(mpirun --version | head -n 1))" >&2
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
packages=(libopenmpi-dev openmpi-bin libclang-dev)
if ! $sudo apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; then
    $sudo apt-get update -q >/dev/null
    $sudo apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
fi
echo "install-mpi: $(mpirun --version | head -n 1)" >&2
