// MixMatch's label guess and MixUp on the device, so a MixMatch step keeps its batch on the GPU.
// CPU twins: src/ops/mixmatch/cpu.rs. Rows are contiguous (row-major).
//
// mix_rows_fwd_f32 and one_hot_fwd_f32 do the CPU's operations in the CPU's order with the
// __f*_rn intrinsics (no FMA contraction), so they agree bit for bit; the guess sums a row's
// powers over a warp (another order than the CPU's) and uses CUDA's powf: within f32 rounding.
//
// Sources must compile with both nvcc and NVRTC: common.cuh is their only include (build.rs
// prepends it for NVRTC), and no host macros.

#include "common.cuh"

// mixmatch_guess_fwd_f32: the sharpened average of two views' probabilities. For row i < nu:
// a = (p[i] + p[nu + i]) / 2 (p is the 2nu x C softmax of both views), q[i] = a^(1/T) / sum
// a^(1/T), with the powers taken of a / max(a) (clamped to the smallest normal) so that a
// large 1/T cannot underflow a whole row to zero. One warp per row, 8 rows per block. Reads p;
// writes q (nu x C).
extern "C" __global__ void mixmatch_guess_fwd_f32(const float* __restrict__ p, float* __restrict__ q, int nu, int C,
                                                  float inv_t) {
    long long row = (long long)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (row >= nu) return;
    const int lane = threadIdx.x % WARP;
    const float* p1 = p + row * C;
    const float* p2 = p + ((long long)nu + row) * C;
    float* qr = q + row * C;
    float m = 0.0f;
    for (int j = lane; j < C; j += WARP) m = fmaxf(m, __fmul_rn(0.5f, __fadd_rn(p1[j], p2[j])));
    m = fmaxf(warp_max(m), 1.17549435e-38f);
    float s = 0.0f;
    for (int j = lane; j < C; j += WARP) {
        float d = powf(__fdiv_rn(__fmul_rn(0.5f, __fadd_rn(p1[j], p2[j])), m), inv_t);
        qr[j] = d;
        s += d;
    }
    s = warp_sum(s);
    for (int j = lane; j < C; j += WARP) qr[j] = __fdiv_rn(qr[j], s);
}

// one_hot_fwd_f32: y[i, labels[i]] = 1, every other entry of row i 0 (a label outside [0, C)
// leaves an all-zero row). Reads labels (n, i32); writes y (n x C). Launch: grid-stride, block 256.
extern "C" __global__ void one_hot_fwd_f32(const int* __restrict__ labels, float* __restrict__ y, long long n, int C) {
    GRID_STRIDE(e, n * C) {
        long long i = e / C;
        y[e] = (e - i * C) == labels[i] ? 1.0f : 0.0f;
    }
}

// mix_rows_fwd_f32: MixUp, y[i] = mu x[i] + (1 - mu) x[perm[i]] for rows of `row` elements, in
// the CPU's order: (mu * a) + ((1 - mu) * b). Reads x, perm (rows, i32); writes y (rows x row).
// Launch: grid-stride, block 256.
extern "C" __global__ void mix_rows_fwd_f32(const float* __restrict__ x, const int* __restrict__ perm,
                                            float* __restrict__ y, long long rows, long long row, float mu) {
    const float nu = __fsub_rn(1.0f, mu);
    GRID_STRIDE(e, rows * row) {
        long long i = e / row, k = e - i * row;
        y[e] = __fadd_rn(__fmul_rn(mu, x[e]), __fmul_rn(nu, x[(long long)perm[i] * row + k]));
    }
}
