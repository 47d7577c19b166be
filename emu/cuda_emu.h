// The CUDA execution model on the CPU: the header a kernels/*.cu file is compiled against, unchanged,
// as C++ (issue 22), e.g.
//   g++ -std=c++17 -O2 -ffp-contract=off -Wno-unknown-pragmas -x c++ -include emu/cuda_emu.h
//       -I kernels -c kernels/softmax.cu
// (-Wno-unknown-pragmas: g++ does not know nvcc's #pragma unroll, and g++ 12 lets no pragma in a
// header silence that warning.)
// emu/runtime.cpp runs the kernels; emu/signatures.rs generates the glue that lets it call them by
// name; emu/test.sh builds and tests all of it.
//
// What it emulates. Each CUDA thread is its own fiber. A launch's blocks run one at a time on the
// launching OS thread, in an order chosen by MUSCLE_CUDA_EMU_SCHEDULE (forward, reverse,
// shuffle:SEED, runahead: see runtime.cpp); a thread runs until it ends, or until it reaches
// __syncthreads (the block barrier) or a warp shuffle, which completes only when every thread of
// the block, or every lane of the shuffle's mask, has arrived at that same call. A block that can
// no longer progress (threads at different barriers, a barrier some threads returned before, a
// lane returned or elsewhere while its warp waits for it at a shuffle) is an error naming the
// file:line, kernel, block, warp and lane. Each __shared__ array is one static instance, filled
// with 0xFF bytes at every block start, so a read before any write is a NaN. Device buffers end
// at an inaccessible page, so a read one past the end faults at once and is reported the same
// way. The __f*_rn intrinsics are single IEEE operations, so with -ffp-contract=off (no FMA
// contraction; required for the emulator and the kernels) the kernels built on them are bit for
// bit those of the GPU and of their CPU twins.
//
// What it does NOT verify:
// - nvcc/NVRTC: their parsing, code generation, register allocation and warnings; a kernel that
//   g++ accepts may still fail to compile for the GPU (CI's ptxas pass covers that).
// - FMA contraction and CUDA's math library: nvcc contracts a * b + c into FMAs and has its own
//   expf/logf/exp/log (a few ulp from glibc's), so only the __f*_rn kernels are bit-comparable to
//   the hardware; the others agree with it to within rounding.
// - The memory model and truly concurrent blocks: threads interleave only at barriers and
//   shuffles, blocks never overlap, and every write is at once visible to all; races between
//   blocks, missing __threadfence or volatile, and a spin-wait on another thread or block (which
//   hangs here) are not found. Races inside a block show as outputs that differ between schedules
//   or as NaN from the poisoned shared memory, not as a report naming the race.
// - Resource limits: shared memory per block, registers, occupancy; only the 1024 threads per
//   block and __launch_bounds__ are checked.
// - cudaMalloc's alignment: a buffer here ends at a page boundary, so it is aligned only to the
//   largest power of two dividing its size; a misaligned vector load is not caught.
// - Asynchronous error reporting: each launch runs to its end before it returns, and its error is
//   its return value, where a GPU reports it at a later synchronisation.
// - Speed: nothing here says how fast a kernel runs on a GPU.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

// threadIdx and friends are unsigned, so CUDA code compares them with ints everywhere; nvcc does
// not warn about it, and neither should this build.
#pragma GCC diagnostic ignored "-Wsign-compare"

// CUDA's built-in vector types of the thread and block coordinates.
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};

namespace cuda_emu {

// Where a barrier or shuffle is called (the caller's file and line), and which one it is.
struct Site {
    const char* file;
    int line;
    const char* op;
};

// The part of an emulated thread and launch that kernels read through threadIdx and friends.
struct ThreadView {
    uint3 thread_idx;
};
struct LaunchView {
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};
extern ThreadView* current_thread;  // the thread whose fiber is running
extern LaunchView launch_view;      // the block being run

inline const uint3& thread_idx() { return current_thread->thread_idx; }
inline const uint3& block_idx() { return launch_view.block_idx; }
inline const dim3& block_dim() { return launch_view.block_dim; }
inline const dim3& grid_dim() { return launch_view.grid_dim; }

// Waits until every thread of the block is at this barrier (runtime.cpp).
void sync_block(Site site);

enum class ShuffleKind { Index, Xor, Down };
// Returns the bits the lane that `kind`, `operand` and `width` name passed to this same
// shuffle, once every lane of `mask` has arrived (runtime.cpp).
uint64_t shuffle(Site site, unsigned mask, uint64_t bits, ShuffleKind kind, int operand, int width);

template <class T>
T shuffle_value(Site site, unsigned mask, T value, ShuffleKind kind, int operand, int width) {
    static_assert(std::is_arithmetic<T>::value && (sizeof(T) == 4 || sizeof(T) == 8),
                  "CUDA shuffles 4- and 8-byte values (int, unsigned, float, double, ...)");
    uint64_t bits = 0;
    memcpy(&bits, &value, sizeof value);
    bits = shuffle(site, mask, bits, kind, operand, width);
    memcpy(&value, &bits, sizeof value);
    return value;
}

// The generated glue's description of one kernel (emu/signatures.rs writes these tables).
struct Param {
    const char* name;
    const char* type;  // as declared, without __restrict__
    size_t size;       // sizeof(type): what the launcher must pass
    bool pointer;      // must be null or inside a device buffer
};
struct Kernel {
    const char* name;
    const char* file;  // where it is defined
    int line;
    unsigned max_threads;  // per block: __launch_bounds__, else 1024
    unsigned param_count;
    const Param* params;
    void (*call)(void* const* args);  // args[i] points to parameter i's value
};

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::thread_idx())
#define blockIdx (::cuda_emu::block_idx())
#define blockDim (::cuda_emu::block_dim())
#define gridDim (::cuda_emu::grid_dim())

// A kernel is a plain function; device functions and data are private to their file, as without
// nvcc's relocatable device code.
#define __global__
#define __device__ static
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// One instance per kernel in a section whose bounds (__start_/__stop_cuda_emu_shared) let the
// runtime poison it at each block start. Blocks run one at a time, so one instance suffices.
#define __shared__ static __attribute__((section("cuda_emu_shared")))

// The barrier, and the shuffles with their CUDA signatures; the defaulted trailing arguments
// record the caller's position for the error messages.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::cuda_emu::sync_block({file, line, "__syncthreads"});
}

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
    return ::cuda_emu::shuffle_value({file, line, "__shfl_sync"}, mask, var, ::cuda_emu::ShuffleKind::Index,
                                     src_lane, width);
}

template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
    return ::cuda_emu::shuffle_value({file, line, "__shfl_xor_sync"}, mask, var, ::cuda_emu::ShuffleKind::Xor,
                                     lane_mask, width);
}

template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
    return ::cuda_emu::shuffle_value({file, line, "__shfl_down_sync"}, mask, var, ::cuda_emu::ShuffleKind::Down,
                                     (int)delta, width);
}

// Intrinsics: each is one IEEE operation in round-to-nearest-even, what the _rn suffix promises
// (and what makes them immune to contraction on the GPU; -ffp-contract=off does it here).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, sizeof i);
    return i;
}
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return (unsigned int)(((unsigned long long)a * b) >> 32);
}
