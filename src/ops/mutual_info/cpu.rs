//! The IIC mutual-information loss (METHOD.md, "The IIC mutual-information loss (exact)") on
//! plain slices: one pass of fused softmax + joint reduction, the O(C^2) scalar work in f64, and
//! one pass of backward (both views' C x C products and softmax backward per row).
//!
//! Semantics of the clamp, as IIC's `IID_losses.py` gets them from PyTorch autograd: P and the
//! marginals m are computed unclamped; then P_cd < EPS is replaced by the constant EPS and m_c < EPS
//! by the constant EPS. A replaced entry therefore passes no gradient on its direct path (neither
//! through `P ln P` nor through the `P ln m` factor), but it still feeds the unclamped marginals,
//! which pass gradient back to every entry of their row and column. With
//! r_c = sum_d P'_cd (row sums of the clamped P') and k_c = lambda r_c / m_c (0 when m_c is
//! clamped), the exact gradient with respect to the unclamped P is
//!
//! ```text
//! G_cd = [P_cd >= EPS] (-ln P_cd - 1 + lambda ln m'_c + lambda ln m'_d) + k_c + k_d
//! ```
//!
//! which is METHOD.md's G = -ln P + lambda ln m_c + lambda ln m_d + (2 lambda - 1) whenever nothing
//! is clamped (then r = m and k = lambda). The clamped cases differ from that formula only by
//! terms whose effect on the logits is below EPS-scale, but the kernels follow the exact form.

use crate::cpu::gemm::{sgemm, Mat};
use crate::cpu::simd;
use crate::multiversion;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod wide;

/// The clamp floor of P and of the marginals: f64 machine epsilon, as in IIC.
pub const EPS: f64 = f64::EPSILON;

/// Rows per parallel work item of the backward and (at least) of the forward.
const CHUNK_ROWS: usize = 1024;

/// Upper bound on the f32 elements held by the partial C x C products before their f64 sum.
const MAX_PARTIAL_ELEMS: usize = 1 << 22;

/// What the forward pass computes and the backward pass needs.
#[derive(Debug, Clone)]
pub struct MiForward {
    /// L_mi(lambda) = -sum_cd P'_cd (ln P'_cd - lambda ln m'_c - lambda ln m'_d), P', m' clamped.
    pub loss: f32,
    /// H(P') = -sum_cd P'_cd ln P'_cd over the clamped joint.
    pub joint_entropy: f64,
    /// -sum_c r_c ln m'_c with r the row sums of P' (= H(m) when nothing is clamped), so that
    /// `loss = joint_entropy - 2 lambda marginal_entropy` holds exactly.
    pub marginal_entropy: f64,
    /// The sum of the symmetrised joint counts S (= n up to rounding) that P is normalised by.
    pub s: f64,
    /// softmax(logits_a), n x C in the kernels' storage order (see `blocked()`; `z_rows()` gives
    /// the plain row-major matrix).
    pub z: Vec<f32>,
    /// softmax(logits_b), stored as `z`.
    pub w: Vec<f32>,
    // Rows per class-major block of z and w (`blocked()`), 0 for row-major: the AVX-512 (16)
    // and AVX2 (8) kernels keep a block's classes in registers, one row per lane (for C <= 16
    // this order spares the backward a transpose; the wide kernels' forward transposes into it
    // once). Private: the backward's unsafe path relies on it.
    block: usize,
    /// The joint P = S / s before the clamp, C x C.
    pub p: Vec<f64>,
    /// G - (2 lambda - 1), C x C: -ln P_cd + lambda ln m_c + lambda ln m_d with the clamp applied as
    /// described in the module docs (a clamped entry keeps only its marginal-path gradient).
    pub g0: Vec<f32>,
    /// G^ = G - <P, G> (= g0 - <P, g0>), C x C: dL/dS * s. The backward multiplies by this centred
    /// matrix; the constant shift cancels in the softmax backward but centring keeps the f32 products
    /// small when G is nearly constant (uniform outputs).
    pub g_hat: Vec<f32>,
    /// How many entries of P were below EPS.
    pub clamped: usize,
    /// How many marginals were below EPS.
    pub clamped_marginals: usize,
}

impl MiForward {
    /// Whether `z` and `w` are stored in class-major blocks of `block_rows()` rows (the SIMD
    /// kernels' order: each whole block of B rows holds class x of its row r at B x + r; the rows
    /// after the last whole block are row-major) rather than row-major.
    pub fn blocked(&self) -> bool {
        self.block > 0
    }

    /// Rows per class-major block of `z` and `w`: 16 (AVX-512), 8 (AVX2) or 0 (row-major).
    pub fn block_rows(&self) -> usize {
        self.block
    }

    /// softmax(logits_a) as a row-major n x C matrix.
    pub fn z_rows(&self) -> Vec<f32> {
        self.rows(&self.z)
    }

    /// softmax(logits_b) as a row-major n x C matrix.
    pub fn w_rows(&self) -> Vec<f32> {
        self.rows(&self.w)
    }

    fn rows(&self, stored: &[f32]) -> Vec<f32> {
        let mut out = stored.to_vec();
        let c = self.g0.len().isqrt();
        let b = self.block;
        if b > 0 {
            let whole = stored.len() / (b * c) * b * c;
            for (o, blk) in out[..whole].chunks_exact_mut(b * c).zip(stored.chunks_exact(b * c)) {
                for r in 0..b {
                    for x in 0..c {
                        o[r * c + x] = blk[x * b + r];
                    }
                }
            }
        }
        out
    }
}

impl Drop for MiForward {
    /// The n x C softmax buffers go back to the pool: a training step reuses them next time.
    fn drop(&mut self) {
        crate::pool::give(std::mem::take(&mut self.z));
        crate::pool::give(std::mem::take(&mut self.w));
    }
}

/// Rows per partial product in the forward: a function of (n, c) only, so the f64 reduction order,
/// and with it the result, does not depend on the thread count. A multiple of the backward's
/// CHUNK_ROWS, so that only the last chunk of either pass ends in rows after its last whole
/// class-major block (the blocked storage order is the same whichever pass cut the rows).
fn forward_chunk_rows(n: usize, c: usize) -> usize {
    chunk_rows_under(n, c, MAX_PARTIAL_ELEMS)
}

/// `forward_chunk_rows` with the partial products capped at `max_partial_elems` f32 in all.
fn chunk_rows_under(n: usize, c: usize, max_partial_elems: usize) -> usize {
    let max_parts = (max_partial_elems / (c * c)).max(1);
    n.div_ceil(max_parts).next_multiple_of(CHUNK_ROWS)
}

/// Loss and everything the backward needs, from the logits of both views (n x C each, row-major).
pub fn mi_fwd(logits_a: &[f32], logits_b: &[f32], n: usize, c: usize, lambda: f32) -> MiForward {
    let local = |_: &mut [f64]| Ok(());
    match mi_fwd_reduced(logits_a, logits_b, n, c, lambda, &local) {
        Ok(f) => f,
        Err(_) => unreachable!("the local reduction cannot fail"),
    }
}

/// [`mi_fwd`] with the joint counts J = Z^T W (C x C, f64) passed through `reduce` before the
/// entropies: in a data-parallel run it sums them over the processes, so that the loss is that of
/// the whole batch's joint (each process holding its rows' softmaxes for the backward).
pub fn mi_fwd_reduced(
    logits_a: &[f32],
    logits_b: &[f32],
    n: usize,
    c: usize,
    lambda: f32,
    reduce: &dyn Fn(&mut [f64]) -> crate::error::Result<()>,
) -> crate::error::Result<MiForward> {
    forward_in_chunks((logits_a, logits_b), n, c, lambda, reduce, forward_chunk_rows(n, c))
}

/// `mi_fwd_reduced` over chunks of `rows` rows.
fn forward_in_chunks(
    (logits_a, logits_b): (&[f32], &[f32]),
    n: usize,
    c: usize,
    lambda: f32,
    reduce: &dyn Fn(&mut [f64]) -> crate::error::Result<()>,
    rows: usize,
) -> crate::error::Result<MiForward> {
    debug_assert!(n >= 1 && c >= 1);
    debug_assert!(logits_a.len() == n * c && logits_b.len() == n * c);
    let (mut z, mut w) = (crate::pool::take(n * c), crate::pool::take(n * c));
    let step = rows * c;
    // One pass: each chunk's softmax is written and reduced into its partial J = Z^T W while its
    // rows are in cache; the partials are summed in f64 in chunk order. The partials come from
    // the pool and the wide-head kernels' scratch is one per rayon work split, not per chunk:
    // fresh buffers per chunk cost page faults whenever the allocator had given their pages back.
    let scratch_len = if wide_heads(c) { wide_scratch_len(c) } else { 0 };
    let mut partials = crate::pool::take(n.div_ceil(rows) * c * c);
    partials
        .par_chunks_mut(c * c)
        .zip(z.par_chunks_mut(step).zip(w.par_chunks_mut(step)))
        .zip(logits_a.par_chunks(step).zip(logits_b.par_chunks(step)))
        .for_each_init(
            || vec![0.0f32; scratch_len],
            |scratch, ((j, (zc, wc)), (ac, bc))| {
                j.fill(0.0);
                forward_chunk_best(ac, bc, c, (zc, wc), j, scratch);
            },
        );
    let mut j = vec![0.0f64; c * c];
    for part in partials.chunks_exact(c * c) {
        for (acc, &v) in j.iter_mut().zip(part) {
            *acc += v as f64;
        }
    }
    crate::pool::give(partials);
    reduce(&mut j)?;
    let mut out = joint_terms(&j, c, lambda as f64);
    out.z = z;
    out.w = w;
    out.block = block_rows(c);
    Ok(out)
}

/// Lanes of the padded fast path: rows of up to this many classes live in one AVX-512 register.
const LANES: usize = simd::LANES;

multiversion! {
    /// Softmax of one chunk of both views into `z`, `w`, and their joint counts sum_i z_i w_i^T
    /// added to `j` (C x C).
    fn forward_chunk(a: &[f32], b: &[f32], c: usize, z: &mut [f32], w: &mut [f32], j: &mut [f32]) {
        softmax_rows(a, c, z);
        softmax_rows(b, c, w);
        if c <= LANES {
            // Padded rows: each row of J is one 16-lane FMA per image.
            let mut acc = [[0.0f32; LANES]; LANES];
            for (zr, wr) in z.chunks_exact(c).zip(w.chunks_exact(c)) {
                let mut wp = [0.0f32; LANES];
                wp[..c].copy_from_slice(wr);
                for (row, &zx) in acc.iter_mut().zip(zr) {
                    for (a, &wy) in row.iter_mut().zip(&wp) {
                        *a += zx * wy;
                    }
                }
            }
            for (jr, row) in j.chunks_exact_mut(c).zip(&acc) {
                jr.copy_from_slice(&row[..c]);
            }
        } else {
            // Wide C: the joint update is a real product (C^2 MACs per image), so the GEMM.
            sgemm(c, c, z.len() / c, Mat::t(z), Mat::n(w), j, false, 1);
        }
    }
}

/// Row softmax: `simd::softmax_row` per row, inlined into the multiversioned callers.
#[inline(always)]
fn softmax_rows(x: &[f32], c: usize, y: &mut [f32]) {
    for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        simd::softmax_row(xr, yr);
    }
}

/// The O(C^2) part of the forward, from the f64 joint counts J (C x C).
fn joint_terms(j: &[f64], c: usize, lambda: f64) -> MiForward {
    // S = (J + J^T) / 2 is exactly symmetric: both halves add the same two numbers.
    let mut p = vec![0.0f64; c * c];
    let mut s = 0.0f64;
    for x in 0..c {
        for y in 0..c {
            let v = 0.5 * (j[x * c + y] + j[y * c + x]);
            p[x * c + y] = v;
            s += v;
        }
    }
    p.iter_mut().for_each(|v| *v /= s);
    // Marginals from P before the clamp.
    let m: Vec<f64> = p.chunks(c).map(|r| r.iter().sum()).collect();
    let pc: Vec<f64> = p.iter().map(|&v| if v < EPS { EPS } else { v }).collect();
    let ln_m: Vec<f64> = m.iter().map(|&v| if v < EPS { EPS.ln() } else { v.ln() }).collect();
    let r: Vec<f64> = pc.chunks(c).map(|row| row.iter().sum()).collect();
    let joint_entropy = -pc.iter().map(|&v| v * v.ln()).sum::<f64>();
    let marginal_entropy = -r.iter().zip(&ln_m).map(|(&rc, &l)| rc * l).sum::<f64>();
    let loss = joint_entropy - 2.0 * lambda * marginal_entropy;
    // Marginal path: dL/dm_c = lambda r_c / m_c from the row factor; the column factor gives the
    // same by symmetry. A clamped marginal is a constant and passes nothing.
    let k: Vec<f64> = m.iter().zip(&r).map(|(&mc, &rc)| if mc < EPS { 0.0 } else { lambda * rc / mc }).collect();
    let mut g = vec![0.0f64; c * c];
    for x in 0..c {
        for y in 0..c {
            let pv = p[x * c + y];
            let direct = if pv < EPS { 0.0 } else { -pv.ln() - 1.0 + lambda * (ln_m[x] + ln_m[y]) };
            g[x * c + y] = direct + k[x] + k[y];
        }
    }
    let pg: f64 = p.iter().zip(&g).map(|(a, b)| a * b).sum();
    let shift = 2.0 * lambda - 1.0;
    MiForward {
        loss: loss as f32,
        joint_entropy,
        marginal_entropy,
        s,
        z: Vec::new(),
        w: Vec::new(),
        block: 0,
        g0: g.iter().map(|&v| (v - shift) as f32).collect(),
        g_hat: g.iter().map(|&v| (v - pg) as f32).collect(),
        clamped: p.iter().filter(|&&v| v < EPS).count(),
        clamped_marginals: m.iter().filter(|&&v| v < EPS).count(),
        p,
    }
}

multiversion! {
    /// Both views' logit gradients for one chunk of rows: with u = G^ w_i (G^ is symmetric),
    /// grad_a_i = scale * z_i * (u - <z_i, u>), and the same for b with z and w swapped.
    fn backward_chunk(z: &[f32], w: &[f32], g_hat: &[f32], c: usize, scale: f32, ga: &mut [f32], gb: &mut [f32]) {
        let rows = z.chunks_exact(c).zip(w.chunks_exact(c)).zip(ga.chunks_exact_mut(c).zip(gb.chunks_exact_mut(c)));
        if c <= LANES {
            let mut g = [[0.0f32; LANES]; LANES];
            for (gr, src) in g.iter_mut().zip(g_hat.chunks_exact(c)) {
                gr[..c].copy_from_slice(src);
            }
            for ((zr, wr), (gar, gbr)) in rows {
                let (mut zp, mut wp) = ([0.0f32; LANES], [0.0f32; LANES]);
                zp[..c].copy_from_slice(zr);
                wp[..c].copy_from_slice(wr);
                let (mut ua, mut ub) = ([0.0f32; LANES], [0.0f32; LANES]);
                for (gy, (&wy, &zy)) in g.iter().zip(wp.iter().zip(&zp)).take(c) {
                    for l in 0..LANES {
                        ua[l] += wy * gy[l];
                        ub[l] += zy * gy[l];
                    }
                }
                let (da, db) = (simd::dot(&zp, &ua), simd::dot(&wp, &ub));
                for l in 0..LANES {
                    ua[l] = scale * zp[l] * (ua[l] - da);
                    ub[l] = scale * wp[l] * (ub[l] - db);
                }
                gar.copy_from_slice(&ua[..c]);
                gbr.copy_from_slice(&ub[..c]);
            }
        } else {
            // Wide C: u = G^ w_i for every row is a product with C^2 MACs per image.
            let rows = z.len() / c;
            sgemm(rows, c, c, Mat::n(w), Mat::n(g_hat), ga, false, 1);
            sgemm(rows, c, c, Mat::n(z), Mat::n(g_hat), gb, false, 1);
            for (g, p) in [(&mut *ga, z), (&mut *gb, w)] {
                for (gr, pr) in g.chunks_exact_mut(c).zip(p.chunks_exact(c)) {
                    let d = simd::dot(pr, gr);
                    for (o, &pv) in gr.iter_mut().zip(pr) {
                        *o = scale * pv * (*o - d);
                    }
                }
            }
        }
    }
}

/// Calls `$f::<C>(args)` for the runtime class count `$c` in 1..=16: with C a constant, every
/// per-class loop is unrolled and the block's class registers stay in registers (with a runtime
/// C the loops kept a compare per class and the blocks spilled to the stack).
#[cfg(target_arch = "x86_64")]
macro_rules! for_classes {
    ($c:expr, $f:ident($($arg:expr),*)) => {
        match $c {
            1 => $f::<1>($($arg),*), 2 => $f::<2>($($arg),*), 3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*), 5 => $f::<5>($($arg),*), 6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*), 8 => $f::<8>($($arg),*), 9 => $f::<9>($($arg),*),
            10 => $f::<10>($($arg),*), 11 => $f::<11>($($arg),*), 12 => $f::<12>($($arg),*),
            13 => $f::<13>($($arg),*), 14 => $f::<14>($($arg),*), 15 => $f::<15>($($arg),*),
            16 => $f::<16>($($arg),*),
            c => unreachable!("SIMD MI kernel called with {c} classes (the caller checks 1..=16)"),
        }
    };
}

/// AVX-512 kernels for C <= 16: each row is one masked 16-lane register, so the row max, exp,
/// sum, the joint update and the backward's C x C product are a few instructions per image
/// (the auto-vectorised body above spends most of its time padding rows and reducing lanes).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::cpu::simd::avx512::{exp16_nonpositive, transpose16};
    use std::arch::x86_64::*;

    /// 16 rows of c <= 16 floats at `p` as class registers: lane r of the result's element x is
    /// class x of row r (lanes of classes >= c are 0).
    #[inline(always)]
    unsafe fn load_block16(p: *const f32, c: usize, mask: __mmask16) -> [__m512; 16] {
        let mut v = [_mm512_setzero_ps(); 16];
        for (r, row) in v.iter_mut().enumerate() {
            *row = _mm512_maskz_loadu_ps(mask, p.add(r * c));
        }
        transpose16(&mut v);
        v
    }

    /// The inverse of `load_block16`: class registers back to 16 rows of c floats at `p`.
    #[inline(always)]
    unsafe fn store_block16(mut v: [__m512; 16], p: *mut f32, c: usize, mask: __mmask16) {
        transpose16(&mut v);
        for (r, row) in v.iter().enumerate() {
            _mm512_mask_storeu_ps(p.add(r * c), mask, *row);
        }
    }

    #[cfg(test)]
    #[test]
    fn block_transposes_round_trip() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        for c in [1usize, 7, 10, 16] {
            let src: Vec<f32> = (0..16 * c).map(|i| i as f32).collect();
            let mut back = vec![-1.0f32; 16 * c];
            let mask = ((1u32 << c) - 1) as __mmask16;
            // SAFETY: AVX-512F checked above; both buffers hold 16 rows of c.
            unsafe {
                let cols = load_block16(src.as_ptr(), c, mask);
                let mut lanes = [0.0f32; 16];
                for (x, col) in cols.iter().enumerate() {
                    _mm512_storeu_ps(lanes.as_mut_ptr(), *col);
                    for (r, &v) in lanes.iter().enumerate() {
                        let want = if x < c { src[r * c + x] } else { 0.0 };
                        assert_eq!(v, want, "c {c}: class {x} row {r}");
                    }
                }
                store_block16(cols, back.as_mut_ptr(), c, mask);
            }
            assert_eq!(back, src, "c {c}: round trip");
        }
    }

    /// Softmax of the `mask` lanes at `p` (the other lanes come out 0).
    #[inline(always)]
    unsafe fn softmax16(p: *const f32, mask: __mmask16) -> __m512 {
        let v = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), mask, p);
        let m = _mm512_reduce_max_ps(v);
        let e = exp16_nonpositive(_mm512_sub_ps(v, _mm512_set1_ps(m)));
        _mm512_mul_ps(e, _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(e)))
    }

    /// Softmax of 16 rows at once, one register per class (lane r = row r): the row max, sum and
    /// reciprocal are lane-wise, with no horizontal reduction, and every exp lane is useful.
    ///
    /// # Safety
    /// AVX-512F; `p` points at 16 whole rows of c <= 16 floats.
    #[inline(always)]
    unsafe fn softmax_classes16(p: *const f32, c: usize, mask: __mmask16) -> [__m512; 16] {
        let mut col = load_block16(p, c, mask);
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for v in col.iter().take(c) {
            m = _mm512_max_ps(m, *v);
        }
        let mut s = _mm512_setzero_ps();
        for v in col.iter_mut().take(c) {
            *v = exp16_nonpositive(_mm512_sub_ps(*v, m));
            s = _mm512_add_ps(s, *v);
        }
        let inv = _mm512_div_ps(_mm512_set1_ps(1.0), s);
        for v in col.iter_mut().take(c) {
            *v = _mm512_mul_ps(*v, inv);
        }
        col
    }

    /// Stores a block's class registers class-major (`MiForward::blocked`'s order) at `p`.
    #[inline(always)]
    unsafe fn store_classes16(col: &[__m512; 16], p: *mut f32, c: usize) {
        for (x, v) in col.iter().enumerate().take(c) {
            _mm512_storeu_ps(p.add(x * 16), *v);
        }
    }

    /// `super::forward_chunk` for C <= 16, writing z and w in `MiForward::blocked`'s order: blocks
    /// of 16 rows through `softmax_classes16` (rows gathered into class registers), the rest row by
    /// row.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, VL, BW and DQ (`simd::Level::Avx512`); c in 1..=16; a, b,
    /// z, w hold the same whole rows; j is C x C.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
    pub unsafe fn forward_chunk(a: &[f32], b: &[f32], c: usize, z: &mut [f32], w: &mut [f32], j: &mut [f32]) {
        for_classes!(c, forward_chunk_n(a, b, z, w, j))
    }

    /// `forward_chunk` for a constant C.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
    unsafe fn forward_chunk_n<const C: usize>(a: &[f32], b: &[f32], z: &mut [f32], w: &mut [f32], j: &mut [f32]) {
        let c = C;
        let mask = ((1u32 << c) - 1) as __mmask16;
        let blocks = a.len() / c / 16;
        // One view after the other over the chunk: with both views' blocks in one loop body the
        // compiler interleaved the two softmaxes and transposes, and their registers spilled.
        for (src, dst) in [(a, &mut *z), (b, &mut *w)] {
            for blk in 0..blocks {
                let at = blk * 16 * c;
                let v = softmax_classes16(src.as_ptr().add(at), c, mask);
                store_classes16(&v, dst.as_mut_ptr().add(at), c);
            }
        }
        // J = Z^T W over the whole blocks, from the class-major blocks (cache-hot: a chunk is
        // about 1024 rows): lane-wise products for a few classes x at a time, then one horizontal
        // sum per entry. Two x per pass while the accumulators fit the 32 registers.
        let (zp, wp) = (z.as_ptr(), w.as_ptr());
        let mut x0 = 0;
        if C <= 13 {
            while x0 + 2 <= C {
                joint_lanes::<C, 2>(zp, wp, blocks, x0, j);
                x0 += 2;
            }
        }
        while x0 < C {
            joint_lanes::<C, 1>(zp, wp, blocks, x0, j);
            x0 += 1;
        }
        // The rows after the last whole block: row-major, J's rows in registers.
        let mut acc = [_mm512_setzero_ps(); 16];
        let mut zs = [0.0f32; 16];
        for r in blocks * 16..a.len() / c {
            let zv = softmax16(a.as_ptr().add(r * c), mask);
            let wv = softmax16(b.as_ptr().add(r * c), mask);
            _mm512_mask_storeu_ps(z.as_mut_ptr().add(r * c), mask, zv);
            _mm512_mask_storeu_ps(w.as_mut_ptr().add(r * c), mask, wv);
            _mm512_storeu_ps(zs.as_mut_ptr(), zv);
            for (row, &zx) in acc.iter_mut().zip(&zs).take(c) {
                *row = _mm512_fmadd_ps(_mm512_set1_ps(zx), wv, *row);
            }
        }
        let mut tail = [0.0f32; 16];
        for (x, row) in acc.iter().enumerate().take(c) {
            _mm512_storeu_ps(tail.as_mut_ptr(), *row);
            for (jv, &t) in j[x * c..(x + 1) * c].iter_mut().zip(&tail) {
                *jv += t;
            }
        }
    }

    /// Rows x0..x0 + G of J (overwritten) over `blocks` class-major blocks of z and w: one
    /// accumulator register per (x, y), one lane per row of a block.
    #[inline(always)]
    unsafe fn joint_lanes<const C: usize, const G: usize>(
        z: *const f32,
        w: *const f32,
        blocks: usize,
        x0: usize,
        j: &mut [f32],
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; G];
        for blk in 0..blocks {
            let base = blk * 16 * C;
            let mut zx = [_mm512_setzero_ps(); G];
            for (g, v) in zx.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(z.add(base + (x0 + g) * 16));
            }
            for y in 0..C {
                let wy = _mm512_loadu_ps(w.add(base + y * 16));
                for (row, &zv) in acc.iter_mut().zip(&zx) {
                    row[y] = _mm512_fmadd_ps(zv, wy, row[y]);
                }
            }
        }
        for (g, row) in acc.iter().enumerate() {
            for (y, v) in row.iter().enumerate() {
                j[(x0 + g) * C + y] = _mm512_reduce_add_ps(*v);
            }
        }
    }

    /// u = G^ v for one block of C class registers at `v` (lane = row): the classes of v outer,
    /// so that one of them and the C accumulators are all that is live.
    #[inline(always)]
    unsafe fn products16<const C: usize>(v: *const f32, g_hat: &[f32]) -> [__m512; C] {
        let mut u = [_mm512_setzero_ps(); C];
        for y in 0..C {
            let vy = _mm512_loadu_ps(v.add(y * 16));
            for (x, ux) in u.iter_mut().enumerate() {
                *ux = _mm512_fmadd_ps(vy, _mm512_set1_ps(*g_hat.get_unchecked(y * C + x)), *ux);
            }
        }
        u
    }

    /// Row softmax of wide rows (C > 16) with masked tails: the auto-vectorised `simd::softmax_row`
    /// spent about a third of a C = 100 forward + backward on padding and spills.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `x` and `y` hold the same whole rows of `c`.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
    pub unsafe fn softmax_rows(x: &[f32], c: usize, y: &mut [f32]) {
        for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            crate::cpu::simd::avx512::softmax_row(xr, yr);
        }
    }

    /// `super::backward_chunk` for C <= 16, reading z and w in `MiForward::blocked`'s order.
    ///
    /// # Safety
    /// As for `forward_chunk`; g_hat is C x C and symmetric.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
    pub unsafe fn backward_chunk(
        z: &[f32],
        w: &[f32],
        g_hat: &[f32],
        c: usize,
        scale: f32,
        ga: &mut [f32],
        gb: &mut [f32],
    ) {
        for_classes!(c, backward_chunk_n(z, w, g_hat, scale, ga, gb))
    }

    /// `backward_chunk` for a constant C.
    #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
    unsafe fn backward_chunk_n<const C: usize>(
        z: &[f32],
        w: &[f32],
        g_hat: &[f32],
        scale: f32,
        ga: &mut [f32],
        gb: &mut [f32],
    ) {
        let c = C;
        let mask = ((1u32 << c) - 1) as __mmask16;
        let sv = _mm512_set1_ps(scale);
        let blocks = z.len() / c / 16;
        // Blocks of 16 rows with one register per class (lane = row), as the forward stored them:
        // u = G^ w and the dot products are lane-wise FMAs with G^'s entries broadcast, no
        // horizontal reduction; the gradients go out as rows through in-register transposes.
        for blk in 0..blocks {
            let at = blk * 16 * c;
            let (zb, wb) = (z.as_ptr().add(at), w.as_ptr().add(at));
            // One view at a time, z and w read from the block (L1) where they are needed, so that
            // only one view's C products are live (holding z, w and both views' products, 40
            // registers, spilled); <z_i, G^ w_i> = <w_i, G^ z_i> (G^ symmetric) serves both.
            let ua = products16::<C>(wb, g_hat);
            let mut d = _mm512_setzero_ps();
            for (x, u) in ua.iter().enumerate() {
                d = _mm512_fmadd_ps(_mm512_loadu_ps(zb.add(x * 16)), *u, d);
            }
            let mut out = [_mm512_setzero_ps(); 16];
            for (x, u) in ua.iter().enumerate() {
                out[x] = _mm512_mul_ps(_mm512_mul_ps(sv, _mm512_loadu_ps(zb.add(x * 16))), _mm512_sub_ps(*u, d));
            }
            store_block16(out, ga.as_mut_ptr().add(at), c, mask);
            let ub = products16::<C>(zb, g_hat);
            for (x, u) in ub.iter().enumerate() {
                out[x] = _mm512_mul_ps(_mm512_mul_ps(sv, _mm512_loadu_ps(wb.add(x * 16))), _mm512_sub_ps(*u, d));
            }
            store_block16(out, gb.as_mut_ptr().add(at), c, mask);
        }
        let mut g = [_mm512_setzero_ps(); 16];
        for (y, row) in g.iter_mut().enumerate().take(c) {
            *row = _mm512_maskz_loadu_ps(mask, g_hat.as_ptr().add(y * c));
        }
        for r in blocks * 16..z.len() / c {
            let (zp, wp) = (z.as_ptr().add(r * c), w.as_ptr().add(r * c));
            let (mut ua, mut ub) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for (y, gy) in g.iter().enumerate().take(c) {
                ua = _mm512_fmadd_ps(_mm512_set1_ps(*wp.add(y)), *gy, ua);
                ub = _mm512_fmadd_ps(_mm512_set1_ps(*zp.add(y)), *gy, ub);
            }
            let (zv, wv) = (_mm512_maskz_loadu_ps(mask, zp), _mm512_maskz_loadu_ps(mask, wp));
            let da = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_mul_ps(zv, ua)));
            let db = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_mul_ps(wv, ub)));
            let oa = _mm512_mul_ps(_mm512_mul_ps(sv, zv), _mm512_sub_ps(ua, da));
            let ob = _mm512_mul_ps(_mm512_mul_ps(sv, wv), _mm512_sub_ps(ub, db));
            _mm512_mask_storeu_ps(ga.as_mut_ptr().add(r * c), mask, oa);
            _mm512_mask_storeu_ps(gb.as_mut_ptr().add(r * c), mask, ob);
        }
    }
}

/// AVX2 + FMA twins of the AVX-512 kernels for C <= 16, for machines without AVX-512: blocks of 8
/// rows with one register per class (lane = row), stored class-major between the passes as there.
/// Rows become class registers and gradients rows again through a stack transpose: 8 x C scalar
/// moves cost less than the C exps (or C x C FMAs) each block feeds, and Zen 1 microcodes the
/// masked loads an in-register transpose of short rows would need.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::cpu::simd::avx2::{exp8, hsum8};
    use std::arch::x86_64::*;

    /// 8 rows of C floats at `p` as class registers: lane r of element x is class x of row r.
    #[inline(always)]
    unsafe fn load_rows8<const C: usize>(p: *const f32) -> [__m256; C] {
        let mut t = [[0.0f32; 8]; C];
        for r in 0..8 {
            for (x, col) in t.iter_mut().enumerate() {
                col[r] = *p.add(r * C + x);
            }
        }
        t.map(|col| _mm256_loadu_ps(col.as_ptr()))
    }

    /// The inverse of `load_rows8`: class registers back to 8 rows of C floats at `p`.
    #[inline(always)]
    unsafe fn store_rows8<const C: usize>(v: &[__m256; C], p: *mut f32) {
        let mut t = [[0.0f32; 8]; C];
        for (col, &reg) in t.iter_mut().zip(v) {
            _mm256_storeu_ps(col.as_mut_ptr(), reg);
        }
        for r in 0..8 {
            for (x, col) in t.iter().enumerate() {
                *p.add(r * C + x) = col[r];
            }
        }
    }

    /// Softmax of 8 rows at `p`, one register per class: max, sum and reciprocal lane-wise.
    #[inline(always)]
    unsafe fn softmax_classes8<const C: usize>(p: *const f32) -> [__m256; C] {
        let mut col = load_rows8::<C>(p);
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for v in &col {
            m = _mm256_max_ps(m, *v);
        }
        let mut s = _mm256_setzero_ps();
        for v in col.iter_mut() {
            *v = exp8(_mm256_sub_ps(*v, m));
            s = _mm256_add_ps(s, *v);
        }
        let inv = _mm256_div_ps(_mm256_set1_ps(1.0), s);
        for v in col.iter_mut() {
            *v = _mm256_mul_ps(*v, inv);
        }
        col
    }

    /// `super::forward_chunk` for C <= 16, writing z and w in 8-row class-major blocks.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; c in 1..=16; a, b, z, w hold the same whole rows; j is
    /// C x C.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn forward_chunk(a: &[f32], b: &[f32], c: usize, z: &mut [f32], w: &mut [f32], j: &mut [f32]) {
        for_classes!(c, forward_chunk_n(a, b, z, w, j))
    }

    /// `forward_chunk` for a constant C.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn forward_chunk_n<const C: usize>(a: &[f32], b: &[f32], z: &mut [f32], w: &mut [f32], j: &mut [f32]) {
        let blocks = a.len() / C / 8;
        for (src, dst) in [(a, &mut *z), (b, &mut *w)] {
            for blk in 0..blocks {
                let at = blk * 8 * C;
                let v = softmax_classes8::<C>(src.as_ptr().add(at));
                for (x, reg) in v.iter().enumerate() {
                    _mm256_storeu_ps(dst.as_mut_ptr().add(at + x * 8), *reg);
                }
            }
        }
        // J = Z^T W over the whole blocks: one accumulator per (x, y), lane-wise, then one
        // horizontal sum per entry. At most 8 columns y per pass keep the accumulators, z_x and
        // w_y within the 16 ymm registers.
        let (zp, wp) = (z.as_ptr(), w.as_ptr());
        for x in 0..C {
            joint_lanes::<C, 0>(zp, wp, blocks, x, j);
            if C > 8 {
                joint_lanes::<C, 8>(zp, wp, blocks, x, j);
            }
        }
        // The rows after the last whole block: row-major, through the portable kernel.
        let done = blocks * 8 * C;
        if done < a.len() {
            let mut jt = [0.0f32; 256];
            let jt = &mut jt[..C * C];
            super::forward_chunk(&a[done..], &b[done..], C, &mut z[done..], &mut w[done..], jt);
            for (jv, t) in j.iter_mut().zip(jt.iter()) {
                *jv += t;
            }
        }
    }

    /// Entries (x, Y0..Y0 + 8) of J (overwritten) over `blocks` class-major 8-row blocks.
    #[inline(always)]
    unsafe fn joint_lanes<const C: usize, const Y0: usize>(
        z: *const f32,
        w: *const f32,
        blocks: usize,
        x: usize,
        j: &mut [f32],
    ) {
        let ys = Y0..C.min(Y0 + 8);
        let mut acc = [_mm256_setzero_ps(); 8];
        for blk in 0..blocks {
            let base = blk * 8 * C;
            let zx = _mm256_loadu_ps(z.add(base + x * 8));
            for (k, y) in ys.clone().enumerate() {
                acc[k] = _mm256_fmadd_ps(zx, _mm256_loadu_ps(w.add(base + y * 8)), acc[k]);
            }
        }
        for (k, y) in ys.enumerate() {
            j[x * C + y] = hsum8(acc[k]);
        }
    }

    /// u = G^ v for one block of C class registers at `v` (lane = row), the classes of v outer.
    #[inline(always)]
    unsafe fn products8<const C: usize>(v: *const f32, g_hat: &[f32]) -> [__m256; C] {
        let mut u = [_mm256_setzero_ps(); C];
        for y in 0..C {
            let vy = _mm256_loadu_ps(v.add(y * 8));
            for (x, ux) in u.iter_mut().enumerate() {
                *ux = _mm256_fmadd_ps(vy, _mm256_set1_ps(*g_hat.get_unchecked(y * C + x)), *ux);
            }
        }
        u
    }

    /// Row softmax of wide rows (C > 16): `simd::avx2::softmax_row` per row.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `x` and `y` hold the same whole rows of `c`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax_rows(x: &[f32], c: usize, y: &mut [f32]) {
        for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            crate::cpu::simd::avx2::softmax_row(xr, yr);
        }
    }

    /// `super::backward_chunk` for C <= 16, reading z and w in 8-row class-major blocks.
    ///
    /// # Safety
    /// As for `forward_chunk`; g_hat is C x C and symmetric.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn backward_chunk(
        z: &[f32],
        w: &[f32],
        g_hat: &[f32],
        c: usize,
        scale: f32,
        ga: &mut [f32],
        gb: &mut [f32],
    ) {
        for_classes!(c, backward_chunk_n(z, w, g_hat, scale, ga, gb))
    }

    /// `backward_chunk` for a constant C.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn backward_chunk_n<const C: usize>(
        z: &[f32],
        w: &[f32],
        g_hat: &[f32],
        scale: f32,
        ga: &mut [f32],
        gb: &mut [f32],
    ) {
        let sv = _mm256_set1_ps(scale);
        let blocks = z.len() / C / 8;
        for blk in 0..blocks {
            let at = blk * 8 * C;
            let (zb, wb) = (z.as_ptr().add(at), w.as_ptr().add(at));
            // One view at a time; <z_i, G^ w_i> = <w_i, G^ z_i> (G^ symmetric) serves both.
            let ua = products8::<C>(wb, g_hat);
            let mut d = _mm256_setzero_ps();
            for (x, u) in ua.iter().enumerate() {
                d = _mm256_fmadd_ps(_mm256_loadu_ps(zb.add(x * 8)), *u, d);
            }
            let mut out = [_mm256_setzero_ps(); C];
            for (x, (o, u)) in out.iter_mut().zip(&ua).enumerate() {
                *o = _mm256_mul_ps(_mm256_mul_ps(sv, _mm256_loadu_ps(zb.add(x * 8))), _mm256_sub_ps(*u, d));
            }
            store_rows8::<C>(&out, ga.as_mut_ptr().add(at));
            let ub = products8::<C>(zb, g_hat);
            for (x, (o, u)) in out.iter_mut().zip(&ub).enumerate() {
                *o = _mm256_mul_ps(_mm256_mul_ps(sv, _mm256_loadu_ps(wb.add(x * 8))), _mm256_sub_ps(*u, d));
            }
            store_rows8::<C>(&out, gb.as_mut_ptr().add(at));
        }
        let done = blocks * 8 * C;
        if done < z.len() {
            super::backward_chunk(&z[done..], &w[done..], g_hat, C, scale, &mut ga[done..], &mut gb[done..]);
        }
    }
}

/// Rows per class-major block the kernels for C classes use on this CPU (`MiForward::block`):
/// 16 with AVX-512 (C <= 16, and wide heads: `wide_heads`), 8 with AVX2 + FMA (C <= 16), 0
/// (row-major: the portable kernels, or the GEMM crate for wide heads) otherwise.
fn block_rows(c: usize) -> usize {
    match simd::level() {
        _ if !cfg!(target_arch = "x86_64") => 0,
        simd::Level::Avx512 if c <= LANES || wide_heads(c) => 16,
        simd::Level::Avx2 if c <= LANES => 8,
        _ => 0,
    }
}

/// Whether C classes take the AVX-512 wide-head kernels (`wide`): 16 < C <= `wide::MAX_C`.
fn wide_heads(c: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return simd::level() == simd::Level::Avx512 && wide::applies(c);
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Floats of the per-thread scratch the wide-head kernels need for C classes (both passes).
fn wide_scratch_len(c: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    return wide::forward_scratch_len(c).max(wide::backward_scratch_len(c));
    #[cfg(not(target_arch = "x86_64"))]
    0
}

/// One forward chunk on the best path for this CPU (storing z and w as `block_rows(c)` says);
/// `scratch` holds `wide_scratch_len(c)` floats.
fn forward_chunk_best(
    a: &[f32],
    b: &[f32],
    c: usize,
    (z, w): (&mut [f32], &mut [f32]),
    j: &mut [f32],
    scratch: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        assert!(a.len().is_multiple_of(c) && [b.len(), z.len(), w.len()] == [a.len(); 3] && j.len() == c * c);
        match (block_rows(c), simd::level()) {
            // SAFETY (all five): `block_rows` and `level` checked the CPU (and C: 16-row blocks
            // of C > 16 are the wide kernels'); the slices hold whole rows of C, J is C x C and
            // the scratch as long as the wide kernels ask (asserted).
            (16, _) if c > LANES => {
                assert_eq!(scratch.len(), wide_scratch_len(c), "MI scratch for C = {c}");
                return unsafe { wide::forward_chunk(a, b, c, (z, w), j, scratch) };
            }
            (16, _) => return unsafe { avx512::forward_chunk(a, b, c, z, w, j) },
            (8, _) => return unsafe { avx2::forward_chunk(a, b, c, z, w, j) },
            (_, simd::Level::Avx512) => unsafe {
                avx512::softmax_rows(a, c, z);
                avx512::softmax_rows(b, c, w);
            },
            (_, simd::Level::Avx2) => unsafe {
                avx2::softmax_rows(a, c, z);
                avx2::softmax_rows(b, c, w);
            },
            _ => return forward_chunk(a, b, c, z, w, j),
        }
        sgemm(c, c, z.len() / c, Mat::t(z), Mat::n(w), j, false, 1);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = scratch;
        forward_chunk(a, b, c, z, w, j)
    }
}

/// One backward chunk (both views' rows in, both gradients out) on the path that matches the
/// forward's storage order (`blocked`).
fn backward_chunk_best(
    block: usize,
    (z, w): (&[f32], &[f32]),
    g_hat: &[f32],
    c: usize,
    scale: f32,
    (ga, gb): (&mut [f32], &mut [f32]),
    scratch: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if block > 0 {
        // Safe callers cannot break these (the fields are checked here, `block` is private).
        assert_eq!(
            block,
            block_rows(c),
            "MI storage in {block}-row blocks, but this CPU's kernels use {}",
            block_rows(c)
        );
        assert!(z.len().is_multiple_of(c) && [w.len(), ga.len(), gb.len()] == [z.len(); 3] && g_hat.len() == c * c);
        assert_eq!(scratch.len(), if c > LANES { wide_scratch_len(c) } else { 0 }, "MI scratch for C = {c}");
        // SAFETY: as in `forward_chunk_best`.
        return unsafe {
            if block == 16 && c > LANES {
                wide::backward_chunk((z, w), g_hat, c, scale, (ga, gb), scratch)
            } else if block == 16 {
                avx512::backward_chunk(z, w, g_hat, c, scale, ga, gb)
            } else {
                avx2::backward_chunk(z, w, g_hat, c, scale, ga, gb)
            }
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (block, scratch);
    backward_chunk(z, w, g_hat, c, scale, ga, gb)
}

/// Gradients of `upstream * L` with respect to both views' logits (n x C each, overwritten):
/// dL/da_i = (1/s) z_i * (G^ w_i - (z_i^T G^ w_i) 1), and the same for b with z and w swapped.
pub fn mi_bwd(fwd: &MiForward, n: usize, c: usize, upstream: f32, grad_a: &mut [f32], grad_b: &mut [f32]) {
    debug_assert!(grad_a.len() == n * c && grad_b.len() == n * c && fwd.z.len() == n * c);
    let scale = (upstream as f64 / fwd.s) as f32;
    let step = CHUNK_ROWS * c;
    let views = fwd.z.par_chunks(step).zip(fwd.w.par_chunks(step));
    let scratch_len = if fwd.block == 16 && c > LANES { wide_scratch_len(c) } else { 0 };
    grad_a.par_chunks_mut(step).zip(grad_b.par_chunks_mut(step)).zip(views).for_each_init(
        || vec![0.0f32; scratch_len],
        |scratch, (grads, views)| backward_chunk_best(fwd.block, views, &fwd.g_hat, c, scale, grads, scratch),
    );
}

/// Row softmax in f64 (max subtracted).
fn softmax_f64(x: &[f64], c: usize) -> Vec<f64> {
    let mut y = vec![0.0f64; x.len()];
    for (xr, yr) in x.chunks(c).zip(y.chunks_mut(c)) {
        let mx = xr.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let mut sum = 0.0;
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = (v - mx).exp();
            sum += *o;
        }
        yr.iter_mut().for_each(|o| *o /= sum);
    }
    y
}

/// Reference in f64 by plain loops: returns (L_mi(lambda), dL/d logits_a, dL/d logits_b).
///
/// Independent of `forward`/`backward`: it evaluates the defining sum
/// L = -sum_cd P'_cd (ln P'_cd - lambda ln m'_c - lambda ln m'_d) with separate row and column
/// marginals, and differentiates it by hand in reverse through every step: the clamp (a clamped P
/// or m is a constant), the marginals, P = S / s (which gives dL/dS = (G - <P, G>) / s = G^ / s),
/// S = (J + J^T) / 2, J = Z^T W, and the general softmax backward z * (g - <z, g>).
pub fn mi_loss_f64(logits_a: &[f64], logits_b: &[f64], n: usize, c: usize, lambda: f64) -> (f64, Vec<f64>, Vec<f64>) {
    debug_assert!(logits_a.len() == n * c && logits_b.len() == n * c);
    let z = softmax_f64(logits_a, c);
    let w = softmax_f64(logits_b, c);
    let mut j = vec![0.0f64; c * c];
    for i in 0..n {
        for x in 0..c {
            for y in 0..c {
                j[x * c + y] += z[i * c + x] * w[i * c + y];
            }
        }
    }
    let mut sm = vec![0.0f64; c * c];
    for x in 0..c {
        for y in 0..c {
            sm[x * c + y] = 0.5 * (j[x * c + y] + j[y * c + x]);
        }
    }
    let s: f64 = sm.iter().sum();
    let p: Vec<f64> = sm.iter().map(|v| v / s).collect();
    let mut m_row = vec![0.0f64; c];
    let mut m_col = vec![0.0f64; c];
    for x in 0..c {
        for y in 0..c {
            m_row[x] += p[x * c + y];
            m_col[y] += p[x * c + y];
        }
    }
    let clamp = |v: f64| if v < EPS { EPS } else { v };
    let mut loss = 0.0f64;
    for x in 0..c {
        for y in 0..c {
            let pv = clamp(p[x * c + y]);
            loss -= pv * (pv.ln() - lambda * clamp(m_row[x]).ln() - lambda * clamp(m_col[y]).ln());
        }
    }
    // Reverse: dL/dP on the direct path (unclamped entries only), then the marginal paths.
    let mut dp = vec![0.0f64; c * c];
    let mut dm_row = vec![0.0f64; c];
    let mut dm_col = vec![0.0f64; c];
    for x in 0..c {
        for y in 0..c {
            let pv = clamp(p[x * c + y]);
            if p[x * c + y] >= EPS {
                dp[x * c + y] = -(pv.ln() + 1.0) + lambda * clamp(m_row[x]).ln() + lambda * clamp(m_col[y]).ln();
            }
            if m_row[x] >= EPS {
                dm_row[x] += lambda * pv / m_row[x];
            }
            if m_col[y] >= EPS {
                dm_col[y] += lambda * pv / m_col[y];
            }
        }
    }
    for x in 0..c {
        for y in 0..c {
            dp[x * c + y] += dm_row[x] + dm_col[y];
        }
    }
    let pg: f64 = dp.iter().zip(&p).map(|(a, b)| a * b).sum();
    let ds: Vec<f64> = dp.iter().map(|g| (g - pg) / s).collect();
    let mut dj = vec![0.0f64; c * c];
    for x in 0..c {
        for y in 0..c {
            dj[x * c + y] = 0.5 * (ds[x * c + y] + ds[y * c + x]);
        }
    }
    let mut dz = vec![0.0f64; n * c];
    let mut dw = vec![0.0f64; n * c];
    for i in 0..n {
        for x in 0..c {
            for y in 0..c {
                dz[i * c + x] += dj[x * c + y] * w[i * c + y];
                dw[i * c + y] += dj[x * c + y] * z[i * c + x];
            }
        }
    }
    let softmax_back = |y: &[f64], dy: &[f64]| -> Vec<f64> {
        let mut dx = vec![0.0f64; y.len()];
        for ((yr, gr), dr) in y.chunks(c).zip(dy.chunks(c)).zip(dx.chunks_mut(c)) {
            let dot: f64 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((d, &pv), &g) in dr.iter_mut().zip(yr).zip(gr) {
                *d = pv * (g - dot);
            }
        }
        dx
    };
    (loss, softmax_back(&z, &dz), softmax_back(&w, &dw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn randn(len: usize, std: f32, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed, 11);
        (0..len).map(|_| std * r.normal()).collect()
    }

    fn run(a: &[f32], b: &[f32], n: usize, c: usize, lambda: f32) -> (MiForward, Vec<f32>, Vec<f32>) {
        let f = mi_fwd(a, b, n, c, lambda);
        let (mut ga, mut gb) = (vec![0.0; n * c], vec![0.0; n * c]);
        mi_bwd(&f, n, c, 1.0, &mut ga, &mut gb);
        (f, ga, gb)
    }

    fn max_abs(v: &[f32]) -> f32 {
        v.iter().fold(0.0f32, |a, &b| a.max(b.abs()))
    }

    /// Logits `scale` * one-hot of `class(i)` for each row i.
    fn one_hot(n: usize, c: usize, scale: f32, class: impl Fn(usize) -> usize) -> Vec<f32> {
        let mut v = vec![0.0; n * c];
        for i in 0..n {
            v[i * c + class(i)] = scale;
        }
        v
    }

    /// Asserts the f32 kernels agree with the f64 reference: loss to 1e-5 (relative above 1),
    /// gradients to 1e-4 of their largest entry.
    fn assert_matches_reference(a: &[f32], b: &[f32], n: usize, c: usize, lambda: f32, what: &str) {
        let (f, ga, gb) = run(a, b, n, c, lambda);
        let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let (loss, ra, rb) = mi_loss_f64(&a64, &b64, n, c, lambda as f64);
        assert!(
            (f.loss as f64 - loss).abs() <= 1e-5 * loss.abs().max(1.0),
            "{what}: loss {} vs reference {loss}",
            f.loss
        );
        for (name, got, want) in [("a", &ga, &ra), ("b", &gb, &rb)] {
            assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite gradient {name}");
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            // A near-stationary case (e.g. two nearly equal views at n = 1) would test nothing.
            assert!(scale > 1e-6, "{what}: degenerate case, gradient {name} at most {scale:.3e}");
            let err = got.iter().zip(want.iter()).fold(0.0f64, |m, (g, r)| m.max((*g as f64 - r).abs()));
            assert!(err <= 1e-4 * scale, "{what}: gradient {name} off by {err:.3e} (max {scale:.3e})");
        }
    }

    #[test]
    fn forward_chunks_longer_than_the_backwards_keep_the_block_order() {
        // Past 16.7M rows at C = 16 the cap on the partial products makes the forward's chunks
        // longer than the backward's 1024 rows; a small cap gives that case at a test's size. The
        // chunks of both passes must agree on where the class-major blocks end.
        let (n, c) = (5000, 16);
        let rows = chunk_rows_under(n, c, 4 * c * c);
        assert!(rows > CHUNK_ROWS && rows.is_multiple_of(CHUNK_ROWS), "{rows} rows per forward chunk");
        let (a, b) = (randn(n * c, 2.0, 61), randn(n * c, 2.0, 62));
        let local = |_: &mut [f64]| Ok(());
        let f = match forward_in_chunks((&a, &b), n, c, 1.0, &local, rows) {
            Ok(f) => f,
            Err(e) => panic!("forward: {e}"),
        };
        let (mut ga, mut gb) = (vec![0.0f32; n * c], vec![0.0f32; n * c]);
        mi_bwd(&f, n, c, 1.0, &mut ga, &mut gb);
        let (a64, b64): (Vec<f64>, Vec<f64>) =
            (a.iter().map(|&v| v as f64).collect(), b.iter().map(|&v| v as f64).collect());
        let (loss, ra, rb) = mi_loss_f64(&a64, &b64, n, c, 1.0);
        assert!((f.loss as f64 - loss).abs() <= 1e-5 * loss.abs().max(1.0), "loss {} vs {loss}", f.loss);
        for (got, want) in [(&ga, &ra), (&gb, &rb)] {
            let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let err = got.iter().zip(want).fold(0.0f64, |m, (g, r)| m.max((*g as f64 - r).abs()));
            assert!(scale > 1e-9 && err <= 1e-4 * scale, "gradient off by {err:.3e} (max {scale:.3e})");
        }
    }

    #[test]
    fn uniform_outputs_give_2_1_minus_lambda_ln_c_and_zero_gradient() {
        let (n, c) = (24, 10);
        let a = vec![0.7f32; n * c];
        let b = vec![-1.3f32; n * c];
        for lambda in [1.0f32, 1.5] {
            let (f, ga, gb) = run(&a, &b, n, c, lambda);
            let want = 2.0 * (1.0 - lambda as f64) * (c as f64).ln();
            assert!((f.loss as f64 - want).abs() < 1e-6, "lambda {lambda}: loss {} vs {want}", f.loss);
            assert!(max_abs(&ga) < 1e-6 && max_abs(&gb) < 1e-6, "lambda {lambda}: {} {}", max_abs(&ga), max_abs(&gb));
            assert_eq!(f.clamped, 0);
            assert!((f.s - n as f64).abs() < 1e-4);
        }
    }

    #[test]
    fn p_identity_over_c_gives_1_minus_2_lambda_ln_c() {
        let (n, c) = (30, 10);
        let a = one_hot(n, c, 80.0, |i| i % c);
        for lambda in [1.0f32, 1.5] {
            let (f, ga, gb) = run(&a, &a, n, c, lambda);
            let want = (1.0 - 2.0 * lambda as f64) * (c as f64).ln();
            assert!((f.loss as f64 - want).abs() < 1e-5, "lambda {lambda}: loss {} vs {want}", f.loss);
            // Every off-diagonal entry of P is exp(-80)-small and clamped.
            assert_eq!(f.clamped, c * c - c);
            assert!(ga.iter().chain(&gb).all(|v| v.is_finite()));
        }
        let f = mi_fwd(&a, &a, n, c, 1.0);
        assert!((f.loss + std::f32::consts::LN_10).abs() < 1e-5, "C = 10, lambda = 1: {}", f.loss);
    }

    #[test]
    fn every_image_on_one_class_earns_nothing() {
        let (n, c) = (16, 7);
        let a = one_hot(n, c, 80.0, |_| 3);
        for lambda in [1.0f32, 1.5] {
            let (f, ga, gb) = run(&a, &a, n, c, lambda);
            assert!(f.loss.abs() < 1e-6, "lambda {lambda}: loss {}", f.loss);
            assert_eq!(f.clamped_marginals, c - 1);
            assert!(max_abs(&ga) < 1e-6 && max_abs(&gb) < 1e-6);
        }
    }

    #[test]
    fn swapping_views_swaps_gradients_and_keeps_the_loss() {
        let (n, c) = (37, 6);
        let a = randn(n * c, 2.0, 1);
        let b = randn(n * c, 2.0, 2);
        for lambda in [1.0f32, 1.5] {
            let (f1, ga1, gb1) = run(&a, &b, n, c, lambda);
            let (f2, ga2, gb2) = run(&b, &a, n, c, lambda);
            assert!((f1.loss - f2.loss).abs() < 1e-6, "{} vs {}", f1.loss, f2.loss);
            let scale = max_abs(&ga1).max(max_abs(&gb1));
            for (x, y) in ga1.iter().zip(&gb2).chain(gb1.iter().zip(&ga2)) {
                assert!((x - y).abs() <= 1e-5 * scale, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn matches_f64_reference_on_random_logits() {
        let cases =
            [(1, 2), (1, 3), (5, 3), (64, 10), (1000, 10), (300, 16), (300, 17), (40, 100), (1000, 100), (2500, 7)];
        for (k, &(n, c)) in cases.iter().enumerate() {
            let a = randn(n * c, 2.0, 100 + k as u64);
            let b = randn(n * c, 2.0, 500 + k as u64);
            for lambda in [1.0f32, 1.5] {
                assert_matches_reference(&a, &b, n, c, lambda, &format!("n {n} C {c} lambda {lambda}"));
            }
        }
    }

    #[test]
    fn every_class_count_of_the_avx512_kernels_matches_the_reference() {
        // Each C in 1..=16 is its own monomorphised kernel; 37 rows = two 16-row blocks + a tail.
        for c in 2..=16usize {
            let (a, b) = (randn(37 * c, 2.0, 900 + c as u64), randn(37 * c, 2.0, 950 + c as u64));
            assert_matches_reference(&a, &b, 37, c, 1.0, &format!("n 37 C {c}"));
            // Whatever order the kernels store the softmax in, z_rows() is the row-major softmax.
            let (f, _, _) = run(&a, &b, 37, c, 1.0);
            let want = softmax_f64(&a.iter().map(|&v| v as f64).collect::<Vec<_>>(), c);
            let got = f.z_rows();
            assert!(got.iter().zip(&want).all(|(g, w)| (*g as f64 - w).abs() < 1e-6), "C {c}: z_rows");
        }
        // One class: every softmax is 1, so P = [[1]], the loss is 0 and nothing moves.
        let (f, ga, gb) = run(&randn(37, 2.0, 901), &randn(37, 2.0, 951), 37, 1, 1.0);
        assert_eq!(f.loss, 0.0);
        assert!(ga.iter().chain(&gb).all(|&g| g == 0.0), "C 1: {ga:?} {gb:?}");
    }

    #[test]
    fn every_wide_class_count_matches_the_reference() {
        // 181 rows: 16-row blocks in groups of 4, 4 and 3, then 5 rows after the last whole block;
        // C on both sides of each multiple of 16, and the widest the AVX-512 wide kernels take.
        for c in [17usize, 31, 32, 33, 47, 64, 100, 127, 128, 129] {
            let (a, b) = (randn(181 * c, 2.0, 300 + c as u64), randn(181 * c, 2.0, 400 + c as u64));
            assert_matches_reference(&a, &b, 181, c, 1.5, &format!("n 181 C {c}"));
            let (f, _, _) = run(&a, &b, 181, c, 1.0);
            assert_eq!(f.blocked(), simd::level() == simd::Level::Avx512 && c <= 128, "C {c}: storage order");
            let want = softmax_f64(&a.iter().map(|&v| v as f64).collect::<Vec<_>>(), c);
            let got = f.z_rows();
            assert!(got.iter().zip(&want).all(|(g, w)| (*g as f64 - w).abs() < 1e-6), "C {c}: z_rows");
        }
    }

    #[test]
    fn wide_heads_over_several_chunks_do_not_depend_on_the_thread_count() {
        let (n, c) = (2 * CHUNK_ROWS + 37, 100);
        let (a, b) = (randn(n * c, 2.0, 71), randn(n * c, 2.0, 72));
        let on = |t: usize| match rayon::ThreadPoolBuilder::new().num_threads(t).build() {
            Ok(pool) => pool.install(|| run(&a, &b, n, c, 1.0)),
            Err(e) => panic!("thread pool: {e}"),
        };
        let ((f1, ga1, gb1), (f2, ga2, gb2)) = (on(1), on(2));
        assert_eq!(f1.loss.to_bits(), f2.loss.to_bits());
        assert!(ga1 == ga2 && gb1 == gb2 && f1.z == f2.z);
        assert_matches_reference(&a, &b, n, c, 1.0, "C 100, several chunks");
    }

    #[test]
    fn clamp_active_stays_finite_and_matches_reference() {
        // Classes 0..2 are ordinary; classes 3, 4, 5 sit at logits -40, -25, -12, so P entries
        // among them underflow below EPS (clamped, with the marginal of class 3 clamped too) while
        // entries pairing class 4 or 5 with 0..2, and the marginals of 4 and 5, stay above EPS.
        let (n, c) = (12, 6);
        let mut r = Rng::new(5, 3);
        let mut make = || -> Vec<f32> {
            let mut v = vec![0.0f32; n * c];
            for i in 0..n {
                for x in 0..c {
                    let bias = [0.0, 0.0, 0.0, -40.0, -25.0, -12.0][x];
                    let lead = if x == i % 3 { 2.0 } else { 0.0 };
                    v[i * c + x] = bias + lead + 1.5 * r.normal();
                }
            }
            v
        };
        let a = make();
        let b = make();
        for lambda in [1.0f32, 1.5] {
            let (f, ga, gb) = run(&a, &b, n, c, lambda);
            assert!(f.loss.is_finite() && ga.iter().chain(&gb).all(|v| v.is_finite()));
            assert!(f.clamped > 0 && f.clamped < c * c, "clamped {}", f.clamped);
            assert!(f.clamped_marginals >= 1 && f.clamped_marginals < c, "clamped marginals {}", f.clamped_marginals);
            assert_matches_reference(&a, &b, n, c, lambda, &format!("clamped, lambda {lambda}"));
        }
    }

    #[test]
    fn entropies_and_g0_follow_their_definitions() {
        let (n, c) = (50, 8);
        let a = randn(n * c, 1.5, 7);
        let b = randn(n * c, 1.5, 8);
        let lambda = 1.5f32;
        let f = mi_fwd(&a, &b, n, c, lambda);
        assert_eq!(f.clamped, 0);
        let l = lambda as f64;
        let m: Vec<f64> = f.p.chunks(c).map(|r| r.iter().sum()).collect();
        let h_m = -m.iter().map(|v| v * v.ln()).sum::<f64>();
        let h_p = -f.p.iter().map(|v| v * v.ln()).sum::<f64>();
        assert!((f.joint_entropy - h_p).abs() < 1e-12 && (f.marginal_entropy - h_m).abs() < 1e-12);
        assert!((f.loss as f64 - (h_p - 2.0 * l * h_m)).abs() < 1e-6);
        for x in 0..c {
            for y in 0..c {
                let want = -f.p[x * c + y].ln() + l * m[x].ln() + l * m[y].ln();
                assert!((f.g0[x * c + y] as f64 - want).abs() < 1e-5, "g0[{x},{y}] {} vs {want}", f.g0[x * c + y]);
            }
        }
        // The lambda = 1 loss is -I(z; z'), in [-ln C, 0].
        let f1 = mi_fwd(&a, &b, n, c, 1.0);
        assert!(f1.loss <= 0.0 && f1.loss as f64 >= -(c as f64).ln());
    }

    #[test]
    fn upstream_scales_the_gradients() {
        let (n, c) = (9, 4);
        let a = randn(n * c, 2.0, 3);
        let b = randn(n * c, 2.0, 4);
        let f = mi_fwd(&a, &b, n, c, 1.0);
        let (mut ga, mut gb) = (vec![0.0; n * c], vec![0.0; n * c]);
        let (mut ha, mut hb) = (vec![0.0; n * c], vec![0.0; n * c]);
        mi_bwd(&f, n, c, 1.0, &mut ga, &mut gb);
        mi_bwd(&f, n, c, -2.5, &mut ha, &mut hb);
        for (x, y) in ga.iter().chain(&gb).zip(ha.iter().chain(&hb)) {
            assert!((-2.5 * x - y).abs() <= 1e-6 * x.abs().max(1e-3), "{x} {y}");
        }
    }

    #[test]
    fn f64_reference_matches_its_central_differences() {
        let mut r = Rng::new(9, 1);
        for &(n, c, lambda) in &[(12usize, 5usize, 1.0f64), (12, 5, 1.5), (3, 4, 1.0), (1, 3, 2.0)] {
            let a: Vec<f64> = (0..n * c).map(|_| 2.0 * r.normal() as f64).collect();
            let b: Vec<f64> = (0..n * c).map(|_| 2.0 * r.normal() as f64).collect();
            let (_, ga, gb) = mi_loss_f64(&a, &b, n, c, lambda);
            let scale = ga.iter().chain(&gb).fold(0.0f64, |m, v| m.max(v.abs()));
            let h = 1e-5;
            for (which, analytic) in [(0, &ga), (1, &gb)] {
                for k in 0..n * c {
                    let (mut a2, mut b2) = (a.clone(), b.clone());
                    let target = if which == 0 { &mut a2 } else { &mut b2 };
                    target[k] += h;
                    let up = mi_loss_f64(&a2, &b2, n, c, lambda).0;
                    let target = if which == 0 { &mut a2 } else { &mut b2 };
                    target[k] -= 2.0 * h;
                    let down = mi_loss_f64(&a2, &b2, n, c, lambda).0;
                    let numeric = (up - down) / (2.0 * h);
                    assert!(
                        (numeric - analytic[k]).abs() <= 1e-6 * scale,
                        "n {n} C {c} lambda {lambda} view {which} [{k}]: {} vs numeric {numeric}",
                        analytic[k]
                    );
                }
            }
        }
    }

    #[test]
    fn result_does_not_depend_on_the_thread_count() {
        // Several work items: their partial products are summed in a fixed order, so one thread
        // and two give the same bits.
        let (n, c) = (3 * CHUNK_ROWS + 17, 5);
        let a = randn(n * c, 2.0, 21);
        let b = randn(n * c, 2.0, 22);
        let on = |t: usize| match rayon::ThreadPoolBuilder::new().num_threads(t).build() {
            Ok(pool) => pool.install(|| run(&a, &b, n, c, 1.5)),
            Err(e) => panic!("thread pool: {e}"),
        };
        let ((f1, ga1, gb1), (f2, ga2, gb2)) = (on(1), on(2));
        assert_eq!(f1.loss.to_bits(), f2.loss.to_bits());
        assert!(ga1 == ga2 && gb1 == gb2);
        assert_matches_reference(&a, &b, n, c, 1.5, "several chunks");
        assert_eq!(forward_chunk_rows(n, c), CHUNK_ROWS);
        assert_eq!(forward_chunk_rows(262_144, 1000), 65_536);
    }
}
