#!/bin/sh
# Opt-in comparison with PyTorch on the CPU (not run in CI): puts PyPI's torch in a venv under
# benches/peer/.venv (a few GB: the Linux wheel pulls its CUDA libraries, unused here) unless
# TORCH_PYTHON names a python that already has torch and numpy, builds muscle, and runs
# step.py with the given arguments (see step.py --help).
set -eu
cd "$(dirname "$0")/../.."
PY=${TORCH_PYTHON:-}
if [ -z "$PY" ]; then
    if [ ! -x benches/peer/.venv/bin/python ]; then
        python3 -m venv benches/peer/.venv
        benches/peer/.venv/bin/pip install --quiet torch numpy
    fi
    PY=benches/peer/.venv/bin/python
fi
cargo build --release --quiet
exec "$PY" benches/peer/step.py --muscle target/release/muscle "$@"
