#!/usr/bin/env bash
# Prepares what a GPU machine needs to check the CUDA backend: such machines have a CUDA 13 driver
# and CUDA libraries as pip wheels, but no Rust toolchain, no network, and take at most 64 MiB of
# files. Builds, with --features cuda,cudnn:
#   muscle      the release binary (the embedded Fashion-MNIST subset is inside it)
#   gpu-tests   the integration-test binary (GPU parity tests + the opt-in timing report)
# strips both, and copies them with scripts/gpu-check.sh into gpu-bundle/ (git-ignored).
# Then, on the GPU machine: bash gpu-bundle/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
features=cuda,cudnn
out=gpu-bundle

# nvcc at build time, so the bundle carries PTX and the GPU machine needs no NVRTC.
NVCC="${NVCC:-$(bash scripts/install-cuda-tools.sh | tail -n 1)}"
export NVCC

msgs="$(mktemp)"
trap 'rm -f "$msgs"' EXIT
cargo build --release --locked --features "$features" --bin muscle --message-format=json-render-diagnostics >"$msgs"
cargo test --release --locked --features "$features" --test main --no-run --message-format=json-render-diagnostics >>"$msgs"

# The executables, by target: the `muscle` bin and the `main` integration-test binary.
read -r muscle_bin tests_bin < <(python3 - "$msgs" <<'PY'
import json, sys
found = {}
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    if t["name"] == "muscle" and "bin" in t["kind"] and not m["profile"]["test"]:
        found["bin"] = m["executable"]
    if t["name"] == "main" and "test" in t["kind"]:
        found["test"] = m["executable"]
if set(found) != {"bin", "test"}:
    sys.exit(f"gpu-bundle: executables not found in cargo's messages: {found}")
print(found["bin"], found["test"])
PY
)

rm -rf "$out"
mkdir -p "$out"
cp "$muscle_bin" "$out/muscle"
cp "$tests_bin" "$out/gpu-tests"
strip "$out/muscle" "$out/gpu-tests"
cp scripts/gpu-check.sh "$out/gpu-check.sh"
{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "features: $features"
    echo "rustc: $(rustc --version)"
    echo "nvcc: $("$NVCC" --version | tail -n 1)"
} >"$out/BUILD.txt"

bytes="$(du -sb "$out" | cut -f1)"
limit=$((64 * 1024 * 1024))
ls -l "$out"
echo "gpu-bundle: $out is $((bytes / 1024 / 1024)) MiB (limit 64 MiB)"
if [ "$bytes" -gt "$limit" ]; then
    echo "gpu-bundle: over the 64 MiB a GPU machine takes" >&2
    exit 1
fi
