#!/usr/bin/env bash
# Builds and tests the CUDA emulator (emu/): the glue generator's unit tests, every kernels/*.cu
# compiled as C++ against emu/cuda_emu.h, and emu/tests/emu_test.cpp (real kernels against
# reference loops under every schedule, and the bugs the emulator must report), once with the
# x86-64 context switch and once with glibc's ucontext and no line tables. Needs g++ (C++17),
# rustc, and addr2line (binutils, which g++ brings). Takes ~20 s on 2 cores.
# Usage: bash emu/test.sh    (CXX and RUSTC override the compilers)
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${CXX:-g++}
RUSTC=${RUSTC:-rustc}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# -ffp-contract=off: no FMA contraction, so the __f*_rn kernels round as on the GPU and the CPU.
# -g: the line tables a fault's file:line is read from.
flags=(-std=c++17 -O2 -g -ffp-contract=off -Wall -Wextra -Wno-unknown-pragmas -I. -Ikernels)
kernel_flags=("${flags[@]}" -x c++ -include emu/cuda_emu.h)

echo "== emu/signatures.rs unit tests"
"$RUSTC" --edition 2021 --test emu/signatures.rs -o "$out/signatures"
"$out/signatures" -q 2>&1 | grep 'test result'

echo "== kernels/*.cu as C++ against emu/cuda_emu.h"
for f in kernels/*.cu; do
    "$CXX" "${kernel_flags[@]}" -Werror -fsyntax-only "$f"
    echo "ok $f"
done

echo "== build"
"$RUSTC" --edition 2021 emu/tests/render.rs -o "$out/render"
# Absolute paths, as build.rs has them: the glue includes each file by the path it is given.
sources=("$PWD"/kernels/*.cu "$PWD/emu/tests/bad_kernels.cu" "$PWD/emu/tests/shuffles.cu")
"$out/render" "$out" "${sources[@]}"
pids=()
for glue in "$out"/*.glue.cpp "$out/index.cpp"; do
    "$CXX" "${kernel_flags[@]}" -c "$glue" -o "$glue.o" &
    pids+=($!)
done
"$CXX" "${flags[@]}" -Werror -c emu/runtime.cpp -o "$out/runtime.o" &
pids+=($!)
"$CXX" "${flags[@]}" -Werror -DCUDA_EMU_UCONTEXT -c emu/runtime.cpp -o "$out/runtime_ucontext.o" &
pids+=($!)
"$CXX" "${flags[@]}" -Werror -c emu/tests/emu_test.cpp -o "$out/emu_test.o" &
pids+=($!)
for pid in "${pids[@]}"; do wait "$pid"; done
"$CXX" -o "$out/emu_test" "$out/emu_test.o" "$out/runtime.o" "$out"/*.cpp.o -pthread -ldl
# Without line tables too, as in a release build (cargo strips debug info): faults then name the kernel's line.
"$CXX" -o "$out/emu_test_ucontext" "$out/emu_test.o" "$out/runtime_ucontext.o" "$out"/*.cpp.o -pthread -ldl -Wl,--strip-debug

echo "== emu_test (x86-64 context switch where available)"
"$out/emu_test"
echo "== emu_test (glibc ucontext, no line tables)"
"$out/emu_test_ucontext" 10000 | grep -v "^  "
