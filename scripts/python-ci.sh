#!/usr/bin/env bash
# The Python package in CI: a virtual environment outside the clone (kept between runs, so PyPI is
# asked only once), maturin, NumPy and pytest pinned from PyPI, the abi3 wheel built from python/
# and installed, then its tests, which hold the package against the release binary (MUSCLE_BIN).
#   bash scripts/python-ci.sh            (after `cargo build --release`)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MUSCLE_PY_VENV:-$HOME/.cache/muscle-ci/venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check maturin==1.16.0 numpy==2.4.6 pytest==9.2.0
wheels="$(mktemp -d)"
trap 'rm -rf "$wheels"' EXIT
"$venv/bin/maturin" build --release --locked --manifest-path python/Cargo.toml --out "$wheels"
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$wheels"/muscle-*.whl
# From the repository root, so that `import muscle` is the installed package, not python/muscle.
MUSCLE_BIN="${MUSCLE_BIN:-$PWD/target/release/muscle}" "$venv/bin/pytest" -q -p no:cacheprovider python/tests
