// Elementwise kernels: LeakyReLU, add, scale, and dropout with a counter-based (Philox4x32-10)
// mask keyed exactly like the CPU's. CPU twins: src/ops/elementwise/cpu.rs, src/rng.rs.
//
// Shape: grid-stride loops over a flat index (64-bit, so tensors over 2^31 elements work), 256
// threads per block; each is one read and one write per element, memory-bound, nothing to fuse
// inside. Every result is a single IEEE operation per element (a multiply or an add; there is no
// a * b + c for the compiler to contract), so they equal the CPU's bit for bit.
//
// Sources must compile with both nvcc and NVRTC: common.cuh is their only include (build.rs
// prepends it for NVRTC), and no host macros.

#include "common.cuh"

// leaky_relu_fwd_f32: y = x > 0 ? x : slope * x (slope 0 is ReLU). Reads x, writes y.
extern "C" __global__ void leaky_relu_fwd_f32(const float* __restrict__ x, float* __restrict__ y, long long n,
                                              float slope) {
    GRID_STRIDE(i, n) {
        float v = x[i];
        y[i] = v > 0.0f ? v : slope * v;
    }
}

// leaky_relu_bwd_f32: dx = x > 0 ? dy : slope * dy, from the forward's INPUT x (a NaN input
// takes the slope branch, as on the CPU). Reads x, dy; writes dx (may alias dy).
extern "C" __global__ void leaky_relu_bwd_f32(const float* x, const float* dy, float* dx, long long n, float slope) {
    GRID_STRIDE(i, n) {
        float g = dy[i];
        dx[i] = x[i] > 0.0f ? g : slope * g;
    }
}

// add_fwd_f32: y = a + b (y may alias a or b). Reads a, b; writes y.
extern "C" __global__ void add_fwd_f32(const float* a, const float* b, float* y, long long n) {
    GRID_STRIDE(i, n) { y[i] = a[i] + b[i]; }
}

// scale_fwd_f32: y = s * x (y may alias x): the backward of a fused loss times its upstream.
extern "C" __global__ void scale_fwd_f32(const float* x, float* y, long long n, float s) {
    GRID_STRIDE(i, n) { y[i] = s * x[i]; }
}

// Philox4x32-10, as src/rng.rs philox4x32: counter c[0..4] (in place -> the 4 random words), key
// (k0, k1). Plain arrays, not uint4, so the source needs no vector-type header under NVRTC.
__device__ __forceinline__ void philox4x32_10(unsigned int c[4], unsigned int k0, unsigned int k1) {
    const unsigned int M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    const unsigned int W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        unsigned int hi0 = __umulhi(M0, c[0]), lo0 = M0 * c[0];
        unsigned int hi1 = __umulhi(M1, c[2]), lo1 = M1 * c[2];
        unsigned int n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = lo1;
        c[2] = n2;
        c[3] = lo0;
        k0 += W0;
        k1 += W1;
    }
}

// dropout_fwd_f32: mask_i = (u_i < p) ? 0 : keep, y_i = x_i * mask_i, keep = 1 / (1 - p)
// computed on the host in f32 as the CPU does. u_i is the CPU's Rng::new(seed, stream) i-th
// uniform(): that stream's i-th u32 is word i % 4 of Philox block i / 4 with counter
// (block lo, block hi, stream lo, stream hi) and key (seed lo, seed hi), and uniform() is
// (u32 >> 8) * 2^-24. So one thread computes one Philox block and serves 4 consecutive elements,
// and the mask equals the CPU's bit for bit at any launch shape. Reads x; writes y and mask (the
// backward multiplies by the mask: dropout_bwd_f32).
extern "C" __global__ void dropout_fwd_f32(const float* __restrict__ x, float* __restrict__ y,
                                           float* __restrict__ mask, long long n, float p, float keep,
                                           unsigned int seed_lo, unsigned int seed_hi, unsigned int stream_lo,
                                           unsigned int stream_hi) {
    long long blocks = (n + 3) / 4;
    GRID_STRIDE(blk, blocks) {
        unsigned long long b = (unsigned long long)blk;
        unsigned int words[4] = {(unsigned int)b, (unsigned int)(b >> 32), stream_lo, stream_hi};
        philox4x32_10(words, seed_lo, seed_hi);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            long long i = blk * 4 + k;
            if (i < n) {
                float u = (float)(words[k] >> 8) * (1.0f / 16777216.0f);
                float m = u < p ? 0.0f : keep;
                mask[i] = m;
                y[i] = x[i] * m;
            }
        }
    }
}

// dropout_bwd_f32: dx = dy * mask. Reads dy, mask; writes dx (may alias dy).
extern "C" __global__ void dropout_bwd_f32(const float* dy, const float* mask, float* dx, long long n) {
    GRID_STRIDE(i, n) { dx[i] = dy[i] * mask[i]; }
}
