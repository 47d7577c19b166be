//! AVX-512 kernels of the MI loss for wide heads (16 < C <= `MAX_C`: overclustering heads,
//! CIFAR-100), z and w stored between the passes in the narrow kernels' class-major 16-row
//! blocks (`MiForward::blocked`).
//!
//! Why not the GEMM crate on row-major rows (the path for wider heads): at n = 65,536, C = 100
//! its per-chunk products ran at 68% (forward) and 61% (backward) of the FMA peak: it packs both
//! operands of every chunk's product, its tiles cover 112 columns of 100, and the softmax
//! gradient was a separate pass with a horizontal sum per row. Here:
//! - Forward: rows are softmaxed row-major `ROWS` at a time into a scratch, J's register tiles
//!   (4 classes x of z broadcast x 6 vectors of classes y of w) take one rank-1 update per row,
//!   J itself the tiles' home between row blocks; J's last C mod 16 columns are computed as J^T's
//!   rows, so that no tile carries a mostly empty vector. The rows then go out class-major (as
//!   streaming stores of whole lines when the chunk starts on a cache line, as the `muscle`
//!   binary's allocator places large buffers; plain stores otherwise).
//! - Backward: lanes over rows, as in the narrow kernels: u = (scale G^) v is a rank-1 update per
//!   class (its entries broadcast), <z, u> and the gradient are lane-wise, and each block's
//!   gradient rows go out as the forward's blocks do.
//!
//! Numerics: every J element is one f32 sum over a chunk's rows in order, every u element one f32
//! sum over the classes in order: a function of (n, C) only, never of the thread count.

use crate::cpu::simd::avx512::{exp16_nonpositive, transpose16};
use crate::cpu::simd::prefetch;
use std::arch::x86_64::*;

/// Widest head these kernels take: beyond it the backward's blocks outgrow L1 and the GEMM
/// crate, already within 1.2x of the FMA peak at C = 1,000, does better.
pub const MAX_C: usize = 128;

/// Rows per class-major block: one per lane.
const B: usize = 16;
/// Rows per forward row block (a multiple of B): the block's z and w (100 KiB at C = 100) stay
/// in L2 while every tile of J walks them.
const ROWS: usize = 128;
/// Forward register tile: XJ classes x of z (broadcast) x up to VJ vectors of 16 classes y of w.
const XJ: usize = 4;
const VJ: usize = 6;
/// Backward register tile: NB blocks x XU classes of u = G^ v.
const NB: usize = 4;
const XU: usize = 6;

/// Whether C classes take these kernels (the caller checks for AVX-512).
pub fn applies(c: usize) -> bool {
    c > B && c <= MAX_C
}

/// Lane mask of the first `cols` (1..=16) lanes.
#[inline(always)]
fn lanes(cols: usize) -> __mmask16 {
    ((1u32 << cols) - 1) as __mmask16
}

/// Sum of the 16 lanes in a fixed tree: lane l + lane l + 8, then + 4, + 2, + 1.
#[inline(always)]
unsafe fn tree_sum(v: __m512) -> f32 {
    let a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
    let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)))
}

/// Softmax of a row of c classes at `x[i]` into `y[i]` for each of R rows: the max, exp16 of each
/// 16 classes (stored) with the sums in one register (lane l holds classes l, l + 16, ...),
/// `tree_sum`, the reciprocal's product in place. One row is a chain of dependent steps (the
/// row max before any exp, the sum before the scale); R rows side by side give the core
/// independent work to overlap. Not inlined, and the exps go through the output rather than
/// registers: inlined, its loops were unrolled to hold every exp in registers, which spilled
/// (and how much changed with unrelated code elsewhere in the caller, by up to 30% of the pass).
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[inline(never)]
unsafe fn softmax_rows<const R: usize>(x: [*const f32; R], c: usize, y: [*mut f32; R]) {
    let vecs = c.div_ceil(B);
    let last = lanes(c - B * (vecs - 1));
    let neg = _mm512_set1_ps(f32::NEG_INFINITY);
    let load = |p: *const f32, k: usize| {
        if k + 1 < vecs {
            _mm512_loadu_ps(p.add(B * k))
        } else {
            _mm512_mask_loadu_ps(neg, last, p.add(B * k))
        }
    };
    let store = |p: *mut f32, k: usize, v: __m512| {
        if k + 1 < vecs {
            _mm512_storeu_ps(p.add(B * k), v)
        } else {
            _mm512_mask_storeu_ps(p.add(B * k), last, v)
        }
    };
    let mut m = [neg; R];
    for k in 0..vecs {
        for (mi, &xi) in m.iter_mut().zip(&x) {
            *mi = _mm512_max_ps(*mi, load(xi, k));
        }
    }
    let m = m.map(|mi| _mm512_set1_ps(_mm512_reduce_max_ps(mi)));
    let mut s = [_mm512_setzero_ps(); R];
    for k in 0..vecs {
        for i in 0..R {
            let e = exp16_nonpositive(_mm512_sub_ps(load(x[i], k), m[i]));
            store(y[i], k, e);
            s[i] = _mm512_add_ps(s[i], e);
        }
    }
    let inv = s.map(|si| _mm512_set1_ps(1.0 / tree_sum(si)));
    for k in 0..vecs {
        for i in 0..R {
            store(y[i], k, _mm512_mul_ps(load(y[i], k), inv[i]));
        }
    }
}

/// Floats of the scratch `forward_chunk` needs for C classes.
pub fn forward_scratch_len(c: usize) -> usize {
    2 * ROWS * c + c * c
}

/// Floats of the scratch `backward_chunk` needs for C classes.
pub fn backward_scratch_len(c: usize) -> usize {
    NB * B * c + B * c + c * c
}

/// `super::forward_chunk` for wide C: z and w (the softmaxes of a and b) in class-major blocks,
/// the rows after the last whole block row-major; J = Z^T W added to j (c x c).
///
/// # Safety
/// The CPU must support AVX-512 F, VL, BW and DQ; `applies(c)`; a, b, z, w hold the same whole
/// rows of c; j is c x c; `scratch` holds at least `forward_scratch_len(c)` floats.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
pub unsafe fn forward_chunk(
    a: &[f32],
    b: &[f32],
    c: usize,
    (z, w): (&mut [f32], &mut [f32]),
    j: &mut [f32],
    scratch: &mut [f32],
) {
    let rows = a.len() / c;
    let (zs, rest) = scratch.split_at_mut(ROWS * c);
    let (ws, jt) = rest.split_at_mut(ROWS * c);
    let jt = &mut jt[..c * c];
    // A block's 16 rows are 64 c contiguous bytes: on a cache line when the chunk's start is.
    let stream = (z.as_ptr() as usize | w.as_ptr() as usize).is_multiple_of(64);
    // J's columns y < 16 q come in whole vectors of w; the last c - 16 q columns are J^T's rows
    // (w broadcast, vectors of z), kept apart in `jt` (rows 16 q .. c used), so that no tile
    // carries a mostly empty vector (at C = 100 one in seven).
    let (q, vecs) = (c / B, c.div_ceil(B));
    jt[q * B * c..].fill(0.0);
    for r0 in (0..rows).step_by(ROWS) {
        let nr = ROWS.min(rows - r0);
        for r in 0..nr {
            let (ar, br) = (a.as_ptr().add((r0 + r) * c), b.as_ptr().add((r0 + r) * c));
            softmax_rows([ar, br], c, [zs.as_mut_ptr().add(r * c), ws.as_mut_ptr().add(r * c)]);
        }
        for (src, dst) in [(&*zs, &mut *z), (&*ws, &mut *w)] {
            let dst = &mut dst[r0 * c..(r0 + nr) * c];
            for blk in 0..nr / B {
                store_block(src.as_ptr().add(blk * B * c), c, dst.as_mut_ptr().add(blk * B * c), stream);
            }
            let whole = nr / B * B * c;
            dst[whole..].copy_from_slice(&src[whole..nr * c]);
        }
        let (zp, wp) = (zs.as_ptr(), ws.as_ptr());
        for x0 in (0..c).step_by(XJ) {
            joint_tiles(zp, wp, c, (x0, q, nr), j.as_mut_ptr());
        }
        for y0 in (q * B..c).step_by(XJ) {
            joint_tiles(wp, zp, c, (y0, vecs, nr), jt.as_mut_ptr());
        }
    }
    // Streaming stores are weakly ordered: fence them before the pass's end hands z and w to
    // another thread.
    _mm_sfence();
    for y in q * B..c {
        for x in 0..c {
            j[x * c + y] += jt[y * c + x];
        }
    }
}

/// 16 rows of c at `src` (row-major) to `dst` class-major (class x of row r at 16 x + r), each
/// class's 16 rows one line, streamed when `stream` (then dst is 64-byte aligned).
#[inline(always)]
unsafe fn store_block(src: *const f32, c: usize, dst: *mut f32, stream: bool) {
    for g in 0..c.div_ceil(B) {
        let cols = (c - B * g).min(B);
        let mut v = [_mm512_setzero_ps(); B];
        for (r, row) in v.iter_mut().enumerate() {
            *row = _mm512_maskz_loadu_ps(lanes(cols), src.add(r * c + B * g));
        }
        transpose16(&mut v);
        for (k, col) in v.iter().enumerate().take(cols) {
            if stream {
                _mm512_stream_ps(dst.add((B * g + k) * B), *col);
            } else {
                _mm512_storeu_ps(dst.add((B * g + k) * B), *col);
            }
        }
    }
}

/// The tiles of J's rows x0 .. x0 + XJ over the first `vecs` vectors of columns.
#[inline(always)]
unsafe fn joint_tiles(z: *const f32, w: *const f32, c: usize, (x0, vecs, nr): (usize, usize, usize), j: *mut f32) {
    // As few tiles as VJ allows, their widths within one of each other (at C = 128 two of 4
    // vectors, not 6 + 2: a 2-vector tile does a third of the FMAs per load).
    let tiles = vecs.div_ceil(VJ);
    let mut v0 = 0;
    for t in 0..tiles {
        let width = vecs / tiles + usize::from(t < vecs % tiles);
        let tile = (x0, v0, nr);
        v0 += width;
        match width {
            1 => joint_tile::<1>(z, w, c, tile, j),
            2 => joint_tile::<2>(z, w, c, tile, j),
            3 => joint_tile::<3>(z, w, c, tile, j),
            4 => joint_tile::<4>(z, w, c, tile, j),
            5 => joint_tile::<5>(z, w, c, tile, j),
            _ => joint_tile::<VJ>(z, w, c, tile, j),
        }
    }
}

/// J[x0 .. x0 + XJ][16 v0 .. 16 (v0 + V)] += sum over the `nr` rows at z, w (row-major, c
/// each): the tile is loaded from J, takes one rank-1 update per row in order, and is stored
/// back. Classes x >= c broadcast class c - 1 and are not stored; lanes y >= c are masked.
#[inline(always)]
unsafe fn joint_tile<const V: usize>(
    z: *const f32,
    w: *const f32,
    c: usize,
    (x0, v0, nr): (usize, usize, usize),
    j: *mut f32,
) {
    let mask = |v: usize| lanes((c - B * (v0 + v)).min(B));
    let xs: [usize; XJ] = std::array::from_fn(|i| (x0 + i).min(c - 1));
    let mut acc = [[_mm512_setzero_ps(); V]; XJ];
    for (i, row) in acc.iter_mut().enumerate() {
        if x0 + i < c {
            for (v, a) in row.iter_mut().enumerate() {
                *a = _mm512_maskz_loadu_ps(mask(v), j.add((x0 + i) * c + B * (v0 + v)));
            }
        }
    }
    for r in 0..nr {
        let (zr, wr) = (z.add(r * c), w.add(r * c + B * v0));
        let wv: [__m512; V] = std::array::from_fn(|v| _mm512_maskz_loadu_ps(mask(v), wr.add(B * v)));
        for (row, &x) in acc.iter_mut().zip(&xs) {
            let zx = _mm512_set1_ps(*zr.add(x));
            for (a, &wy) in row.iter_mut().zip(&wv) {
                *a = _mm512_fmadd_ps(zx, wy, *a);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        if x0 + i < c {
            for (v, &a) in row.iter().enumerate() {
                _mm512_mask_storeu_ps(j.add((x0 + i) * c + B * (v0 + v)), mask(v), a);
            }
        }
    }
}

/// `super::backward_chunk` for wide C, reading z and w as `forward_chunk` stored them: with
/// u = (scale G^) w_i, grad_a_i = z_i (u - <z_i, u>), and b's with z and w swapped (the scale
/// goes into a copy of G^ once, where the narrow kernels multiply every element by it).
///
/// # Safety
/// As for `forward_chunk`; g_hat is c x c (and symmetric, up to its rounding, for the result to
/// be the gradient); ga, gb hold the rows of z; `scratch` holds at least `backward_scratch_len(c)`
/// floats.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
pub unsafe fn backward_chunk(
    (z, w): (&[f32], &[f32]),
    g_hat: &[f32],
    c: usize,
    scale: f32,
    (ga, gb): (&mut [f32], &mut [f32]),
    scratch: &mut [f32],
) {
    let rows = z.len() / c;
    let blocks = rows / B;
    // u of NB blocks, class-major (25 KiB at C = 100), one block's gradient rows on their way
    // out, and scale G^.
    let (us, rest) = scratch.split_at_mut(NB * B * c);
    let (rows_out, rest) = rest.split_at_mut(B * c);
    let g_scaled = &mut rest[..c * c];
    for (gs, &g) in g_scaled.iter_mut().zip(g_hat) {
        *gs = scale * g;
    }
    // A block's 16 rows are 64 c contiguous bytes: on a cache line when the chunk's start is, and
    // then they go out as streaming stores of whole lines (no read of the lines they replace).
    let stream = (ga.as_ptr() as usize | gb.as_ptr() as usize).is_multiple_of(64);
    let mut blk = 0;
    while blk < blocks {
        let at = blk * B * c;
        let n = (blocks - blk).min(NB);
        if !stream {
            prefetch::<true>(ga.as_ptr().add(at), n * B * c);
            prefetch::<true>(gb.as_ptr().add(at), n * B * c);
        }
        let (zb, wb) = (z.as_ptr().add(at), w.as_ptr().add(at));
        let (gab, gbb) = (ga.as_mut_ptr().add(at), gb.as_mut_ptr().add(at));
        let out = Out { rows: rows_out.as_mut_ptr(), stream };
        let args = (c, &*g_scaled, us.as_mut_ptr(), out);
        match n {
            1 => group::<1>(zb, wb, gab, gbb, args),
            2 => group::<2>(zb, wb, gab, gbb, args),
            3 => group::<3>(zb, wb, gab, gbb, args),
            _ => group::<NB>(zb, wb, gab, gbb, args),
        }
        blk += NB;
    }
    // The rows after the last whole block (only a pass's last chunk has them): row-major.
    let done = blocks * B * c;
    if done < z.len() {
        super::backward_chunk(&z[done..], &w[done..], g_hat, c, scale, &mut ga[done..], &mut gb[done..]);
    }
    // Streaming stores are weakly ordered: fence them before the pass's end hands the gradients
    // to another thread.
    _mm_sfence();
}

/// Where a block's gradient rows are assembled (`rows`, 16 x c floats) and whether they then go
/// out as streaming stores.
#[derive(Clone, Copy)]
struct Out {
    rows: *mut f32,
    stream: bool,
}

/// The gradients of N blocks of rows with G = scale G^: u = G w and a's gradient z (u - <z, u>),
/// then u = G z and b's gradient w (u - <z, G w>) (G symmetric: <w, G z> = <z, G w>).
#[inline(always)]
unsafe fn group<const N: usize>(
    z: *const f32,
    w: *const f32,
    ga: *mut f32,
    gb: *mut f32,
    (c, g, u, out): (usize, &[f32], *mut f32, Out),
) {
    products::<N>(w, g, c, u);
    let mut d = [_mm512_setzero_ps(); N];
    for (n, dn) in d.iter_mut().enumerate() {
        let (zn, un) = (z.add(n * B * c), u.add(n * B * c));
        for x in 0..c {
            *dn = _mm512_fmadd_ps(_mm512_loadu_ps(zn.add(x * B)), _mm512_loadu_ps(un.add(x * B)), *dn);
        }
    }
    for (n, &dn) in d.iter().enumerate() {
        gradient_rows(z.add(n * B * c), u.add(n * B * c), dn, c, ga.add(n * B * c), out);
    }
    products::<N>(z, g, c, u);
    for (n, &dn) in d.iter().enumerate() {
        gradient_rows(w.add(n * B * c), u.add(n * B * c), dn, c, gb.add(n * B * c), out);
    }
}

/// The starts of the tiles of `width` that cover 0..c: every `width`, the last one moved back
/// to end at c (it recomputes a few entries, with the same bits, instead of a masked tile).
fn tile_starts(c: usize, width: usize) -> impl Iterator<Item = usize> {
    debug_assert!(c >= width);
    (0..c.div_ceil(width)).map(move |t| (t * width).min(c - width))
}

/// u = G v for N class-major blocks at `v` (each 16 x c) into `u` (same order): for each tile
/// of XU classes x, N x XU accumulators take one rank-1 update per class y (v_y of each block
/// times G_yx broadcast), the classes y in order.
#[inline(always)]
unsafe fn products<const N: usize>(v: *const f32, g: &[f32], c: usize, u: *mut f32) {
    let g = g.as_ptr();
    for x0 in tile_starts(c, XU) {
        let mut acc = [[_mm512_setzero_ps(); XU]; N];
        for y in 0..c {
            let vy: [__m512; N] = std::array::from_fn(|n| _mm512_loadu_ps(v.add(n * B * c + y * B)));
            let gy = g.add(y * c + x0);
            for x in 0..XU {
                let gv = _mm512_set1_ps(*gy.add(x));
                for (row, &vn) in acc.iter_mut().zip(&vy) {
                    row[x] = _mm512_fmadd_ps(vn, gv, row[x]);
                }
            }
        }
        for (n, row) in acc.iter().enumerate() {
            for (x, &a) in row.iter().enumerate() {
                _mm512_storeu_ps(u.add(n * B * c + (x0 + x) * B), a);
            }
        }
    }
}

/// One block's gradient rows: p_x (u_x - d) per class, back to 16 rows of c through in-register
/// transposes, into `dst` (64-byte aligned when streamed).
#[inline(always)]
unsafe fn gradient_rows(p: *const f32, u: *const f32, d: __m512, c: usize, dst: *mut f32, buf: Out) {
    let out = if buf.stream { buf.rows } else { dst };
    for g in 0..c.div_ceil(B) {
        let cols = (c - B * g).min(B);
        let mut t = [_mm512_setzero_ps(); B];
        for (k, tk) in t.iter_mut().enumerate().take(cols) {
            let x = B * g + k;
            let px = _mm512_loadu_ps(p.add(x * B));
            *tk = _mm512_mul_ps(px, _mm512_sub_ps(_mm512_loadu_ps(u.add(x * B)), d));
        }
        transpose16(&mut t);
        for (r, row) in t.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(r * c + B * g), lanes(cols), *row);
        }
    }
    if buf.stream {
        for k in 0..c {
            _mm512_stream_ps(dst.add(k * B), _mm512_loadu_ps(buf.rows.add(k * B)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer of `len` floats whose element `offset` starts on a cache line.
    struct Lined {
        lines: Vec<Line>,
        offset: usize,
        len: usize,
    }

    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Line([f32; 16]);

    impl Lined {
        fn new(len: usize, offset: usize) -> Lined {
            Lined { lines: vec![Line([0.0; 16]); (len + offset).div_ceil(16)], offset, len }
        }

        fn get(&mut self) -> &mut [f32] {
            // SAFETY: `lines` holds at least offset + len floats (Line is 16 f32s, repr(C)).
            let all =
                unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.lines.len() * 16) };
            &mut all[self.offset..self.offset + self.len]
        }
    }

    /// One chunk through both passes with z, w and the gradients starting `offset` floats past a
    /// cache line: (z, w, J, grad_a, grad_b).
    fn both_passes(a: &[f32], b: &[f32], c: usize, g_hat: &[f32], offset: usize) -> [Vec<f32>; 5] {
        let n = a.len();
        let (mut z, mut w, mut ga, mut gb) =
            (Lined::new(n, offset), Lined::new(n, offset), Lined::new(n, offset), Lined::new(n, offset));
        let mut j = vec![0.0f32; c * c];
        let mut scratch = vec![0.0f32; forward_scratch_len(c).max(backward_scratch_len(c))];
        // SAFETY: AVX-512 checked by the caller; every buffer holds whole rows of c as asked.
        unsafe {
            forward_chunk(a, b, c, (z.get(), w.get()), &mut j, &mut scratch);
            let (zs, ws) = (z.get().to_vec(), w.get().to_vec());
            backward_chunk((&zs, &ws), g_hat, c, 0.5, (ga.get(), gb.get()), &mut scratch);
        }
        [z.get().to_vec(), w.get().to_vec(), j, ga.get().to_vec(), gb.get().to_vec()]
    }

    #[test]
    fn streamed_and_plain_stores_give_the_same_bits() {
        if crate::cpu::simd::level() != crate::cpu::simd::Level::Avx512 {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        // 181 rows: groups of 4, 4 and 3 blocks, and 5 rows after the last whole block.
        for c in [17usize, 33, 100] {
            let n = 181 * c;
            let (a, b) = (crate::rng::normal_vec(n, 3.0, 1), crate::rng::normal_vec(n, 3.0, 2));
            let g = crate::rng::normal_vec(c * c, 1.0, 3);
            let g_hat: Vec<f32> = (0..c * c).map(|k| g[k] + g[(k % c) * c + k / c]).collect();
            let lined = both_passes(&a, &b, c, &g_hat, 0);
            let off = both_passes(&a, &b, c, &g_hat, 1);
            for (what, (x, y)) in ["z", "w", "J", "grad a", "grad b"].iter().zip(lined.iter().zip(&off)) {
                let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
                assert!(same, "C {c}: {what} differs between streamed and plain stores");
            }
            assert!(lined[3].iter().any(|&v| v != 0.0), "C {c}: no gradient at all");
        }
    }
}
