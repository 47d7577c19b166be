#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, ptxas, NVVM, headers, and libnvrtc for the NVRTC
# fallback's test) from PyPI's wheels into
# .cuda-tools/ at the repository root, for building the `cuda` feature's kernels on a machine
# without a CUDA installation (see docs: TOOLCHAIN.md). Idempotent: a second run only checks the
# installed version. Prints the nvcc path on its last line.
#
# Pinned to 13.0 because the GPU machines run driver 580 (CUDA 13.0), and PTX written by a newer
# nvcc is rejected at module load by an older driver (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
set -euo pipefail
cd "$(dirname "$0")/.."

dest=.cuda-tools
nvcc="$dest/nvidia/cu13/bin/nvcc"
want="release 13.0"

nvrtc="$dest/nvidia/cu13/lib/libnvrtc.so.13"
if [ -x "$nvcc" ] && [ -f "$nvrtc" ] && "$nvcc" --version 2>/dev/null | grep -q "$want"; then
    echo "install-cuda-tools: nvcc 13.0 already in $dest" >&2
else
    rm -rf "$dest"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
        --target "$dest" \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 \
        nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
    if ! "$nvcc" --version | grep -q "$want"; then
        echo "install-cuda-tools: $nvcc is not nvcc 13.0" >&2
        exit 1
    fi
fi
# nvcc --ptx preprocesses with the host compiler.
command -v gcc >/dev/null || echo "install-cuda-tools: warning: gcc not on PATH; nvcc needs it" >&2
echo "$(pwd)/$nvcc"
