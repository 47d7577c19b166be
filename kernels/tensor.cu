// The tensor layer's own kernels: in-place gradient accumulation (acc += g), what the tape does
// when two ops feed gradient into one tensor (CPU twin: `Tensor::add_assign` in
// src/tensor/mod.rs, the same single f32 add per element, so the two agree bit for bit), and a
// fill (CPU twin: `Tensor::full`), so a constant such as the backward's seed is made on the device
// instead of uploaded.
//
// Sources must compile with both nvcc and NVRTC: common.cuh is their only include (build.rs
// prepends it for NVRTC), and no host macros.

#include "common.cuh"

// add_assign_fwd_f32: acc += g. Reads acc, g; writes acc. Launch: grid-stride, block 256.
extern "C" __global__ void add_assign_fwd_f32(float* __restrict__ acc, const float* __restrict__ g, long long n) {
    GRID_STRIDE(i, n) { acc[i] += g[i]; }
}

// fill_fwd_f32: y = value. Writes y. Launch: grid-stride, block 256.
extern "C" __global__ void fill_fwd_f32(float* __restrict__ y, long long n, float value) {
    GRID_STRIDE(i, n) { y[i] = value; }
}
