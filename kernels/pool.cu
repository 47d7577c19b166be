// Pooling: 2 x 2 max-pool with stride 2 (floor: a trailing odd row or column is dropped) and
// global average pooling, NCHW planes. CPU twin: src/ops/pool/cpu.rs.
//
// Shape: one thread per OUTPUT element for the forwards and per INPUT element for the max-pool
// backward, which therefore writes every dx element exactly once (zeros included): no atomics,
// no separate zero fill, deterministic. The arg-max is kept as one byte per output (offset in the
// window, row-major: 0 1 / 2 3), a quarter of an index tensor's traffic.
//
// Sources must compile with both nvcc and NVRTC: common.cuh is their only include (build.rs
// prepends it for NVRTC), and no host macros.

#include "common.cuh"

// True when v replaces best: larger, or a NaN replacing a non-NaN (NaN propagates, as in
// PyTorch); ties keep the first in row-major window order. Same test as the CPU.
__device__ __forceinline__ bool takes(float v, float best) { return v > best || (v != v && best == best); }

// maxpool_fwd_f32: y = max of each 2 x 2 window, arg = its offset in the window.
// Reads x (planes x h x w); writes y, arg (planes x (h/2) x (w/2)).
extern "C" __global__ void maxpool_fwd_f32(const float* __restrict__ x, float* __restrict__ y,
                                            unsigned char* __restrict__ arg, long long planes, int h, int w) {
    const int ho = h / 2, wo = w / 2;
    const long long total = planes * ho * wo;
    GRID_STRIDE(o, total) {
        long long plane = o / ((long long)ho * wo);
        int rem = (int)(o % ((long long)ho * wo));
        int oy = rem / wo, ox = rem % wo;
        const float* r0 = x + plane * h * w + (long long)(2 * oy) * w + 2 * ox;
        const float* r1 = r0 + w;
        float best = r0[0];
        unsigned char at = 0;
        if (takes(r0[1], best)) { best = r0[1]; at = 1; }
        if (takes(r1[0], best)) { best = r1[0]; at = 2; }
        if (takes(r1[1], best)) { best = r1[1]; at = 3; }
        y[o] = best;
        arg[o] = at;
    }
}

// maxpool_bwd_f32: dx[i] = dy of i's window if i is that window's winner, else 0 (also for the
// dropped trailing row / column). Reads dy, arg; writes dx (planes x h x w), every element.
extern "C" __global__ void maxpool_bwd_f32(const float* __restrict__ dy, const unsigned char* __restrict__ arg,
                                            float* __restrict__ dx, long long planes, int h, int w) {
    const int ho = h / 2, wo = w / 2;
    const long long total = planes * h * w;
    GRID_STRIDE(i, total) {
        long long plane = i / ((long long)h * w);
        int rem = (int)(i % ((long long)h * w));
        int iy = rem / w, ix = rem % w;
        int oy = iy / 2, ox = ix / 2;
        float g = 0.0f;
        if (oy < ho && ox < wo) {
            long long o = plane * ho * wo + (long long)oy * wo + ox;
            if (arg[o] == (unsigned char)((iy % 2) * 2 + ix % 2)) g = dy[o];
        }
        dx[i] = g;
    }
}

// avgpool_fwd_f32: y[p] = mean of plane p's hw elements, one warp per plane (lanes stride over
// the plane, coalesced; a shuffle tree adds them). Reads x; writes y (planes).
// Launch: grid = ceil(planes / 8), block = 256.
extern "C" __global__ void avgpool_fwd_f32(const float* __restrict__ x, float* __restrict__ y, long long planes,
                                           int hw) {
    long long p = (long long)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (p >= planes) return;
    int lane = threadIdx.x % WARP;
    const float* xp = x + p * hw;
    float s = 0.0f;
    for (int j = lane; j < hw; j += WARP) s += xp[j];
    s = warp_sum(s);
    if (lane == 0) y[p] = s / (float)hw;
}

// avgpool_bwd_f32: dx = dy[plane] / hw over each plane. Reads dy; writes dx.
extern "C" __global__ void avgpool_bwd_f32(const float* __restrict__ dy, float* __restrict__ dx, long long planes,
                                           int hw) {
    const long long total = planes * hw;
    GRID_STRIDE(i, total) { dx[i] = dy[i / hw] / (float)hw; }
}
