#!/usr/bin/env bash
# The Python package in CI: a virtual environment outside the clone (kept between runs, so PyPI is
# asked only once), maturin, NumPy, pytest and torch pinned from PyPI, the abi3 wheel built from python/
# and installed, then its tests, which hold the package against the release binary (MUSCLE_BIN).
#   bash scripts/python-ci.sh            (after `cargo build --release`)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MUSCLE_PY_VENV:-$HOME/.cache/muscle-ci/venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check maturin==1.16.0 numpy==2.4.6 pytest==9.2.0
# torch for muscle.torch's tests: the Linux wheel brings ~5.6 GB of CUDA libraries (about 2 minutes
# to download here), so it is installed once into the cached environment, and only where the disk
# has room; without it the torch tests report themselves skipped.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    free_gib="$(df -Pk "$venv" | awk 'NR == 2 { print int($4 / 1048576) }')"
    if [ "$free_gib" -ge 14 ]; then
        "$venv/bin/pip" install -q --disable-pip-version-check --no-cache-dir torch==2.15.0
    else
        echo "python-ci: only ${free_gib} GiB free next to $venv; torch (~6 GiB installed, as much again while it downloads) is not installed and its tests skip" >&2
    fi
fi
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
"$venv/bin/maturin" build --release --locked --manifest-path python/Cargo.toml --out "$wheels"
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$wheels"/muscle-*.whl
# From the repository root, so that `import muscle` is the installed package, not python/muscle.
MUSCLE_BIN="${MUSCLE_BIN:-$PWD/target/release/muscle}" "$venv/bin/pytest" -q -p no:cacheprovider python/tests
