// Definitions every kernel file shares: the warp size, the full shuffle mask, IEEE constants
// without host macros, the grid-stride loop and the warp reductions. Each kernels/*.cu includes
// it; build.rs prepends it to each source for NVRTC (which gets no include path), so it must
// compile under nvcc and NVRTC alike: no #include, no host macros.
//
// Every reduction runs a fixed butterfly over the lanes, so its order (and result) does not
// depend on timing. All 32 lanes must take part (full-mask shuffles).
#pragma once

#define WARP 32
#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)
#define QNAN __int_as_float(0x7fc00000)

// Flat loop over [0, n) by the whole grid, with a 64-bit index (tensors over 2^31 elements work).
#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
