// Kernels with one bug each, in the shape of a real kernel's code: what the emulator must report
// (emu/tests/emu_test.cpp runs them and checks the messages).

#include "common.cuh"

// reduce_mean_fwd_f32 without its __syncthreads: warp 0 reads the other warps' partial sums
// before they are written (poisoned shared memory: NaN) in one schedule, after in another.
extern "C" __global__ void mean_without_barrier(const float* __restrict__ v, float* __restrict__ out, int n) {
    __shared__ double part[WARP];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += (double)v[i];
    acc = warp_sum_d(acc);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) part[warp] = acc;
    if (warp == 0) {
        int warps = blockDim.x / WARP;
        acc = lane < warps ? part[lane] : 0.0;
        acc = warp_sum_d(acc);
        if (lane == 0) out[0] = (float)(acc / (double)n);
    }
}

// Lane 3 leaves before a reduction that needs all 32 lanes.
extern "C" __global__ void lane_returns_before_shuffle(const float* __restrict__ x, float* __restrict__ y) {
    if (threadIdx.x % WARP == 3) return;
    y[threadIdx.x] = warp_sum(x[threadIdx.x]);
}

// Lane 0 of each warp waits at the block barrier while the rest of its warp reduces.
extern "C" __global__ void lane_at_barrier_during_shuffle(float* __restrict__ y) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % WARP == 0) {
        __syncthreads();
    } else {
        v = warp_sum(v);
    }
    y[threadIdx.x] = v;
}

// Lane 0 exchanges at one shuffle, the other lanes at another.
extern "C" __global__ void lanes_at_different_shuffles(float* __restrict__ y) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % WARP == 0) {
        v = __shfl_xor_sync(FULL_MASK, v, 1);
    } else {
        v = __shfl_xor_sync(FULL_MASK, v, 1);
    }
    y[threadIdx.x] = v;
}

// The first two warps wait at one barrier, the others at another.
extern "C" __global__ void different_barriers(float* __restrict__ y) {
    if (threadIdx.x < 2 * WARP) {
        y[threadIdx.x] = 1.0f;
        __syncthreads();
    } else {
        __syncthreads();
        y[threadIdx.x] = 2.0f;
    }
}

// Threads past n return; the others wait at the barrier for them.
extern "C" __global__ void barrier_after_return(float* __restrict__ y, int n) {
    if ((int)threadIdx.x >= n) return;
    y[threadIdx.x] = 1.0f;
    __syncthreads();
}

// Recursion deeper than a thread's stack (each call reads its caller's frame, so it stays a call).
__device__ int deep(int n, const volatile char* caller) {
    volatile char frame[1024];
    frame[0] = (char)(caller[0] + 1);
    return n == 0 ? frame[0] : deep(n - 1, frame) + caller[0];
}
extern "C" __global__ void stack_overflow(int* __restrict__ out, int depth) {
    const volatile char start[1] = {0};
    out[threadIdx.x] = deep(depth, start);
}

// An integer division by a zero argument.
extern "C" __global__ void divide_by_zero(int* __restrict__ out, int divisor) {
    out[threadIdx.x] = (int)threadIdx.x / divisor;
}
