// Batch normalisation over (N, H, W) per channel, NCHW, with an optional fused LeakyReLU:
// y = act(gamma (x - mean) / sqrt(var + eps) + beta). CPU twin: src/ops/batchnorm/cpu.rs.
// "No activation" is slope = 1: act(z) = z > 0 ? z : 1 * z = z exactly, so one kernel serves both.
//
// Training forward, three launches:
//   batchnorm_stats_fwd_f32   grid (C, splits): block (ch, s) sums (x - k) and (x - k)^2 in f64
//                             over its share of the channel's N * HW elements, k = the channel's
//                             first element (a shift that keeps the one-pass variance accurate
//                             when |mean| >> std, as the CPU does), or with --sync-bn rank 0's
//                             first element, the same on every process (`shift`, given). splits is picked by the host
//                             from (N, HW) only, so the f64 partials (and the result) do not
//                             depend on the GPU. One block per channel would leave most SMs idle
//                             for the 16..512 channels of these models.
//   batchnorm_finish_fwd_f32  one thread per channel: adds its splits in order, then the CPU's
//                             formulas in f64: mean, biased var (clamped at 0), invstd, and the
//                             folded scale = gamma invstd, shift = beta - mean gamma invstd (f32).
//                             With --sync-bn the split sums are every process's (summed between
//                             the two launches) and n counts the rows of all processes.
//   batchnorm_norm_fwd_f32    elementwise y = act(x * scale + shift).
// Training backward, three launches with the same split: sums of dz and dz * xhat with
// dz = dy * act'(gamma xhat + beta) (the mask is recomputed from x, never stored), then per channel
// dgamma, dbeta and the two means, then elementwise dx = gamma invstd (dz - mean(dz) - xhat
// mean(dz xhat)). Element arithmetic uses __fmul_rn/__fadd_rn, which the compiler never contracts
// into FMAs, so xhat, the activation mask and y round exactly as the CPU's.
//
// Sources must compile with both nvcc and NVRTC: common.cuh is their only include (build.rs
// prepends it for NVRTC), and no host macros.

#include "common.cuh"

// Sum of two values over the block in a fixed order; thread 0 gets the results.
__device__ __forceinline__ void block_sum2_d(double* a, double* b) {
    __shared__ double sa[WARP], sb[WARP];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    double va = warp_sum_d(*a), vb = warp_sum_d(*b);
    if (lane == 0) {
        sa[warp] = va;
        sb[warp] = vb;
    }
    __syncthreads();
    if (warp == 0) {
        va = lane < warps ? sa[lane] : 0.0;
        vb = lane < warps ? sb[lane] : 0.0;
        *a = warp_sum_d(va);
        *b = warp_sum_d(vb);
    }
}

// The element range [begin, end) of split s of a channel's L = N * HW elements.
__device__ __forceinline__ void split_range(long long L, int s, int splits, long long* begin, long long* end) {
    *begin = L * s / splits;
    *end = L * (s + 1) / splits;
}

// The shift k of channel ch: the given one (--sync-bn: rank 0's), else the channel's first element.
__device__ __forceinline__ float bn_shift(const float* x, const float* shift, int given, int ch, int hw) {
    return given ? shift[ch] : x[(long long)ch * hw];
}

// batchnorm_first_fwd_f32: first[ch] = x[ch * HW], each channel's first element (rank 0's shifts
// under --sync-bn). Reads x; writes first (C). Launch: ceil(C / 256) blocks of 256.
extern "C" __global__ void batchnorm_first_fwd_f32(const float* __restrict__ x, float* __restrict__ first, int C,
                                                   int hw) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch < C) first[ch] = x[(long long)ch * hw];
}

// batchnorm_stats_fwd_f32: part[(ch * splits + s) * 2 + {0, 1}] = sums of (x - k), (x - k)^2
// over split s of channel ch, in f64, k = bn_shift. Element j of a channel is image j / HW, offset
// j % HW; the index walks by the block size and carries (image, offset) instead of dividing each
// time. Reads x, shift (when given); writes part. Launch: grid (C, splits), block 256.
extern "C" __global__ void batchnorm_stats_fwd_f32(const float* __restrict__ x, const float* __restrict__ shift,
                                                   double* __restrict__ part, int n, int C, int hw, int splits,
                                                   int shift_given) {
    const int ch = blockIdx.x, s = blockIdx.y;
    long long begin, end;
    split_range((long long)n * hw, s, splits, &begin, &end);
    const float k = bn_shift(x, shift, shift_given, ch, hw);
    double sum = 0.0, sq = 0.0;
    long long j = begin + threadIdx.x;
    long long img = j / hw, off = j % hw;
    const int step_img = blockDim.x / hw, step_off = blockDim.x % hw;
    for (; j < end; j += blockDim.x) {
        float d = __fsub_rn(x[(img * C + ch) * hw + off], k);
        sum += (double)d;
        sq += (double)d * (double)d;
        img += step_img;
        off += step_off;
        if (off >= hw) {
            off -= hw;
            img += 1;
        }
    }
    block_sum2_d(&sum, &sq);
    if (threadIdx.x == 0) {
        part[((long long)ch * splits + s) * 2] = sum;
        part[((long long)ch * splits + s) * 2 + 1] = sq;
    }
}

// batchnorm_finish_fwd_f32: per channel, the statistics from the split sums (in split order),
// as src/ops/batchnorm/cpu.rs batchnorm_train_fwd: mean, var, invstd (f32 outputs for the backward) and the
// folded scale / shift; n is the rows the sums cover (every process's under --sync-bn). Reads x
// or shift (the shift k, as the stats kernel), part, gamma, beta; writes mean, var, invstd,
// scale, shift (C each). Launch: ceil(C / 128) blocks of 128.
extern "C" __global__ void batchnorm_finish_fwd_f32(const float* __restrict__ x, const float* __restrict__ shift,
                                                    const double* __restrict__ part,
                                                    const float* __restrict__ gamma, const float* __restrict__ beta,
                                                    float* __restrict__ mean_out, float* __restrict__ var_out,
                                                    float* __restrict__ invstd_out, float* __restrict__ scale_out,
                                                    float* __restrict__ shift_out, int n, int C, int hw, int splits,
                                                    float eps, int shift_given) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= C) return;
    double s = 0.0, q = 0.0;
    for (int i = 0; i < splits; ++i) {
        s += part[((long long)ch * splits + i) * 2];
        q += part[((long long)ch * splits + i) * 2 + 1];
    }
    const double m = (double)n * (double)hw;
    const double mean_k = s / m;
    double var = q / m - mean_k * mean_k;
    var = var > 0.0 ? var : 0.0;
    const double mean = mean_k + (double)bn_shift(x, shift, shift_given, ch, hw);
    const double invstd = 1.0 / sqrt(var + (double)eps);
    const double g = (double)gamma[ch];
    mean_out[ch] = (float)mean;
    var_out[ch] = (float)var;
    invstd_out[ch] = (float)invstd;
    scale_out[ch] = (float)(g * invstd);
    shift_out[ch] = (float)((double)beta[ch] - mean * g * invstd);
}

// batchnorm_norm_fwd_f32: y = act(x * scale[ch] + shift[ch]), ch = (i / HW) % C, act = LeakyReLU
// with `slope` (1: identity). Reads x, scale, shift; writes y (may alias x).
extern "C" __global__ void batchnorm_norm_fwd_f32(const float* x, const float* __restrict__ scale,
                                                  const float* __restrict__ shift, float* y, long long total, int C,
                                                  int hw, float slope) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)((i / hw) % C);
        float z = __fadd_rn(__fmul_rn(x[i], scale[ch]), shift[ch]);
        y[i] = z > 0.0f ? z : __fmul_rn(slope, z);
    }
}

// batchnorm_eval_fwd_f32: y = act(x * scale + shift) with the RUNNING statistics, scale =
// gamma / sqrt(var + eps), shift = beta - mean * scale, all in f32 as src/ops/batchnorm/cpu.rs
// forward_eval (recomputed per element: two loads from L1 and a sqrt are free in a memory-bound
// kernel). Reads x, gamma, beta, mean, var; writes y (may alias x).
extern "C" __global__ void batchnorm_eval_fwd_f32(const float* x, const float* __restrict__ gamma,
                                                  const float* __restrict__ beta, const float* __restrict__ mean,
                                                  const float* __restrict__ var, float* y, long long total, int C,
                                                  int hw, float eps, float slope) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)((i / hw) % C);
        float invstd = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var[ch], eps)));
        float sc = __fmul_rn(gamma[ch], invstd);
        float sh = __fsub_rn(beta[ch], __fmul_rn(mean[ch], sc));
        float z = __fadd_rn(__fmul_rn(x[i], sc), sh);
        y[i] = z > 0.0f ? z : __fmul_rn(slope, z);
    }
}

// xhat and dz = dy * act'(gamma xhat + beta) of one element, rounded as the CPU rounds them.
__device__ __forceinline__ void bn_dz(float xv, float gv, float mean, float invstd, float g, float b, float slope,
                                      float* xh, float* dz) {
    float h = __fmul_rn(__fsub_rn(xv, mean), invstd);
    float zpre = __fadd_rn(__fmul_rn(g, h), b);
    *xh = h;
    *dz = zpre > 0.0f ? gv : __fmul_rn(gv, slope);
}

// batchnorm_reduce_bwd_f32: part[(ch * splits + s) * 2 + {0, 1}] = sums of dz and dz * xhat over
// split s of channel ch, in f64. Reads x, dy, mean, invstd, gamma, beta; writes part.
// Launch: grid (C, splits), block 256.
extern "C" __global__ void batchnorm_reduce_bwd_f32(const float* __restrict__ x, const float* __restrict__ dy,
                                                    const float* __restrict__ mean, const float* __restrict__ invstd,
                                                    const float* __restrict__ gamma, const float* __restrict__ beta,
                                                    double* __restrict__ part, int n, int C, int hw, int splits,
                                                    float slope) {
    const int ch = blockIdx.x, s = blockIdx.y;
    long long begin, end;
    split_range((long long)n * hw, s, splits, &begin, &end);
    const float mu = mean[ch], is = invstd[ch], g = gamma[ch], b = beta[ch];
    double sdz = 0.0, sdzx = 0.0;
    long long j = begin + threadIdx.x;
    long long img = j / hw, off = j % hw;
    const int step_img = blockDim.x / hw, step_off = blockDim.x % hw;
    for (; j < end; j += blockDim.x) {
        long long i = (img * C + ch) * hw + off;
        float xh, dz;
        bn_dz(x[i], dy[i], mu, is, g, b, slope, &xh, &dz);
        sdz += (double)dz;
        sdzx += (double)__fmul_rn(dz, xh);
        img += step_img;
        off += step_off;
        if (off >= hw) {
            off -= hw;
            img += 1;
        }
    }
    block_sum2_d(&sdz, &sdzx);
    if (threadIdx.x == 0) {
        part[((long long)ch * splits + s) * 2] = sdz;
        part[((long long)ch * splits + s) * 2 + 1] = sdzx;
    }
}

// batchnorm_finish_bwd_f32: per channel, dgamma = sum dz xhat, dbeta = sum dz (f32 of the f64
// sums, in split order) and coef = (mean dz, mean dz xhat) for the dx pass; n is the rows the
// sums cover (under --sync-bn, launched once on this process's sums for dgamma and dbeta and once
// on every process's, with all their rows, for coef).
// Reads part; writes dgamma, dbeta (C each), coef (2 C). Launch: ceil(C / 128) blocks of 128.
extern "C" __global__ void batchnorm_finish_bwd_f32(const double* __restrict__ part, float* __restrict__ dgamma,
                                                    float* __restrict__ dbeta, float* __restrict__ coef, int n, int C,
                                                    int hw, int splits) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= C) return;
    double sdz = 0.0, sdzx = 0.0;
    for (int i = 0; i < splits; ++i) {
        sdz += part[((long long)ch * splits + i) * 2];
        sdzx += part[((long long)ch * splits + i) * 2 + 1];
    }
    const double m = (double)n * (double)hw;
    dgamma[ch] = (float)sdzx;
    dbeta[ch] = (float)sdz;
    coef[2 * ch] = (float)(sdz / m);
    coef[2 * ch + 1] = (float)(sdzx / m);
}

// batchnorm_dx_bwd_f32: dx = (gamma invstd) (dz - mean(dz) - xhat mean(dz xhat)).
// Reads x, dy, mean, invstd, gamma, beta, coef; writes dx (may alias dy).
extern "C" __global__ void batchnorm_dx_bwd_f32(const float* x, const float* dy, const float* __restrict__ mean,
                                                const float* __restrict__ invstd, const float* __restrict__ gamma,
                                                const float* __restrict__ beta, const float* __restrict__ coef,
                                                float* dx, long long total, int C, int hw, float slope) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)((i / hw) % C);
        float g = gamma[ch], is = invstd[ch];
        float xh, dz;
        bn_dz(x[i], dy[i], mean[ch], is, g, beta[ch], slope, &xh, &dz);
        float k = __fmul_rn(g, is);
        float inner = __fsub_rn(__fsub_rn(dz, coef[2 * ch]), __fmul_rn(xh, coef[2 * ch + 1]));
        dx[i] = __fmul_rn(k, inner);
    }
}

// batchnorm_invstd_bwd_f32: invstd = 1 / sqrt(var + eps) per channel, rounded as the CPU's
// `1.0 / (var + eps).sqrt()`: the first step of the evaluation-mode backward, whose per-channel
// sums then reuse batchnorm_reduce_bwd_f32 / batchnorm_finish_bwd_f32 with the running mean.
// Reads var; writes invstd (C). Launch: ceil(C / 256) blocks of 256.
extern "C" __global__ void batchnorm_invstd_bwd_f32(const float* __restrict__ var, float* __restrict__ invstd, int C,
                                                    float eps) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch < C) invstd[ch] = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var[ch], eps)));
}

// batchnorm_eval_dx_bwd_f32: the evaluation-mode dx = dz gamma invstd (the statistics are
// constants, so no mean terms), in the CPU's order. Reads x, dy, mean, invstd, gamma, beta;
// writes dx (may alias dy). Launch: grid-stride, block 256.
extern "C" __global__ void batchnorm_eval_dx_bwd_f32(const float* x, const float* dy, const float* __restrict__ mean,
                                                     const float* __restrict__ invstd, const float* __restrict__ gamma,
                                                     const float* __restrict__ beta, float* dx, long long total, int C,
                                                     int hw, float slope) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ch = (int)((i / hw) % C);
        float g = gamma[ch], is = invstd[ch];
        float xh, dz;
        bn_dz(x[i], dy[i], mean[ch], is, g, beta[ch], slope, &xh, &dz);
        dx[i] = __fmul_rn(__fmul_rn(dz, g), is);
    }
}

// batchnorm_running_fwd_f32: running = (1 - m) running + (m batch) f, batch norm's running estimate (f
// unbiases the variance; 1 for the mean). Each product and the sum is rounded on its own
// (__fmul_rn / __fadd_rn forbid the FMA nvcc would contract it into), in the CPU's order, so the
// estimates equal the CPU's bit for bit. CPU twin: cpu::batchnorm::running_update.
extern "C" __global__ void batchnorm_running_fwd_f32(float* __restrict__ running, const float* __restrict__ batch, int n,
                                              float keep, float m, float f) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        running[i] = __fadd_rn(__fmul_rn(keep, running[i]), __fmul_rn(__fmul_rn(m, batch[i]), f));
    }
}
