#!/usr/bin/env bash
# Runs on a GPU machine, on the folder scripts/gpu-bundle.sh made (no Rust, no network needed):
#   bash gpu-bundle/gpu-check.sh [RESULTS_DIR]      (default: $OUT if set, else gpu-bundle/results)
# Stages, smoke test first; each stage's log is written to RESULTS_DIR as soon as it ends, so a
# machine taken back mid-run still leaves what finished. A table of the stages comes last (also in
# RESULTS_DIR/summary.md). Meant to finish in under 5 minutes.
#   env       nvidia-smi, the CUDA libraries found, BUILD.txt, `muscle info`
#   smoke     one GPU parity test (loads every kernel module)
#   nccl      a one-rank NCCL all-gather and the ordered-sum kernel (the device path of data-parallel
#             runs; several GPUs under mpirun stay unverified: this machine has one and no MPI)
#   parity    every GPU parity test with REQUIRE_GPU=1 (a missing GPU fails instead of skipping)
#   timings   the kernels at n = 65,536, C = 10 / 100 against the bytes/3 TB/s floor
#   bench     `muscle bench --device cuda` (convnet MUSCLE training steps), then `--op mi`
#             (n = 65,536, C = 10 / 100), `--op softmax-ce` and `--op conv` on the GPU
#   train     300 MUSCLE steps on the embedded set on GPU and CPU, same seed, EMA test accuracies
#             within 2 points (skipped when a 1-step GPU probe run fails; its error is shown)
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
res="${1:-${OUT:-$here/results}}"
mkdir -p "$res"
cd "$here"

# The pip wheels' CUDA libraries (libcublas, libnvrtc, libcudnn, ...) on the loader's path.
libdirs="$(python3 - <<'PY' 2>/dev/null
import glob, os
dirs = []
try:
    import nvidia
    for root in nvidia.__path__:
        dirs += [d for d in glob.glob(os.path.join(root, "*", "lib")) if os.path.isdir(d)]
except Exception:
    pass
print(":".join(sorted(set(dirs))))
PY
)"
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

rows=()
stage() {
    local name="$1"
    shift
    local start rc secs
    start="$(date +%s)"
    "$@" >"$res/$name.txt" 2>&1
    rc=$?
    secs=$(($(date +%s) - start))
    if [ "$rc" -eq 0 ]; then
        rows+=("| $name | ok | ${secs} s |")
    else
        rows+=("| $name | FAILED (exit $rc) | ${secs} s |")
    fi
    echo "== $name: exit $rc after ${secs} s ($res/$name.txt)"
    return "$rc"
}

env_report() {
    nvidia-smi || echo "nvidia-smi: not available"
    echo
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    for lib in libcuda.so libnvrtc.so libcublas.so libcudnn.so libnccl.so; do
        echo "$lib: $(ldconfig -p 2>/dev/null | grep -m1 "$lib" | awk '{print $NF}') $(
            IFS=:; for d in $LD_LIBRARY_PATH; do ls "$d"/"$lib"* 2>/dev/null | head -n 1; done)"
    done
    python3 -c "import nvidia.cudnn as m; print('cudnn wheel:', m.__path__[0])" 2>/dev/null || true
    echo
    cat BUILD.txt
    echo
    ./muscle info
}

stage env env_report
stage smoke env REQUIRE_GPU=1 ./gpu-tests gpu::elementwise::leaky_relu_add_scale_match_cpu_bitwise --exact --nocapture
smoke=$?
stage nccl env REQUIRE_GPU=1 ./gpu-tests gpu::collective --nocapture
if [ "$smoke" -eq 0 ]; then
    stage parity env REQUIRE_GPU=1 timeout 240 ./gpu-tests gpu:: --test-threads=1
    stage timings env REQUIRE_GPU=1 timeout 120 ./gpu-tests gpu::timings::kernel_timings_against_the_floor --exact --ignored --nocapture
else
    rows+=("| parity, timings | skipped: the smoke test failed | |")
fi
bench_all() {
    timeout 120 ./muscle bench --device cuda --json || return 1
    for c in 10 100; do
        timeout 60 ./muscle bench --op mi --device cuda --rows 65536 --classes "$c" || return 1
    done
    timeout 60 ./muscle bench --op softmax-ce --device cuda --rows 65536 --classes 10 || return 1
    timeout 60 ./muscle bench --op conv --device cuda --batch 576 || return 1
}
stage bench bench_all
train_both() {
    timeout 100 ./muscle train --device cuda --steps 300 --seed 1 --out "$res/train-cuda" || return 1
    timeout 200 ./muscle train --device cpu --steps 300 --seed 1 --out "$res/train-cpu" || return 1
    python3 - "$res/train-cuda/summary.json" "$res/train-cpu/summary.json" <<'PY'
import json, sys
g, c = (json.load(open(p))["test_accuracy_ema"] for p in sys.argv[1:3])
print(f"EMA test accuracy: cuda {g:.4f}, cpu {c:.4f}, difference {abs(g - c) * 100:.2f} points")
sys.exit(0 if abs(g - c) <= 0.02 else 1)
PY
}
if probe="$(timeout 60 ./muscle train --device cuda --steps 1 --out "$res/train-probe" 2>&1)"; then
    stage train train_both
else
    rows+=("| train | skipped: $(printf '%s' "$probe" | tail -n 1) | |")
fi

# Our kernels under compute-sanitizer (last: it is slow, and the numbers above matter more). The
# cuDNN/cuBLAS tests and the whole step are left out: their internals are not ours to sanitize.
sanitize() {
    local tool
    for tool in memcheck racecheck synccheck; do
        echo "== compute-sanitizer --tool $tool"
        timeout 180 compute-sanitizer --tool "$tool" --error-exitcode 9 \
            env REQUIRE_GPU=1 ./gpu-tests gpu:: --test-threads=1 --skip conv --skip step --skip timings --skip sgemm ||
            return 1
    done
}
if [ "$smoke" -eq 0 ] && command -v compute-sanitizer >/dev/null; then
    stage sanitizer sanitize
else
    rows+=("| sanitizer | skipped: no compute-sanitizer on PATH, or the smoke test failed | |")
fi

{
    echo "| stage | result | time |"
    echo "|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo
    grep -h '^gpu: ' "$res/timings.txt" 2>/dev/null | head -n 1
    grep -h '^|' "$res/timings.txt" 2>/dev/null
} | tee "$res/summary.md"
