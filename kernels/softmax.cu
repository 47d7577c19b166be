// Row softmax, log-softmax and the fused softmax + cross-entropy (hard labels and soft targets).
// CPU twins: src/ops/softmax/cpu.rs. Rows are contiguous (n x C, row-major).
//
// Shape shared by every kernel here: ONE WARP PER ROW, 8 warps (256 threads) per block, lanes
// striding over the columns (lane, lane + 32, ...), so any C works (C = 3 uses 3 lanes, C = 1000
// gives each lane 32 columns) and rows need not be a multiple of anything. A warp reduces with
// shuffles, so no shared memory and no __syncthreads; the lane order of the butterfly is fixed,
// so results are deterministic. A row is read two or three times, but after the first pass it
// is in L1 (8 rows per block, at most 8 x 4 KB for C = 1000), so DRAM sees each byte once.
//
// The arithmetic is the CPU's: the max is subtracted before exp, p = exp(v - max) * (1 / sum),
// log-sum-exp = max + log(sum); only the order of the f32 sums differs. Built without
// --use_fast_math: expf/logf are the accurate (<= 2 ulp) versions and divisions are IEEE.
//
// Sources must compile with both nvcc and NVRTC: common.cuh is their only include (build.rs
// prepends it for NVRTC), and no host macros (INFINITY).

#include "common.cuh"

// The row this warp owns (or >= n: the whole warp returns together, so shuffles stay full-mask).
__device__ __forceinline__ long long warp_row() {
    return (long long)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
}

// Max and sum of exp(v - max) of one row, reduced over the warp (every lane gets both).
__device__ __forceinline__ void row_max_sum(const float* xr, int C, int lane, float* m_out, float* s_out) {
    float m = NEG_INF;
    for (int j = lane; j < C; j += WARP) m = fmaxf(m, xr[j]);
    m = warp_max(m);
    float s = 0.0f;
    for (int j = lane; j < C; j += WARP) s += expf(xr[j] - m);
    *m_out = m;
    *s_out = warp_sum(s);
}

// softmax_fwd_f32: y = softmax(x) per row. Reads x (twice, the second time from L1), writes y.
extern "C" __global__ void softmax_fwd_f32(const float* __restrict__ x, float* __restrict__ y, int n, int C) {
    long long row = warp_row();
    if (row >= n) return;
    int lane = threadIdx.x % WARP;
    const float* xr = x + row * C;
    float* yr = y + row * C;
    float m, s;
    row_max_sum(xr, C, lane, &m, &s);
    float inv = 1.0f / s;
    for (int j = lane; j < C; j += WARP) yr[j] = expf(xr[j] - m) * inv;
}

// softmax_bwd_f32: dx = y * (dy - <y, dy>) per row, from the forward's output y (the Jacobian
// of softmax applied to dy without forming it). Reads y, dy; writes dx (may alias dy).
extern "C" __global__ void softmax_bwd_f32(const float* y, const float* dy, float* dx, int n, int C) {
    long long row = warp_row();
    if (row >= n) return;
    int lane = threadIdx.x % WARP;
    const float* yr = y + row * C;
    const float* gr = dy + row * C;
    float* dr = dx + row * C;
    float dot = 0.0f;
    for (int j = lane; j < C; j += WARP) dot += yr[j] * gr[j];
    dot = warp_sum(dot);
    for (int j = lane; j < C; j += WARP) dr[j] = yr[j] * (gr[j] - dot);
}

// log_softmax_fwd_f32: y = x - logsumexp(x) per row. Reads x, writes y.
extern "C" __global__ void log_softmax_fwd_f32(const float* __restrict__ x, float* __restrict__ y, int n, int C) {
    long long row = warp_row();
    if (row >= n) return;
    int lane = threadIdx.x % WARP;
    const float* xr = x + row * C;
    float* yr = y + row * C;
    float m, s;
    row_max_sum(xr, C, lane, &m, &s);
    float l = m + logf(s);
    for (int j = lane; j < C; j += WARP) yr[j] = xr[j] - l;
}

// log_softmax_bwd_f32: dx = dy - exp(y) * sum(dy) per row, from the forward's output y.
// Reads y, dy; writes dx (may alias dy).
extern "C" __global__ void log_softmax_bwd_f32(const float* y, const float* dy, float* dx, int n, int C) {
    long long row = warp_row();
    if (row >= n) return;
    int lane = threadIdx.x % WARP;
    const float* yr = y + row * C;
    const float* gr = dy + row * C;
    float* dr = dx + row * C;
    float s = 0.0f;
    for (int j = lane; j < C; j += WARP) s += gr[j];
    s = warp_sum(s);
    for (int j = lane; j < C; j += WARP) dr[j] = gr[j] - expf(yr[j]) * s;
}

// cross_entropy_hard_fwd_f32: per row, loss_i = logsumexp(x_i) - x_i[t_i], and in the same pass
// the gradient of the MEAN loss, grad_ij = (exp(x_ij - l_i) - [j == t_i]) / n. The backward of
// the op is then a scale by the upstream gradient, so the logits are read once per step (the
// row re-reads hit L1). A label outside [0, C) gives a NaN row loss (the host cannot check
// device-resident labels without a copy) and no -1/n term. Reads x, labels; writes row_loss (n),
// grad (n x C). The mean of row_loss is reduce_mean_fwd_f32's job (deterministic, f64).
extern "C" __global__ void cross_entropy_hard_fwd_f32(const float* __restrict__ x, const int* __restrict__ labels,
                                                      float* __restrict__ row_loss, float* __restrict__ grad, int n,
                                                      int C) {
    long long row = warp_row();
    if (row >= n) return;
    int lane = threadIdx.x % WARP;
    const float* xr = x + row * C;
    float* gr = grad + row * C;
    float m, s;
    row_max_sum(xr, C, lane, &m, &s);
    float l = m + logf(s);
    int t = labels[row];
    bool ok = t >= 0 && t < C;
    float nf = (float)n;
    for (int j = lane; j < C; j += WARP) {
        float g = expf(xr[j] - l) / nf;
        if (j == t) g -= 1.0f / nf;
        gr[j] = g;
    }
    if (lane == 0) row_loss[row] = ok ? l - xr[t] : QNAN;
}

// cross_entropy_soft_fwd_f32: per row, loss_i = -sum_j q_ij (x_ij - l_i) for target rows q (any
// non-negative weights; MixMatch's mixed targets sum to 1), and the gradient of the mean loss,
// grad_ij = (exp(x_ij - l_i) * sum_j q_ij - q_ij) / n, in one launch. The row loss is accumulated
// in f64 (as the CPU does) because its terms can cancel. Reads x, q; writes row_loss, grad.
extern "C" __global__ void cross_entropy_soft_fwd_f32(const float* __restrict__ x, const float* __restrict__ q,
                                                      float* __restrict__ row_loss, float* __restrict__ grad, int n,
                                                      int C) {
    long long row = warp_row();
    if (row >= n) return;
    int lane = threadIdx.x % WARP;
    const float* xr = x + row * C;
    const float* qr = q + row * C;
    float* gr = grad + row * C;
    float m, s;
    row_max_sum(xr, C, lane, &m, &s);
    float l = m + logf(s);
    float qsum = 0.0f;
    for (int j = lane; j < C; j += WARP) qsum += qr[j];
    qsum = warp_sum(qsum);
    float nf = (float)n;
    double loss = 0.0;
    for (int j = lane; j < C; j += WARP) {
        float v = xr[j] - l;
        float t = qr[j];
        loss -= (double)(t * v);
        gr[j] = (expf(v) * qsum - t) / nf;
    }
    loss = warp_sum_d(loss);
    if (lane == 0) row_loss[row] = (float)loss;
}

// reduce_mean_fwd_f32: out[0] = mean of v[0..n), summed in f64 in a fixed order (thread t takes
// t, t + blockDim, ...; then a fixed shared-memory tree), so the result is deterministic. Launch
// with ONE block of 1024 threads: it is the last step of a loss (n = batch rows), not a bulk
// reduction. Reads v, writes out[0].
extern "C" __global__ void __launch_bounds__(1024) reduce_mean_fwd_f32(const float* __restrict__ v, float* __restrict__ out, int n) {
    __shared__ double part[WARP];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += (double)v[i];
    acc = warp_sum_d(acc);
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        int warps = blockDim.x / WARP;
        acc = lane < warps ? part[lane] : 0.0;
        acc = warp_sum_d(acc);
        if (lane == 0) out[0] = (float)(acc / (double)n);
    }
}

// loss_grad_bwd_f32: dx = s[0] * grad with the factor on the device (dx may alias grad): a fused
// loss's stored gradient times the upstream gradient, without a round trip to the host for the
// factor. Reads grad, s; writes dx.
extern "C" __global__ void loss_grad_bwd_f32(const float* grad, float* dx, long long n, const float* s) {
    float f = s[0];
    GRID_STRIDE(i, n) { dx[i] = f * grad[i]; }
}

// mse_fwd_f32: the mean squared error's parts, element-wise: sq = (p - q)^2 (summed by
// reduce_mean_fwd_f32) and the gradient of the mean, grad = 2 (p - q) / n, in the CPU's order
// (bit for bit; the loss's sum runs in another order). Reads p, q; writes grad, sq.
// Launch: grid-stride, block 256.
extern "C" __global__ void mse_fwd_f32(const float* __restrict__ p, const float* __restrict__ q,
                                       float* __restrict__ grad, float* __restrict__ sq, long long n) {
    const float nf = (float)n;
    GRID_STRIDE(i, n) {
        float d = __fsub_rn(p[i], q[i]);
        sq[i] = __fmul_rn(d, d);
        grad[i] = __fdiv_rn(__fmul_rn(2.0f, d), nf);
    }
}

// cross_entropy_pseudo_fwd_f32: FixMatch's unlabeled term, one warp per unlabeled image i. The
// weak view's logits w_i are only read (the pseudo-label is under stop-gradient): the largest
// probability of softmax(w_i) is 1 / sum_j exp(w_ij - max), and the pseudo-label t_i is the first
// column holding the max; the row is kept (mask_i = 1) when that probability >= tau. Then the
// strong view's cross-entropy against t_i, masked: loss_i = mask_i (lse(s_i) - s_i[t_i]), and in
// the same pass the gradient of the mean over ALL n rows (FixMatch divides by the whole batch),
// grad_ij = mask_i (exp(s_ij - lse) - [j == t_i]) * (1 / n). For logging: hit_i = mask_i [t_i ==
// truth_i] against the images' true labels. A non-finite weak row is never kept. Reads w, s,
// truth; writes row_loss, mask, hit (n each) and grad (n x C); the means are reduce_mean's.
extern "C" __global__ void cross_entropy_pseudo_fwd_f32(const float* __restrict__ w, const float* __restrict__ s,
                                                        const int* __restrict__ truth, float* __restrict__ row_loss,
                                                        float* __restrict__ mask, float* __restrict__ hit,
                                                        float* __restrict__ grad, int n, int C, float tau) {
    long long row = warp_row();
    if (row >= n) return;
    int lane = threadIdx.x % WARP;
    const float* wr = w + row * C;
    const float* sr = s + row * C;
    float* gr = grad + row * C;
    float wm, ws;
    row_max_sum(wr, C, lane, &wm, &ws);
    // The first column equal to the max: each lane's first, then the smallest over the warp.
    int t = C;
    for (int j = lane; j < C; j += WARP) {
        if (wr[j] == wm) {
            t = j;
            break;
        }
    }
    for (int o = WARP / 2; o > 0; o >>= 1) {
        int u = __shfl_xor_sync(FULL_MASK, t, o);
        t = u < t ? u : t;
    }
    bool keep = t < C && 1.0f / ws >= tau;
    float m, sum;
    row_max_sum(sr, C, lane, &m, &sum);
    float l = m + logf(sum);
    float inv_n = 1.0f / (float)n;
    for (int j = lane; j < C; j += WARP) {
        float g = 0.0f;
        if (keep) {
            g = expf(sr[j] - l) * inv_n;
            if (j == t) g -= inv_n;
        }
        gr[j] = g;
    }
    if (lane == 0) {
        row_loss[row] = keep ? l - sr[t] : 0.0f;
        mask[row] = keep ? 1.0f : 0.0f;
        hit[row] = keep && t == truth[row] ? 1.0f : 0.0f;
    }
}
