// The IIC mutual-information loss (docs/METHOD.md; CPU twin: src/ops/mutual_info/cpu.rs, whose
// header defines the clamp semantics this file follows exactly).
//
// Forward, for logits a, b (n x C each, row-major) and lambda:
//   1. z = softmax(a), w = softmax(b) per row, and per-PART partial sums J_p = Z_p^T W_p (C x C)
//      over a fixed range of rows: mi_softmax_joint_fwd_f32 (C <= 32, softmax and outer
//      products fused in one kernel: the logits are read once), or mi_softmax_fwd_f32 followed
//      by the register-tiled mi_joint_fwd_f32 (C > 32, where Z^T W is a real GEMM).
//   2. mi_reduce_fwd_f32: J = sum_p J_p, each entry summed in f64 in part order.
//      Determinism: the part of a row depends only on (n, C) (the host picks rows_per_part from
//      them, never from the GPU's SM count), each part is summed by one block in a fixed order,
//      and the parts are added in index order, so the same inputs give the same bits on any GPU.
//      Precision: f32 within a part (at most rows_per_part terms per entry), f64 across parts.
//   3. mi_finish_fwd_f32 (one block, O(C^2)): S = (J + J^T) / 2, s = sum S, P = S / s, marginals
//      m from P before the clamp, P' and m' clamped at EPS, H(P'), the marginal entropy, the loss
//      H(P') - 2 lambda H_m, and the gradient matrix G^ = G - <P, G> (all in f64, as the CPU).
// Backward, for an upstream scalar g: with scale = g / s,
//   grad_a_i = scale * z_i * (u_i - <z_i, u_i>), u_i = w_i G^   (and a <-> b, z <-> w swapped):
//   mi_bwd_f32 for C <= 32 (G^ in shared memory, one warp per row, both views in one pass), or
//   mi_project_bwd_f32 (tiled U = Q G^ for both views, written into the gradient buffers) and
//   mi_softmax_bwd_f32 (the row-wise softmax backward, in place) for C > 32.
//
// Sources must compile with both nvcc and NVRTC: common.cuh is their only include (build.rs
// prepends it for NVRTC), and no host macros.

#include "common.cuh"

#define MI_EPS 2.220446049250313e-16  // f64 machine epsilon, as IIC (and the CPU) clamp at

// Largest C of the fused kernels (one class per lane of a warp).
#define MI_FUSED_MAX_C 32
// Rows staged in shared memory per step of the fused forward (4 per warp).
#define MI_FUSED_ROWS 32
// Register tile of the GEMM-shaped kernels: 64 x 64 outputs per block of 16 x 16 threads, each
// thread 4 x 4 outputs, K consumed 16 at a time.
#define TILE 64
#define TILE_K 16

__device__ __forceinline__ long long lmin(long long a, long long b) { return a < b ? a : b; }

// Sum over the block, in a fixed order (warp butterflies, then warp 0 over the warp partials);
// every thread gets the result. `scratch` holds WARP doubles; blockDim.x a multiple of 32.
__device__ double block_sum_d(double v, double* scratch) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    v = warp_sum_d(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0;
    return warp_sum_d(v);
}

// Softmax of one row with C <= 32 held one class per lane: returns this lane's probability
// (0 for lanes >= C). Same arithmetic as the CPU: exp(v - max) * (1 / sum).
__device__ __forceinline__ float lane_softmax(const float* xr, int C, int lane) {
    float v = lane < C ? xr[lane] : NEG_INF;
    float m = warp_max(v);
    float e = lane < C ? expf(v - m) : 0.0f;
    float s = warp_sum(e);
    return e * (1.0f / s);
}

// Softmax of one row of any C by a warp (lanes stride over the columns), written to out.
__device__ __forceinline__ void warp_softmax_row(const float* xr, float* out, int C, int lane) {
    float m = NEG_INF;
    for (int j = lane; j < C; j += WARP) m = fmaxf(m, xr[j]);
    m = warp_max(m);
    float s = 0.0f;
    for (int j = lane; j < C; j += WARP) s += expf(xr[j] - m);
    float inv = 1.0f / warp_sum(s);
    for (int j = lane; j < C; j += WARP) out[j] = expf(xr[j] - m) * inv;
}

// mi_softmax_joint_fwd_f32 (C <= 32): block p owns rows [p R, min(n, p R + R)), R =
// rows_per_part. Each step, its 8 warps softmax 32 rows of both views (one class per lane),
// write z and w, and stage them in shared memory; then every thread adds those rows' products to
// its (at most 4) entries of the C x C partial sum, held in registers across the whole part.
// The logits are read once and z, w written once: the kernel runs at memory speed for small C.
// Writes z, w (n x C) and partials[p] (C x C, f32). Launch: grid = parts, block = 256.
extern "C" __global__ void mi_softmax_joint_fwd_f32(const float* __restrict__ a, const float* __restrict__ b,
                                                    float* __restrict__ z, float* __restrict__ w,
                                                    float* __restrict__ partials, int n, int C,
                                                    int rows_per_part) {
    __shared__ float zs[MI_FUSED_ROWS][MI_FUSED_MAX_C];
    __shared__ float ws[MI_FUSED_ROWS][MI_FUSED_MAX_C];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, warps = blockDim.x / WARP;
    const int CC = C * C;
    long long begin = (long long)blockIdx.x * rows_per_part;
    long long end = lmin(n, begin + rows_per_part);
    // This thread's entries e = tid + k * blockDim (k < 4 covers C^2 <= 1024 with 256 threads).
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int ex[4], ey[4];
    for (int k = 0; k < 4; ++k) {
        int e = threadIdx.x + k * blockDim.x;
        ex[k] = e < CC ? e / C : 0;
        ey[k] = e < CC ? e % C : 0;
    }
    for (long long r0 = begin; r0 < end; r0 += MI_FUSED_ROWS) {
        int rows = (int)lmin(MI_FUSED_ROWS, end - r0);
        for (int r = warp; r < rows; r += warps) {
            long long row = r0 + r;
            float zv = lane_softmax(a + row * C, C, lane);
            float wv = lane_softmax(b + row * C, C, lane);
            if (lane < C) {
                z[row * C + lane] = zv;
                w[row * C + lane] = wv;
                zs[r][lane] = zv;
                ws[r][lane] = wv;
            }
        }
        __syncthreads();
        for (int k = 0; k < 4; ++k) {
            if (threadIdx.x + k * blockDim.x < CC) {
                float s = acc[k];
                for (int r = 0; r < rows; ++r) s += zs[r][ex[k]] * ws[r][ey[k]];
                acc[k] = s;
            }
        }
        __syncthreads();
    }
    float* out = partials + (long long)blockIdx.x * CC;
    for (int k = 0; k < 4; ++k) {
        int e = threadIdx.x + k * blockDim.x;
        if (e < CC) out[e] = acc[k];
    }
}

// mi_softmax_fwd_f32 (C > 32): z = softmax(a), w = softmax(b), one warp per row (both views).
// Reads a, b; writes z, w. Launch: grid = ceil(n / 8), block = 256.
extern "C" __global__ void mi_softmax_fwd_f32(const float* __restrict__ a, const float* __restrict__ b,
                                              float* __restrict__ z, float* __restrict__ w, int n, int C) {
    long long row = (long long)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (row >= n) return;
    int lane = threadIdx.x % WARP;
    warp_softmax_row(a + row * C, z + row * C, C, lane);
    warp_softmax_row(b + row * C, w + row * C, C, lane);
}

// The 64 x 64 register tile shared by the GEMM-shaped kernels: acc[i][j] += As[k][ty + 16 i] *
// Bs[k][tx + 16 j] over the staged K slice. The strided (not blocked) ownership keeps both
// shared-memory reads conflict-free (As: 2 addresses per warp, broadcast; Bs: 16 consecutive
// words) and makes the global stores of a row coalesced (consecutive tx, consecutive columns).
__device__ __forceinline__ void tile_fma(const float (*As)[TILE + 1], const float (*Bs)[TILE], float acc[4][4], int tx,
                                         int ty) {
#pragma unroll
    for (int k = 0; k < TILE_K; ++k) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = As[k][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = Bs[k][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
}

// mi_joint_fwd_f32 (C > 32): partials[p][x][y] = sum over the rows r of part p of z[r][x] w[r][y],
// i.e. Z_p^T W_p, as a register-tiled GEMM: block (tile, p) computes a 64 x 64 output tile,
// staging 16 rows of the z and w column slices in shared memory per step (both loads coalesced:
// 64 consecutive floats of a row). Grid: x = parts, y = tiles * tiles (tiles = ceil(C / 64));
// block = 256. Reads z, w; writes partials (parts x C x C, f32).
extern "C" __global__ void mi_joint_fwd_f32(const float* __restrict__ z, const float* __restrict__ w,
                                            float* __restrict__ partials, int n, int C, int rows_per_part) {
    __shared__ float As[TILE_K][TILE + 1];
    __shared__ float Bs[TILE_K][TILE];
    const int tiles = (C + TILE - 1) / TILE;
    const int x0 = (blockIdx.y / tiles) * TILE, y0 = (blockIdx.y % tiles) * TILE;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    long long begin = (long long)blockIdx.x * rows_per_part;
    long long end = lmin(n, begin + rows_per_part);
    float acc[4][4] = {};
    for (long long r0 = begin; r0 < end; r0 += TILE_K) {
        for (int idx = threadIdx.x; idx < TILE_K * TILE; idx += blockDim.x) {
            int k = idx / TILE, col = idx % TILE;
            long long r = r0 + k;
            bool rok = r < end;
            As[k][col] = (rok && x0 + col < C) ? z[r * C + x0 + col] : 0.0f;
            Bs[k][col] = (rok && y0 + col < C) ? w[r * C + y0 + col] : 0.0f;
        }
        __syncthreads();
        tile_fma(As, Bs, acc, tx, ty);
        __syncthreads();
    }
    float* out = partials + (long long)blockIdx.x * C * C;
    for (int i = 0; i < 4; ++i) {
        int x = x0 + ty + 16 * i;
        if (x >= C) continue;
        for (int j = 0; j < 4; ++j) {
            int y = y0 + tx + 16 * j;
            if (y < C) out[(long long)x * C + y] = acc[i][j];
        }
    }
}

// mi_reduce_fwd_f32: j[e] = sum_p partials[p][e] in f64, p = 0, 1, ... in order (one thread per
// entry; consecutive threads read consecutive entries). Reads partials, writes j (C x C, f64).
extern "C" __global__ void mi_reduce_fwd_f32(const float* __restrict__ partials, double* __restrict__ j, int parts,
                                             int CC) {
    int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= CC) return;
    double s = 0.0;
    for (int p = 0; p < parts; ++p) s += (double)partials[(long long)p * CC + e];
    j[e] = s;
}

// mi_finish_fwd_f32: the O(C^2) scalar work, in f64, by ONE block (launch 1 x 1024): at C = 10
// that is 100 entries, at C = 1000 a million, still well under a millisecond; a grid-wide version
// would need more launches for its reductions. Follows src/ops/mutual_info/cpu.rs joint_terms step
// by step (same formulas, same clamp rules; only the order of the f64 block sums differs).
//   in:  j (C x C): the joint counts J. It is then reused as scratch for G (f64).
//   out: p (C x C, f64): P before the clamp; vec (3 C, f64): ln m', k = lambda r / m, r;
//        g0 (C x C, f32): G - (2 lambda - 1); g_hat (C x C, f32): G - <P, G>;
//        stats (f64): [loss, H(P'), marginal entropy, s, #clamped P, #clamped m, <P, G>];
//        loss[0] (f32).
extern "C" __global__ void __launch_bounds__(1024) mi_finish_fwd_f32(double* __restrict__ j, double* __restrict__ p, double* __restrict__ vec,
                                             float* __restrict__ g0, float* __restrict__ g_hat,
                                             double* __restrict__ stats, float* __restrict__ loss, int C,
                                             float lambda_f) {
    __shared__ double scratch[WARP];
    const int CC = C * C;
    const double lambda = (double)lambda_f;
    double* ln_m = vec;
    double* kk = vec + C;
    double* r = vec + 2 * C;
    // S = (J + J^T) / 2 (exactly symmetric: both halves add the same two numbers) and s.
    double acc = 0.0;
    for (int e = threadIdx.x; e < CC; e += blockDim.x) {
        int x = e / C, y = e % C;
        double v = 0.5 * (j[x * C + y] + j[y * C + x]);
        p[e] = v;
        acc += v;
    }
    const double s = block_sum_d(acc, scratch);  // (its internal barrier also orders p's writes)
    __syncthreads();
    for (int e = threadIdx.x; e < CC; e += blockDim.x) p[e] /= s;
    __syncthreads();
    // Per class: marginal m (row sum of P before the clamp, in column order as the CPU), row sum
    // r of the clamped P', ln m' and the marginal-path factor k = lambda r / m (0 when clamped).
    double hm = 0.0, nm = 0.0;
    for (int x = threadIdx.x; x < C; x += blockDim.x) {
        double m = 0.0, rc = 0.0;
        for (int y = 0; y < C; ++y) {
            double v = p[x * C + y];
            m += v;
            rc += v < MI_EPS ? MI_EPS : v;
        }
        double lm = m < MI_EPS ? log(MI_EPS) : log(m);
        ln_m[x] = lm;
        kk[x] = m < MI_EPS ? 0.0 : lambda * rc / m;
        r[x] = rc;
        hm -= rc * lm;
        nm += m < MI_EPS ? 1.0 : 0.0;
    }
    const double marginal_entropy = block_sum_d(hm, scratch);
    const double clamped_m = block_sum_d(nm, scratch);
    __syncthreads();
    // G_cd = [P_cd >= EPS] (-ln P_cd - 1 + lambda ln m'_c + lambda ln m'_d) + k_c + k_d, H(P'),
    // and <P, G>. G goes to j (scratch) for the centring pass.
    double hp = 0.0, pg = 0.0, np = 0.0;
    for (int e = threadIdx.x; e < CC; e += blockDim.x) {
        int x = e / C, y = e % C;
        double pv = p[e];
        double pc = pv < MI_EPS ? MI_EPS : pv;
        hp -= pc * log(pc);
        double direct = pv < MI_EPS ? 0.0 : -log(pv) - 1.0 + lambda * (ln_m[x] + ln_m[y]);
        double g = direct + kk[x] + kk[y];
        j[e] = g;
        pg += pv * g;
        np += pv < MI_EPS ? 1.0 : 0.0;
    }
    const double joint_entropy = block_sum_d(hp, scratch);
    const double p_dot_g = block_sum_d(pg, scratch);
    const double clamped_p = block_sum_d(np, scratch);
    __syncthreads();
    const double shift = 2.0 * lambda - 1.0;
    for (int e = threadIdx.x; e < CC; e += blockDim.x) {
        double g = j[e];
        g0[e] = (float)(g - shift);
        g_hat[e] = (float)(g - p_dot_g);
    }
    if (threadIdx.x == 0) {
        double l = joint_entropy - 2.0 * lambda * marginal_entropy;
        stats[0] = l;
        stats[1] = joint_entropy;
        stats[2] = marginal_entropy;
        stats[3] = s;
        stats[4] = clamped_p;
        stats[5] = clamped_m;
        stats[6] = p_dot_g;
        loss[0] = (float)l;
    }
}

// mi_bwd_f32 (C <= 32): both views' logit gradients in one pass, one warp per row, class = lane.
// G^ (C x C) is staged in shared memory once per block; u = w_i G^ takes w's entries from the
// other lanes by shuffle, so a row costs C^2 FMAs per view and no extra memory traffic.
// grad_a = scale z (u_a - <z, u_a>), u_a = w G^; grad_b = scale w (u_b - <w, u_b>), u_b = z G^;
// scale = upstream[0] / s with s = stats[3]; both device-resident (the loss's upstream gradient
// is read where the tape left it, so the backward needs no host round trip).
// Reads z, w, g_hat, stats, upstream; writes grad_a, grad_b. Launch: grid = ceil(n / 8), block = 256.
extern "C" __global__ void mi_bwd_f32(const float* __restrict__ z, const float* __restrict__ w,
                                      const float* __restrict__ g_hat, const double* __restrict__ stats,
                                      const float* __restrict__ upstream, float* __restrict__ grad_a,
                                      float* __restrict__ grad_b, int n, int C) {
    __shared__ float gs[MI_FUSED_MAX_C * MI_FUSED_MAX_C];
    for (int e = threadIdx.x; e < C * C; e += blockDim.x) gs[e] = g_hat[e];
    __syncthreads();
    long long row = (long long)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (row >= n) return;
    const int lane = threadIdx.x % WARP;
    const float scale = (float)((double)upstream[0] / stats[3]);
    float zv = lane < C ? z[row * C + lane] : 0.0f;
    float wv = lane < C ? w[row * C + lane] : 0.0f;
    float ua = 0.0f, ub = 0.0f;
    for (int x = 0; x < C; ++x) {
        float wx = __shfl_sync(FULL_MASK, wv, x);
        float zx = __shfl_sync(FULL_MASK, zv, x);
        float g = lane < C ? gs[x * C + lane] : 0.0f;
        ua += wx * g;
        ub += zx * g;
    }
    float da = warp_sum(zv * ua);
    float db = warp_sum(wv * ub);
    if (lane < C) {
        grad_a[row * C + lane] = scale * zv * (ua - da);
        grad_b[row * C + lane] = scale * wv * (ub - db);
    }
}

// mi_project_bwd_f32 (C > 32): u_a = W G^ into grad_a and u_b = Z G^ into grad_b (n x C each),
// the two n x C by C x C products of the backward, as the same 64 x 64 register tile as
// mi_joint_fwd_f32. The Q slice (64 rows x 16 classes) is stored transposed in shared memory
// (padded row: at most 2-way bank conflicts) so the inner loop is identical. Grid: x =
// ceil(n / 64), y = ceil(C / 64), z = 2 (view); block = 256. Reads z, w, g_hat; writes grad_a,
// grad_b.
extern "C" __global__ void mi_project_bwd_f32(const float* __restrict__ z, const float* __restrict__ w,
                                              const float* __restrict__ g_hat, float* __restrict__ grad_a,
                                              float* __restrict__ grad_b, int n, int C) {
    __shared__ float As[TILE_K][TILE + 1];
    __shared__ float Bs[TILE_K][TILE];
    const float* q = blockIdx.z == 0 ? w : z;
    float* u = blockIdx.z == 0 ? grad_a : grad_b;
    const long long r0 = (long long)blockIdx.x * TILE;
    const int c0 = blockIdx.y * TILE;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < C; k0 += TILE_K) {
        for (int idx = threadIdx.x; idx < TILE_K * TILE; idx += blockDim.x) {
            // q: 64 rows x 16 classes (16 consecutive floats per row), stored As[class][row].
            int rr = idx / TILE_K, kk = idx % TILE_K;
            long long r = r0 + rr;
            As[kk][rr] = (r < n && k0 + kk < C) ? q[r * C + k0 + kk] : 0.0f;
            // g_hat: 16 classes x 64 columns (coalesced).
            int k = idx / TILE, col = idx % TILE;
            Bs[k][col] = (k0 + k < C && c0 + col < C) ? g_hat[(long long)(k0 + k) * C + c0 + col] : 0.0f;
        }
        __syncthreads();
        tile_fma(As, Bs, acc, tx, ty);
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        long long r = r0 + ty + 16 * i;
        if (r >= n) continue;
        for (int j = 0; j < 4; ++j) {
            int c = c0 + tx + 16 * j;
            if (c < C) u[r * C + c] = acc[i][j];
        }
    }
}

// mi_softmax_bwd_f32 (C > 32): in place, grad = scale * p * (u - <p, u>) per row with u the
// projection mi_project_bwd_f32 left in grad (p = z for view a, w for view b), one warp per row,
// both views. Reads z, w, grad_a, grad_b, stats, upstream; writes grad_a, grad_b.
extern "C" __global__ void mi_softmax_bwd_f32(const float* __restrict__ z, const float* __restrict__ w,
                                              const double* __restrict__ stats, const float* __restrict__ upstream,
                                              float* grad_a, float* grad_b, int n, int C) {
    long long row = (long long)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (row >= n) return;
    const int lane = threadIdx.x % WARP;
    const float scale = (float)((double)upstream[0] / stats[3]);
    for (int view = 0; view < 2; ++view) {
        const float* pr = (view == 0 ? z : w) + row * C;
        float* gr = (view == 0 ? grad_a : grad_b) + row * C;
        float dot = 0.0f;
        for (int c = lane; c < C; c += WARP) dot += pr[c] * gr[c];
        dot = warp_sum(dot);
        for (int c = lane; c < C; c += WARP) gr[c] = scale * pr[c] * (gr[c] - dot);
    }
}
