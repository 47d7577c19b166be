//! Winograd F(2x2, 3x3) for 3x3, stride-1, padding-1 convolutions (AVX-512 and AVX2 + FMA: the
//! same operations in the same order, so both give the same bits, those of the scalar twin
//! `forward_reference`; odd sides, where the last tile row or column is half outside the image,
//! on AVX-512 only).
//!
//! Each 2 x 2 block of outputs ("tile") comes from a 4 x 4 patch of input: with V = B^T d B the
//! patch's transform and U = G g G^T the kernel's, the tile is A^T (U . V) A, 16 products per
//! tile instead of 36. Over a group of images the products are 16 matrix products, one per
//! transform point xi: M[xi] [co x tiles] = U[xi] [co x ci] V[xi] [ci x tiles], computed by the
//! direct convolution's register tile (8 output channels x 3 vectors of 16 tiles) with ci as the
//! only sum. The input gradient of a stride-1 layer is such a convolution too (of dY with the
//! flipped kernel), so it runs here as well. So does the weight gradient (on AVX2 through 8-lane
//! twins of the same bits; only the AVX-512 transform reads x through batch norm's affine): y is
//! linear in U, so dL/dU = sum over tiles of
//! (A dY A^T) . V and dW = G^T (dL/dU) G; the sums over tiles are again 16 matrix products,
//! [co x ci] per transform point, 16 tiles per lane (`weight_grad`).
//!
//! Numerics: each output is as close to the exact sum as the direct kernel's (max error 1.0e-6
//! vs 2.4e-6 of the output RMS at 32 -> 16, 32 x 32), but the transformed weights' roundings
//! repeat in every tile, so their errors add up coherently over positions: whole-channel sums,
//! which batch norm's statistics take, feel them. With U computed in f32 arithmetic (four
//! roundings per entry), wrn-28-2's batch-norm parameter gradients landed up to 4.9e-3 from
//! PyTorch's, past the model test's 1e-3; with U computed in f64 and rounded once, the worst
//! gradient of that test is 2.0e-6 from PyTorch's (im2col + GEMM forwards: 1.6e-6). So forwards,
//! input gradients and weight gradients take Winograd by default; `MUSCLE_CONV=winograd-nodw`
//! leaves weight gradients to the direct kernels, `winograd-dx` keeps Winograd to input gradients,
//! `direct` or `gemm` turns it off. Every sum has a fixed order: results depend neither on
//! threads nor (forwards, input gradients) on the instruction set.

use crate::kernel_args::{ConvShape, InputAffine, Precision};
use rayon::prelude::*;

pub mod bf16;

/// Output channels per register tile (broadcast U values).
const OCB: usize = 8;
/// Vectors of 16 tiles per register tile.
const RV: usize = 3;
/// Transform points of F(2x2, 3x3): 4 x 4.
const XI: usize = 16;
/// Floats of V (or M) a group aims at: 512 KiB each, so both stay in a 2 MiB L2 between the
/// transforms and the products.
const GROUP_FLOATS: usize = 128 << 10;

/// Fewer input or output channels leave the transforms (per channel) heavier than the products
/// they save (per channel pair): wrn-28-2's 3 -> 16 layer ran 2.4x slower than direct.
const MIN_CHANNELS: usize = 16;

/// G of U = G g G^T (f64: U is rounded once, see the module's numerics).
const G: [[f64; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

/// Which convolutions take Winograd on this machine, from `MUSCLE_CONV`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// None (`gemm` or `direct`, for comparisons; or neither AVX-512 nor AVX2 + FMA).
    Off,
    /// Input gradients only (`winograd-dx`, to compare).
    InputGrad,
    /// Forwards and input gradients, not weight gradients (`winograd-nodw`, to compare).
    NoWeightGrad,
    /// Forwards, input gradients and weight gradients: the default.
    All,
}

fn mode() -> Mode {
    static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| {
        if super::simd::level() == super::simd::Level::Baseline {
            return Mode::Off;
        }
        match std::env::var("MUSCLE_CONV").as_deref() {
            Ok("gemm") | Ok("direct") => Mode::Off,
            Ok("winograd-dx") => Mode::InputGrad,
            Ok("winograd-nodw") => Mode::NoWeightGrad,
            _ => Mode::All,
        }
    })
}

/// Whether `Precision::Bf16` runs here: AVX512-BF16 (`bf16::available`) and Winograd on (not
/// `MUSCLE_CONV=gemm` or `direct`; with `winograd-dx` or `winograd-nodw` the passes that stay
/// Winograd's take it).
pub fn bf16_runs() -> bool {
    mode() != Mode::Off && bf16::available()
}

/// Whether this forward runs here: by default on AVX-512 and AVX2 machines (not with
/// `MUSCLE_CONV=winograd-dx`), for shapes that `fit`.
pub fn forward_applies(s: &ConvShape) -> bool {
    matches!(mode(), Mode::All | Mode::NoWeightGrad) && fits(s)
}

/// Whether the input gradient of a stride-1 layer, the convolution `t` of dY with the flipped
/// kernel, runs here: by default on AVX-512 and AVX2 machines, for shapes that `fit`.
pub fn input_grad_applies(t: &ConvShape) -> bool {
    mode() != Mode::Off && fits(t)
}

/// The shapes written for: 3x3, stride 1, padding 1, 16 or more channels in and out, sides of 2
/// or more; odd sides (the last tile row or column half outside the image, its outputs there
/// dropped) on AVX-512 only: the AVX2 twins are written for even sides.
fn fits(s: &ConvShape) -> bool {
    let even = s.h.is_multiple_of(2) && s.w.is_multiple_of(2);
    shape_written_for(s) && (even || super::simd::level() == super::simd::Level::Avx512)
}

/// `fits` without the instruction set: the shapes the scalar twin computes.
fn shape_written_for(s: &ConvShape) -> bool {
    let geometry = s.kh == 3 && s.kw == 3 && s.stride == 1 && s.pad == 1;
    geometry && s.h >= 2 && s.w >= 2 && s.ci >= MIN_CHANNELS && s.co >= MIN_CHANNELS
}

/// Tile rows and columns of an h x w plane: 2 x 2 tiles, the last half outside on an odd side.
fn tile_grid(h: usize, w: usize) -> (usize, usize) {
    (h.div_ceil(2), w.div_ceil(2))
}

/// U = G g G^T for every (output, input) channel pair, packed [XI][co / OCB][ci][OCB] (zero
/// rows past `co`), G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]. Computed in f64
/// and rounded once: U's rounding errors repeat in every tile, so they are the ones that add up
/// coherently over a channel (see the module's numerics).
fn transform_weights(s: &ConvShape, w: &[f32]) -> Vec<f32> {
    let blocks = s.co.div_ceil(OCB);
    // Per output channel in parallel ([co][ci][XI]; f64 arithmetic is slow enough to show in a
    // wrn-28-2 step when serial), then packed per transform point in parallel.
    let mut per_o = vec![0.0f32; s.co * s.ci * XI];
    per_o.par_chunks_mut(s.ci * XI).enumerate().for_each(|(o, row)| {
        for (c, dst) in row.chunks_exact_mut(XI).enumerate() {
            let g = &w[(o * s.ci + c) * 9..][..9];
            // t = G g (4 x 3), then U = t G^T (4 x 4).
            let mut t = [[0.0f64; 3]; 4];
            for (k, tr) in t.iter_mut().enumerate() {
                for (b, v) in tr.iter_mut().enumerate() {
                    *v = (0..3).map(|a| G[k][a] * f64::from(g[a * 3 + b])).sum();
                }
            }
            for k in 0..4 {
                for m in 0..4 {
                    let v: f64 = (0..3).map(|b| t[k][b] * G[m][b]).sum();
                    dst[k * 4 + m] = v as f32;
                }
            }
        }
    });
    let mut u = vec![0.0f32; XI * blocks * s.ci * OCB];
    u.par_chunks_mut(blocks * s.ci * OCB).enumerate().for_each(|(xi, ux)| {
        for o in 0..s.co {
            for c in 0..s.ci {
                ux[(o / OCB) * s.ci * OCB + c * OCB + o % OCB] = per_o[(o * s.ci + c) * XI + xi];
            }
        }
    });
    u
}

/// Floats of one row-transform scratch row: w + 2 padded columns, and 48 zeros more for the
/// last chunk's reads past them.
fn scratch_row(w: usize) -> usize {
    w + 2 + 48
}

/// Lane mask of the first `n` (<= 16) lanes.
fn first_lanes(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// Lane mask of lanes a..b (a <= b <= 16).
fn lanes(a: usize, b: usize) -> u16 {
    (((1u32 << b) - (1u32 << a)) & 0xFFFF) as u16
}

/// Rows of 8 tiles or fewer leave most lanes of a one-row vector idle, so the AVX-512
/// transforms put 16 / (w / 2) tile rows in each vector (the tiles of an image are numbered row
/// after row, so the lanes stay contiguous in V and M); the same values, so the same bits.
fn packs(w: usize) -> bool {
    w.div_ceil(2) <= 8
}

/// Floats per row-combination row of the packed input transform's scratch: the rows' padded
/// columns, (w + 2) per tile row, stay within four vectors.
const PACKED_ROW: usize = 64;

/// Floats ahead of the rows a transform is about to read that it asks the cache for: the
/// hardware prefetcher does not keep up with the transforms' short row runs, and their loads
/// of x or dy (streamed from L3 or memory) stalled a fifth of the 32 x 32 input transform.
const PREFETCH_AHEAD: usize = 512;

/// Channel c of an affine as vectors: (scale, shift, slope).
type ChannelAffine = Option<(std::arch::x86_64::__m512, std::arch::x86_64::__m512, Option<std::arch::x86_64::__m512>)>;

/// `affine`'s channel `c` broadcast.
///
/// # Safety
/// AVX-512F present; c < the affine's lengths.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[inline]
unsafe fn channel_affine(affine: Option<InputAffine>, c: usize) -> ChannelAffine {
    use std::arch::x86_64::*;
    affine.map(|a| (_mm512_set1_ps(a.scale[c]), _mm512_set1_ps(a.shift[c]), a.slope.map(|k| _mm512_set1_ps(k))))
}

/// `v` through a channel's affine and activation, lanes outside `m` zero (they are padding).
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[inline]
unsafe fn apply_affine(v: std::arch::x86_64::__m512, m: u16, a: ChannelAffine) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let Some((scale, shift, slope)) = a else { return v };
    let z = _mm512_add_ps(_mm512_mul_ps(v, scale), shift);
    let z = match slope {
        // Where z > 0 is false (z <= 0, or NaN) the activation scales, as `act` does.
        Some(k) => {
            _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(z, _mm512_setzero_ps()), _mm512_mul_ps(z, k), z)
        }
        None => z,
    };
    _mm512_maskz_mov_ps(m, z)
}

/// B^T applied to four vectors (patch rows, or patch columns): B^T = [[1, 0, -1, 0],
/// [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[inline]
unsafe fn b_t(d: [std::arch::x86_64::__m512; 4]) -> [std::arch::x86_64::__m512; 4] {
    use std::arch::x86_64::*;
    [_mm512_sub_ps(d[0], d[2]), _mm512_add_ps(d[1], d[2]), _mm512_sub_ps(d[2], d[1]), _mm512_sub_ps(d[1], d[3])]
}

/// A^T m A of 16 tiles' products m[xi], A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]: the two output
/// rows, each as (even column, odd column).
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[inline]
unsafe fn a_t_m_a(m: &[std::arch::x86_64::__m512; XI]) -> [(std::arch::x86_64::__m512, std::arch::x86_64::__m512); 2] {
    use std::arch::x86_64::*;
    let v = |k: usize, j: usize| m[k * 4 + j];
    // A^T over k, then over j.
    let s0: [__m512; 4] = std::array::from_fn(|j| _mm512_add_ps(_mm512_add_ps(v(0, j), v(1, j)), v(2, j)));
    let s1: [__m512; 4] = std::array::from_fn(|j| _mm512_sub_ps(_mm512_sub_ps(v(1, j), v(2, j)), v(3, j)));
    [s0, s1].map(|r| (_mm512_add_ps(_mm512_add_ps(r[0], r[1]), r[2]), _mm512_sub_ps(_mm512_sub_ps(r[1], r[2]), r[3])))
}

/// A dY A^T of 16 tiles from their two gradient rows, each as (even column, odd column),
/// A = [[1, 0], [1, 1], [1, -1], [0, -1]]: the 16 transform points, xi = 4 k + j.
///
/// # Safety
/// AVX-512F present.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[inline]
unsafe fn a_dy_a_t(
    r0: (std::arch::x86_64::__m512, std::arch::x86_64::__m512),
    r1: (std::arch::x86_64::__m512, std::arch::x86_64::__m512),
) -> [std::arch::x86_64::__m512; XI] {
    use std::arch::x86_64::*;
    let z = _mm512_setzero_ps();
    // A over the rows, then over the columns.
    let rows = [
        r0,
        (_mm512_add_ps(r0.0, r1.0), _mm512_add_ps(r0.1, r1.1)),
        (_mm512_sub_ps(r0.0, r1.0), _mm512_sub_ps(r0.1, r1.1)),
        (_mm512_sub_ps(z, r1.0), _mm512_sub_ps(z, r1.1)),
    ];
    let out = rows.map(|(c0, c1)| [c0, _mm512_add_ps(c0, c1), _mm512_sub_ps(c0, c1), _mm512_sub_ps(z, c1)]);
    std::array::from_fn(|xi| out[xi / 4][xi % 4])
}

/// V = B^T d B of every tile of one image's planes `x` [ci][h][w] into `v` [XI][ci][stride]
/// (transform points `pitch` apart) at tile columns t0.. (tiles row-major), B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0],
/// [0, 1, 0, -1]]: first over the patch's rows (whole image rows at once), then over its
/// columns, 16 tiles per vector (even and odd columns split by one permute each).
///
/// # Safety
/// AVX-512F/VL/BW/DQ present; `e` holds 4 `scratch_row(w)` floats, zero outside columns
/// 1..=w of each row (this function writes only those); `v` holds XI x pitch >= ci x stride floats
/// with t0 + (h / 2) (w / 2) <= stride.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[allow(clippy::too_many_arguments)]
unsafe fn input_transform(
    x: &[f32],
    ci: usize,
    h: usize,
    w: usize,
    v: &mut [f32],
    t0: usize,
    stride: usize,
    pitch: usize,
    e: &mut [f32],
    affine: Option<InputAffine>,
) {
    use std::arch::x86_64::*;
    if packs(w) {
        return input_transform_packed(x, ci, h, w, v, t0, stride, pitch, e, affine);
    }
    let (th, tw) = tile_grid(h, w);
    let er = scratch_row(w);
    assert!(
        x.len() >= ci * h * w
            && e.len() >= 4 * er
            && pitch >= ci * stride
            && v.len() >= XI * pitch
            && t0 + th * tw <= stride
    );
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let ep = e.as_mut_ptr();
    let vp = v.as_mut_ptr();
    for c in 0..ci {
        let plane = x.as_ptr().add(c * h * w);
        let aff = channel_affine(affine, c);
        for ty in 0..th {
            super::simd::prefetch::<false>(plane.wrapping_add(2 * ty * w + PREFETCH_AHEAD), 2 * w);
            // Patch rows 2 ty - 1 .. 2 ty + 2 (zero outside the image) combined by B^T's rows.
            for col in (0..w).step_by(16) {
                let m = first_lanes(w - col);
                let row = |k: usize| {
                    let r = (2 * ty + k) as isize - 1;
                    if r < 0 || r as usize >= h {
                        _mm512_setzero_ps()
                    } else {
                        apply_affine(_mm512_maskz_loadu_ps(m, plane.add(r as usize * w + col)), m, aff)
                    }
                };
                let out = b_t([row(0), row(1), row(2), row(3)]);
                for (k, o) in out.iter().enumerate() {
                    _mm512_mask_storeu_ps(ep.add(k * er + 1 + col), m, *o);
                }
            }
            // Tile tx's patch columns 2 tx - 1 .. 2 tx + 2 are padded columns 2 tx .. 2 tx + 3.
            for tx0 in (0..tw).step_by(16) {
                let m = first_lanes(tw - tx0);
                let at = t0 + ty * tw + tx0;
                for k in 0..4 {
                    let p = ep.add(k * er + 2 * tx0);
                    let (a, b) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
                    let (c2, d2) = (_mm512_loadu_ps(p.add(2)), _mm512_loadu_ps(p.add(18)));
                    let p0 = _mm512_permutex2var_ps(a, evens, b);
                    let p1 = _mm512_permutex2var_ps(a, odds, b);
                    let p2 = _mm512_permutex2var_ps(c2, evens, d2);
                    let p3 = _mm512_permutex2var_ps(c2, odds, d2);
                    let out = b_t([p0, p1, p2, p3]);
                    for (j, o) in out.iter().enumerate() {
                        _mm512_mask_storeu_ps(vp.add((k * 4 + j) * pitch + c * stride + at), m, *o);
                    }
                }
            }
        }
    }
}

/// `input_transform` for `packs(w)`: the row combinations of 16 / (w / 2) tile rows side by side
/// in the scratch (w + 2 padded columns each), then each transform point's lanes gathered from
/// them by two permutes and a blend.
///
/// # Safety
/// As `input_transform`, with `e` holding 4 PACKED_ROW floats, zero at first.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[allow(clippy::too_many_arguments)]
unsafe fn input_transform_packed(
    x: &[f32],
    ci: usize,
    h: usize,
    w: usize,
    v: &mut [f32],
    t0: usize,
    stride: usize,
    pitch: usize,
    e: &mut [f32],
    affine: Option<InputAffine>,
) {
    use std::arch::x86_64::*;
    let (th, tw) = tile_grid(h, w);
    let (rr, p) = (16 / tw, 2 * tw + 2);
    assert!(
        packs(w)
            && rr * p <= PACKED_ROW
            && x.len() >= ci * h * w
            && e.len() >= 4 * PACKED_ROW
            && pitch >= ci * stride
            && v.len() >= XI * pitch
            && t0 + th * tw <= stride
    );
    // Lane r tw + tx reads padded column 2 tx + j of tile row r: scratch float r p + 2 tx + j.
    let mut at = [[0i32; 16]; 4];
    let mut upper = [0u16; 4];
    for (j, (idx, up)) in at.iter_mut().zip(upper.iter_mut()).enumerate() {
        for (lane, i) in idx.iter_mut().enumerate().take(rr * tw) {
            let f = (lane / tw) * p + 2 * (lane % tw) + j;
            *i = f as i32;
            if f >= 32 {
                *up |= 1 << lane;
            }
        }
    }
    let idx: [__m512i; 4] = std::array::from_fn(|j| _mm512_loadu_si512(at[j].as_ptr().cast()));
    let ep = e.as_mut_ptr();
    let vp = v.as_mut_ptr();
    for c in 0..ci {
        let plane = x.as_ptr().add(c * h * w);
        let aff = channel_affine(affine, c);
        for ty0 in (0..th).step_by(rr) {
            let rows = rr.min(th - ty0);
            super::simd::prefetch::<false>(plane.wrapping_add(2 * ty0 * w + PREFETCH_AHEAD), 2 * rows * w);
            for r in 0..rows {
                let ty = ty0 + r;
                let row = |k: usize| {
                    let y = (2 * ty + k) as isize - 1;
                    if y < 0 || y as usize >= h {
                        _mm512_setzero_ps()
                    } else {
                        apply_affine(
                            _mm512_maskz_loadu_ps(first_lanes(w), plane.add(y as usize * w)),
                            first_lanes(w),
                            aff,
                        )
                    }
                };
                let out = b_t([row(0), row(1), row(2), row(3)]);
                for (k, o) in out.iter().enumerate() {
                    _mm512_mask_storeu_ps(ep.add(k * PACKED_ROW + r * p + 1), first_lanes(w), *o);
                }
            }
            let m = first_lanes(rows * tw);
            let to = t0 + ty0 * tw;
            for k in 0..4 {
                let q = ep.add(k * PACKED_ROW);
                let (a, b) = (_mm512_loadu_ps(q), _mm512_loadu_ps(q.add(16)));
                let (c2, d2) = (_mm512_loadu_ps(q.add(32)), _mm512_loadu_ps(q.add(48)));
                // permutex2var reads the low 5 index bits: the same indices pick from c2, d2.
                let pj: [__m512; 4] = std::array::from_fn(|j| {
                    _mm512_mask_blend_ps(
                        upper[j],
                        _mm512_permutex2var_ps(a, idx[j], b),
                        _mm512_permutex2var_ps(c2, idx[j], d2),
                    )
                });
                let out = b_t(pj);
                for (j, o) in out.iter().enumerate() {
                    _mm512_mask_storeu_ps(vp.add((k * 4 + j) * pitch + c * stride + to), m, *o);
                }
            }
        }
    }
}

/// One image's outputs `y` [co][h][w] from M [XI][co][stride] (points `pitch` apart) at tile
/// columns t0..:
/// Y = A^T m A per tile, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], 16 tiles per vector, each
/// output row's two columns interleaved by one permute each.
///
/// # Safety
/// AVX-512F/VL/BW/DQ present; `mb` holds XI x pitch >= co x stride floats with
/// t0 + (h / 2) (w / 2) <= stride; `y` holds co x h x w floats.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[allow(clippy::too_many_arguments)]
unsafe fn output_transform(
    mb: &[f32],
    co: usize,
    h: usize,
    w: usize,
    t0: usize,
    stride: usize,
    pitch: usize,
    y: &mut [f32],
) {
    use std::arch::x86_64::*;
    if packs(w) {
        return output_transform_packed(mb, co, h, w, t0, stride, pitch, y);
    }
    let (th, tw) = tile_grid(h, w);
    assert!(pitch >= co * stride && mb.len() >= XI * pitch && t0 + th * tw <= stride && y.len() >= co * h * w);
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let yp = y.as_mut_ptr();
    for o in 0..co {
        for ty in 0..th {
            super::simd::prefetch::<true>(yp.wrapping_add((o * h + 2 * ty) * w + PREFETCH_AHEAD), 2 * w);
            for tx0 in (0..tw).step_by(16) {
                let n = (tw - tx0).min(16);
                let at = t0 + ty * tw + tx0;
                let m: [__m512; XI] = std::array::from_fn(|xi| {
                    _mm512_maskz_loadu_ps(first_lanes(n), mb.as_ptr().add(xi * pitch + o * stride + at))
                });
                let rows = a_t_m_a(&m);
                // Odd sides: the last tile's second row and column lie outside.
                let cols = (2 * n).min(w - 2 * tx0);
                for (dr, (even, odd)) in rows.into_iter().enumerate().take(h - 2 * ty) {
                    let dst = yp.add((o * h + 2 * ty + dr) * w + 2 * tx0);
                    _mm512_mask_storeu_ps(dst, first_lanes(cols), _mm512_permutex2var_ps(even, lo, odd));
                    if cols > 16 {
                        _mm512_mask_storeu_ps(
                            dst.add(16),
                            first_lanes(cols - 16),
                            _mm512_permutex2var_ps(even, hi, odd),
                        );
                    }
                }
            }
        }
    }
}

/// `output_transform` for `packs(w)`: 16 / (w / 2) tile rows per vector; each tile row's two
/// output rows leave through masked stores whose base is shifted back by the row's first lane.
///
/// # Safety
/// As `output_transform`.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[allow(clippy::too_many_arguments)]
unsafe fn output_transform_packed(
    mb: &[f32],
    co: usize,
    h: usize,
    w: usize,
    t0: usize,
    stride: usize,
    pitch: usize,
    y: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (th, tw) = tile_grid(h, w);
    let rr = 16 / tw;
    assert!(
        packs(w) && pitch >= co * stride && mb.len() >= XI * pitch && t0 + th * tw <= stride && y.len() >= co * h * w
    );
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let yp = y.as_mut_ptr();
    for o in 0..co {
        for ty0 in (0..th).step_by(rr) {
            let rows = rr.min(th - ty0);
            super::simd::prefetch::<true>(yp.wrapping_add((o * h + 2 * ty0) * w + PREFETCH_AHEAD), 2 * rows * w);
            let at = t0 + ty0 * tw;
            let m: [__m512; XI] = std::array::from_fn(|xi| {
                _mm512_maskz_loadu_ps(first_lanes(rows * tw), mb.as_ptr().add(xi * pitch + o * stride + at))
            });
            let out_rows = a_t_m_a(&m);
            for (dr, (even, odd)) in out_rows.into_iter().enumerate() {
                // Floats 2 L, 2 L + 1 of (first, second) are lane L's two columns.
                let (first, second) = (_mm512_permutex2var_ps(even, lo, odd), _mm512_permutex2var_ps(even, hi, odd));
                for r in 0..rows {
                    if 2 * (ty0 + r) + dr >= h {
                        continue;
                    }
                    let (a, b) = (2 * r * tw, 2 * r * tw + w);
                    // Float f of the pair goes to column f - a of this output row.
                    let base = yp.add((o * h + 2 * (ty0 + r) + dr) * w).wrapping_sub(a);
                    if a < 16 {
                        _mm512_mask_storeu_ps(base, lanes(a, b.min(16)), first);
                    }
                    if b > 16 {
                        _mm512_mask_storeu_ps(base.wrapping_add(16), lanes(a.max(16) - 16, b - 16), second);
                    }
                }
            }
        }
    }
}

/// y [n, co, h, w] = conv3x3(x [n, ci, h, w], w [co, ci, 3, 3]), stride 1, padding 1, through
/// F(2x2, 3x3), its products in `precision` (bf16: `bf16::available` holds). Callers check
/// `forward_applies` or `input_grad_applies` (or AVX-512 and `fits`) first.
pub fn forward(s: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32], precision: Precision) {
    // SIMD code, and odd sides would leave a row and a column unwritten.
    assert!(mode() != Mode::Off && fits(s), "winograd::forward: {s:?} on this CPU");
    let in_bf16 = precision == Precision::Bf16;
    assert!(!in_bf16 || bf16::available(), "winograd::forward: bf16 products on a CPU without AVX512-BF16");
    let avx512 = super::simd::level() == super::simd::Level::Avx512;
    let (th, tw) = tile_grid(s.h, s.w);
    let tiles = th * tw;
    let imgs = (GROUP_FLOATS / (XI * s.ci.max(s.co) * tiles)).clamp(1, s.n.max(1));
    let stride = (imgs * tiles).next_multiple_of(16);
    let u = transform_weights(s, w);
    let u_bf16 = if in_bf16 { bf16::pack_weights(&u, s.ci, OCB) } else { Vec::new() };
    let pairs = s.ci.div_ceil(2);
    let (img_in, img_out) = (s.ci * s.h * s.w, s.co * s.h * s.w);
    let blocks = s.co.div_ceil(OCB);
    // One cache line between transform points: XI rows a multiple of 4 KiB apart would share
    // L1 sets, and the transforms touch all XI at once.
    let (vpitch, mpitch) = (s.ci * stride + 16, s.co * stride + 16);
    // bf16: one transform point's V at a time, as channel pairs (u16, in f32 storage).
    let bf16_floats = if in_bf16 { pairs * bf16::pair_row(stride) / 2 } else { 0 };
    let init = || Scratch::new(vpitch, mpitch, s.w).with_bf16(bf16_floats);
    y.par_chunks_mut(imgs * img_out).zip(x.par_chunks(imgs * img_in)).for_each_init(init, |sc, (yg, xg)| {
        let (vb, mb, e) = (&mut sc.v, &mut sc.m, &mut sc.e);
        let k_imgs = xg.len() / img_in;
        for k in 0..k_imgs {
            let xk = &xg[k * img_in..][..img_in];
            // SAFETY: the CPU has the instruction set of the branch taken (`mode`, `level`); e
            // is zero outside the columns the transforms write; vb holds XI x vpitch floats and
            // k tiles + tiles <= stride.
            unsafe {
                if avx512 {
                    input_transform(xk, s.ci, s.h, s.w, vb, k * tiles, stride, vpitch, e, None)
                } else {
                    avx2::input_transform(xk, s.ci, s.h, s.w, vb, k * tiles, stride, vpitch, e)
                }
            }
        }
        // Tiles past the group's last (up to a whole vector) hold stale values; their products
        // land in M's padding and are never read.
        let ntiles = k_imgs * tiles;
        for xi in 0..XI {
            if in_bf16 {
                let vh: &mut [u16] = bytemuck::cast_slice_mut(&mut sc.bf16[..]);
                let (vx, mx) = (&vb[xi * vpitch..][..s.ci * stride], &mut mb[xi * mpitch..][..s.co * stride]);
                products_bf16(vx, vh, &u_bf16, xi, s, stride, ntiles, mx);
                continue;
            }
            for b in 0..blocks {
                let valid = (s.co - b * OCB).min(OCB);
                let ub = &u[(xi * blocks + b) * s.ci * OCB..][..s.ci * OCB];
                let vx = &vb[xi * vpitch..][..s.ci * stride];
                let mx = &mut mb[xi * mpitch + b * OCB * stride..][..valid * stride];
                // SAFETY: vectors of 16 (8) tiles up to ntiles rounded up lie within `stride` (a
                // multiple of 16 covering every tile) in each of the ci rows of vx and the
                // `valid` rows of mx; ub holds ci x OCB floats; the CPU has the instruction set
                // of the branch taken.
                unsafe {
                    let (vp, up, mp) = (vx.as_ptr(), ub.as_ptr(), mx.as_mut_ptr());
                    if avx512 {
                        // Whole register tiles of RV vectors, then the last vectors one by one.
                        let nvec = ntiles.div_ceil(16);
                        let whole = nvec / RV * RV;
                        for q in (0..whole).step_by(RV) {
                            product::<RV>(vp.add(16 * q), stride, up, s.ci, mp.add(16 * q), valid);
                        }
                        for q in whole..nvec {
                            product::<1>(vp.add(16 * q), stride, up, s.ci, mp.add(16 * q), valid);
                        }
                    } else {
                        avx2::products(vp, stride, up, s.ci, mp, valid, ntiles);
                    }
                }
            }
        }
        for k in 0..k_imgs {
            let yk = &mut yg[k * img_out..][..img_out];
            // SAFETY: the CPU has the instruction set of the branch taken; mb holds XI x mpitch
            // floats.
            unsafe {
                if avx512 {
                    output_transform(mb, s.co, s.h, s.w, k * tiles, stride, mpitch, yk)
                } else {
                    avx2::output_transform(mb, s.co, s.h, s.w, k * tiles, stride, mpitch, yk)
                }
            }
        }
    });
}

/// The bf16 products of one transform point `xi` of a forward group: V's `ci` rows (`stride`
/// floats apart) rounded and interleaved in channel pairs into `vh`, then every block of output
/// channels of M (`co` rows) from the packed pairs of U (`bf16::pack_weights`).
#[allow(clippy::too_many_arguments)]
fn products_bf16(
    v: &[f32],
    vh: &mut [u16],
    u: &[u32],
    xi: usize,
    s: &ConvShape,
    stride: usize,
    ntiles: usize,
    m: &mut [f32],
) {
    let (pairs, blocks, nvec) = (s.ci.div_ceil(2), s.co.div_ceil(OCB), ntiles.div_ceil(16));
    let row = bf16::pair_row(stride);
    assert!(
        v.len() >= s.ci * stride && vh.len() >= pairs * row && m.len() >= s.co * stride && 16 * nvec <= stride,
        "winograd::products_bf16: {s:?}, {ntiles} tiles of {stride}"
    );
    assert!(u.len() >= (xi + 1) * blocks * pairs * OCB, "winograd::products_bf16: packed weights");
    let whole = nvec / RV * RV;
    // SAFETY: `forward` checked `bf16::available`; the asserts bound the ci rows of nvec vectors
    // read in v, the pair rows written in vh and read back, the `valid` rows of M written and
    // the pairs x OCB words of U per block.
    unsafe {
        bf16::interleave_rows(v.as_ptr(), stride, s.ci, nvec, vh.as_mut_ptr());
        for b in 0..blocks {
            let valid = (s.co - b * OCB).min(OCB);
            let ub = u.as_ptr().add((xi * blocks + b) * pairs * OCB);
            let mp = m.as_mut_ptr().add(b * OCB * stride);
            for q in (0..whole).step_by(RV) {
                bf16::product::<RV, OCB>(vh.as_ptr().add(32 * q), row, ub, pairs, mp.add(16 * q), stride, valid);
            }
            for q in whole..nvec {
                bf16::product::<1, OCB>(vh.as_ptr().add(32 * q), row, ub, pairs, mp.add(16 * q), stride, valid);
            }
        }
    }
}

/// One task's buffers: V and M from the tensor pool (stale values: every element read is
/// written first, but for padding lanes whose products are never read), returned on drop, so
/// the task splits of every call do not zero megabytes; the row-transform scratch (four rows,
/// and a fifth that stays zero: the AVX2 transform's rows above and below the image); with bf16
/// products, their operands (u16 pairs in f32 storage, from the pool too).
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    e: Vec<f32>,
    bf16: Vec<f32>,
}

impl Scratch {
    /// XI rows of `vpitch` and of `mpitch` floats, and the row scratch of a plane `w` wide.
    fn new(vpitch: usize, mpitch: usize, w: usize) -> Self {
        Scratch {
            v: crate::pool::take(XI * vpitch),
            m: crate::pool::take(XI * mpitch),
            e: vec![0.0f32; 5 * scratch_row(w)],
            bf16: Vec::new(),
        }
    }

    /// With `floats` of bf16 operand storage (none for 0).
    fn with_bf16(mut self, floats: usize) -> Self {
        if floats > 0 {
            self.bf16 = crate::pool::take(floats);
        }
        self
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        crate::pool::give(std::mem::take(&mut self.v));
        crate::pool::give(std::mem::take(&mut self.m));
        crate::pool::give(std::mem::take(&mut self.bf16));
    }
}

/// M rows o < valid (`stride` apart) at R vectors of 16 tiles = sum over c < ci of
/// U[c][o] x V row c (`stride` apart): the register tile of `direct_conv`, without taps.
///
/// # Safety
/// AVX-512F/VL/BW/DQ present; `v + c * stride .. + 16 R` readable for c < ci; `u` holds
/// ci * OCB floats; `m + o * stride .. + 16 R` writable for o < valid.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
unsafe fn product<const R: usize>(v: *const f32, stride: usize, u: *const f32, ci: usize, m: *mut f32, valid: usize) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); R]; OCB];
    for c in 0..ci {
        let row = v.add(c * stride);
        let xv: [__m512; R] = std::array::from_fn(|r| _mm512_loadu_ps(row.add(16 * r)));
        for (o, acc_o) in acc.iter_mut().enumerate() {
            let g = _mm512_set1_ps(*u.add(c * OCB + o));
            for r in 0..R {
                acc_o[r] = _mm512_fmadd_ps(g, xv[r], acc_o[r]);
            }
        }
    }
    for (o, acc_o) in acc.iter().enumerate().take(valid) {
        for (r, a) in acc_o.iter().enumerate() {
            _mm512_storeu_ps(m.add(o * stride + 16 * r), *a);
        }
    }
}

/// Floats of V or Y' a weight-gradient group aims at: 1 MiB each. Every (output, input) channel
/// pair's sum over a group ends in a horizontal add, so groups are larger than the forward's
/// (the products of one transform point read only their slices); on Zen 4, 128 Ki, 256 Ki and
/// 512 Ki floats took 4.7 / 4.1 / 4.6 ms at 64 -> 64, 16 x 16, batch 64, 6.0 / 4.8 / 5.6 at
/// 128 -> 128, 8 x 8.
const DW_GROUP_FLOATS: usize = 256 << 10;
/// Image ranges whose weight-gradient sums are kept apart, then added in order: a number fixed
/// by the shape, never by the threads, so the result is too.
const DW_RANGES: usize = 16;
/// Channels per side of the weight gradient's register tile (4 x 4 accumulators of 16 tiles).
const DW_TILE: usize = 4;

/// Whether the weight gradient of this layer runs here: by default on AVX-512 and AVX2 machines
/// (not with `MUSCLE_CONV=winograd-dx` or `winograd-nodw`), for shapes that `fit`.
pub fn weight_grad_applies(s: &ConvShape) -> bool {
    mode() == Mode::All && fits(s)
}

/// Whether `weight_grad` can read its input through an `InputAffine` here: the AVX-512
/// transform applies it; the AVX2 one does not (the caller recomputes the input instead).
pub fn weight_grad_reads_affine(s: &ConvShape) -> bool {
    weight_grad_applies(s) && super::simd::level() == super::simd::Level::Avx512
}

/// dW [co, ci, 3, 3] (overwritten) of y = conv3x3(x) through F(2x2, 3x3): with Y' = A dY A^T of
/// each output tile and V = B^T d B of its input patch, dL/dU = sum over tiles of Y' . V (16
/// products [co x ci] = Y'[xi] V[xi]^T summed over tiles, 16 tiles per lane vector), and
/// dW = G^T (dL/dU) G, computed in f64 and rounded once. Each range of images sums its groups in
/// order; the ranges are added in order, in f64: the bits depend on the shape only.
pub fn weight_grad(
    s: &ConvShape,
    x: &[f32],
    affine: Option<InputAffine>,
    dy: &[f32],
    dw: &mut [f32],
    precision: Precision,
) {
    assert!(weight_grad_applies(s), "winograd::weight_grad: {s:?} on this CPU");
    let avx512 = super::simd::level() == super::simd::Level::Avx512;
    assert!(affine.is_none() || avx512, "winograd::weight_grad: an input affine needs AVX-512");
    weight_grad_on(s, x, affine, dy, dw, avx512, precision)
}

/// `weight_grad` with the AVX-512 kernels or their AVX2 twins (the same bits; tests compare
/// them on one machine), the products in `precision` (bf16: AVX-512 with `bf16::available`).
fn weight_grad_on(
    s: &ConvShape,
    x: &[f32],
    affine: Option<InputAffine>,
    dy: &[f32],
    dw: &mut [f32],
    avx512: bool,
    precision: Precision,
) {
    assert!(x.len() >= s.x_len() && dy.len() >= s.y_len() && dw.len() >= s.w_len(), "winograd::weight_grad: lengths");
    let in_bf16 = precision == Precision::Bf16;
    assert!(
        !in_bf16 || (avx512 && bf16::available()),
        "winograd::weight_grad: bf16 products on a CPU without AVX512-BF16"
    );
    assert!(
        affine.is_none_or(|a| a.scale.len() >= s.ci && a.shift.len() >= s.ci),
        "winograd::weight_grad: {} channels, affine of {:?}",
        s.ci,
        affine.map(|a| (a.scale.len(), a.shift.len()))
    );
    let (th, tw) = tile_grid(s.h, s.w);
    let tiles = th * tw;
    let (ci4, co4) = (s.ci.next_multiple_of(DW_TILE), s.co.next_multiple_of(DW_TILE));
    let imgs = (DW_GROUP_FLOATS / (XI * ci4.max(co4) * tiles)).clamp(1, s.n.max(1));
    let stride = (imgs * tiles).next_multiple_of(16);
    let (vpitch, ypitch) = (ci4 * stride + 16, co4 * stride + 16);
    let (obs, cbs) = (co4 / DW_TILE, ci4 / DW_TILE);
    let (img_in, img_out) = (s.ci * s.h * s.w, s.co * s.h * s.w);
    let groups = s.n.div_ceil(imgs);
    let per_range = groups.div_ceil(DW_RANGES);
    let ranges = groups.div_ceil(per_range);
    let partials: Vec<Vec<f32>> = (0..ranges)
        .into_par_iter()
        .map(|r| {
            // bf16: one transform point's V and Y' rows at a time, in whole 32-tile vectors.
            let bf_stride = stride.next_multiple_of(32);
            let mut sc =
                Scratch::new(vpitch, ypitch, s.w).with_bf16(if in_bf16 { (ci4 + co4) * bf_stride / 2 } else { 0 });
            // Sums per register tile: [XI][co4 / DW_TILE][ci4 / DW_TILE][DW_TILE x DW_TILE].
            let mut part = vec![0.0f32; XI * co4 * ci4];
            for g in r * per_range..((r + 1) * per_range).min(groups) {
                let k0 = g * imgs;
                let k_imgs = imgs.min(s.n - k0);
                let ntiles = k_imgs * tiles;
                let padded = ntiles.next_multiple_of(16);
                for k in 0..k_imgs {
                    let xk = &x[(k0 + k) * img_in..][..img_in];
                    let dyk = &dy[(k0 + k) * img_out..][..img_out];
                    // SAFETY: the instruction set of the branch taken (`weight_grad_applies`:
                    // AVX-512, or AVX2 with even sides); e is zero outside the columns the
                    // transform writes (and in its fifth row); both buffers hold XI pitches of >=
                    // channels x stride floats and k tiles + tiles <= stride.
                    unsafe {
                        let (v, m, e) = (&mut sc.v, &mut sc.m, &mut sc.e);
                        if avx512 {
                            input_transform(xk, s.ci, s.h, s.w, v, k * tiles, stride, vpitch, e, affine);
                            grad_transform(dyk, s.co, s.h, s.w, m, k * tiles, stride, ypitch);
                        } else {
                            avx2::input_transform(xk, s.ci, s.h, s.w, v, k * tiles, stride, vpitch, e);
                            avx2::grad_transform(dyk, s.co, s.h, s.w, m, k * tiles, stride, ypitch);
                        }
                    }
                }
                // Lanes past the last tile and the rows that pad the channels to whole register
                // tiles must add nothing: zeros in both operands.
                for xi in 0..XI {
                    for (buf, pitch, ch, ch4) in [(&mut sc.v, vpitch, s.ci, ci4), (&mut sc.m, ypitch, s.co, co4)] {
                        let rows = &mut buf[xi * pitch..][..ch4 * stride];
                        for (c, row) in rows.chunks_exact_mut(stride).enumerate() {
                            let from = if c < ch { ntiles } else { 0 };
                            row[from..padded].fill(0.0);
                        }
                    }
                }
                let nvec = padded / 16;
                for xi in 0..XI {
                    let (vx, yx) = (&sc.v[xi * vpitch..][..ci4 * stride], &sc.m[xi * ypitch..][..co4 * stride]);
                    if in_bf16 {
                        let sums = &mut part[xi * obs * cbs * 16..][..obs * cbs * 16];
                        dw_point_bf16(
                            vx,
                            yx,
                            stride,
                            nvec,
                            bytemuck::cast_slice_mut(&mut sc.bf16[..]),
                            bf_stride,
                            sums,
                        );
                        continue;
                    }
                    for ob in 0..obs {
                        for cb in 0..cbs {
                            let dst = &mut part[((xi * obs + ob) * cbs + cb) * 16..][..16];
                            let (yp, vp) = (yx.as_ptr(), vx.as_ptr());
                            let (yp, vp) =
                                (yp.wrapping_add(ob * DW_TILE * stride), vp.wrapping_add(cb * DW_TILE * stride));
                            // SAFETY: the instruction set of the branch taken; rows ob and cb x
                            // DW_TILE.. + DW_TILE lie within the co4 and ci4 rows of `stride` >=
                            // 16 nvec floats.
                            unsafe {
                                if avx512 {
                                    dw_products(yp, vp, stride, nvec, dst.as_mut_ptr())
                                } else {
                                    avx2::dw_products(yp, vp, stride, nvec, dst.as_mut_ptr())
                                }
                            };
                        }
                    }
                }
            }
            part
        })
        .collect();
    // The ranges in order for every element (chunks in parallel), then G^T dU G per output
    // channel in parallel.
    let mut total = vec![0.0f64; XI * co4 * ci4];
    total.par_chunks_mut(4096).enumerate().for_each(|(i, chunk)| {
        for p in &partials {
            for (t, v) in chunk.iter_mut().zip(&p[i * 4096..]) {
                *t += f64::from(*v);
            }
        }
    });
    dw[..s.w_len()].par_chunks_mut(s.ci * 9).enumerate().for_each(|(o, row)| {
        for c in 0..s.ci {
            let at = |xi| ((xi * obs + o / DW_TILE) * cbs + c / DW_TILE) * 16 + (o % DW_TILE) * DW_TILE + c % DW_TILE;
            let du: [f64; XI] = std::array::from_fn(|xi| total[at(xi)]);
            for a in 0..3 {
                for b in 0..3 {
                    let mut v = 0.0f64;
                    for k in 0..4 {
                        for m in 0..4 {
                            v += G[k][a] * du[k * 4 + m] * G[m][b];
                        }
                    }
                    row[c * 9 + a * 3 + b] = v as f32;
                }
            }
        }
    });
}

/// Y' = A dY A^T of every 2 x 2 output tile of one image's gradient planes `dy` [co][h][w] into
/// `m` [XI][co][stride] (points `pitch` apart) at tile columns t0.., A = [[1, 0], [1, 1],
/// [1, -1], [0, -1]]: the output transform's transpose, 16 tiles per vector.
///
/// # Safety
/// AVX-512F/VL/BW/DQ present; `m` holds XI x pitch >= co x stride floats with
/// t0 + (h / 2) (w / 2) <= stride; `dy` holds co x h x w floats.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[allow(clippy::too_many_arguments)]
unsafe fn grad_transform(
    dy: &[f32],
    co: usize,
    h: usize,
    w: usize,
    m: &mut [f32],
    t0: usize,
    stride: usize,
    pitch: usize,
) {
    use std::arch::x86_64::*;
    if packs(w) {
        return grad_transform_packed(dy, co, h, w, m, t0, stride, pitch);
    }
    let (th, tw) = tile_grid(h, w);
    assert!(pitch >= co * stride && m.len() >= XI * pitch && t0 + th * tw <= stride && dy.len() >= co * h * w);
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let mp = m.as_mut_ptr();
    for o in 0..co {
        for ty in 0..th {
            super::simd::prefetch::<false>(dy.as_ptr().wrapping_add((o * h + 2 * ty) * w + PREFETCH_AHEAD), 2 * w);
            for tx0 in (0..tw).step_by(16) {
                let n = (tw - tx0).min(16);
                let at = t0 + ty * tw + tx0;
                // Each tile's two columns of each of its two rows, 16 tiles per vector.
                // Odd sides: the last tile's second row and column lie outside (zeros).
                let valid = (2 * n).min(w - 2 * tx0);
                let cols = |dr: usize| {
                    if 2 * ty + dr >= h {
                        return (_mm512_setzero_ps(), _mm512_setzero_ps());
                    }
                    let src = dy.as_ptr().add((o * h + 2 * ty + dr) * w + 2 * tx0);
                    let a = _mm512_maskz_loadu_ps(first_lanes(valid), src);
                    let b = if valid > 16 {
                        _mm512_maskz_loadu_ps(first_lanes(valid - 16), src.add(16))
                    } else {
                        _mm512_setzero_ps()
                    };
                    (_mm512_permutex2var_ps(a, evens, b), _mm512_permutex2var_ps(a, odds, b))
                };
                for (xi, v) in a_dy_a_t(cols(0), cols(1)).into_iter().enumerate() {
                    _mm512_mask_storeu_ps(mp.add(xi * pitch + o * stride + at), first_lanes(n), v);
                }
            }
        }
    }
}

/// `grad_transform` for `packs(w)`: 16 / (w / 2) tile rows per vector, each row's values brought
/// into its lanes by masked loads whose base is shifted back by the row's first lane.
///
/// # Safety
/// As `grad_transform`.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[allow(clippy::too_many_arguments)]
unsafe fn grad_transform_packed(
    dy: &[f32],
    co: usize,
    h: usize,
    w: usize,
    m: &mut [f32],
    t0: usize,
    stride: usize,
    pitch: usize,
) {
    use std::arch::x86_64::*;
    let (th, tw) = tile_grid(h, w);
    let rr = 16 / tw;
    assert!(
        packs(w) && pitch >= co * stride && m.len() >= XI * pitch && t0 + th * tw <= stride && dy.len() >= co * h * w
    );
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let mp = m.as_mut_ptr();
    for o in 0..co {
        for ty0 in (0..th).step_by(rr) {
            let rows = rr.min(th - ty0);
            super::simd::prefetch::<false>(
                dy.as_ptr().wrapping_add((o * h + 2 * ty0) * w + PREFETCH_AHEAD),
                2 * rows * w,
            );
            let at = t0 + ty0 * tw;
            let cols = |dr: usize| {
                let (mut first, mut second) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                for r in 0..rows {
                    if 2 * (ty0 + r) + dr >= h {
                        continue;
                    }
                    let (a, b) = (2 * r * tw, 2 * r * tw + w);
                    let base = dy.as_ptr().add((o * h + 2 * (ty0 + r) + dr) * w).wrapping_sub(a);
                    if a < 16 {
                        first = _mm512_mask_loadu_ps(first, lanes(a, b.min(16)), base);
                    }
                    if b > 16 {
                        second = _mm512_mask_loadu_ps(second, lanes(a.max(16) - 16, b - 16), base.wrapping_add(16));
                    }
                }
                (_mm512_permutex2var_ps(first, evens, second), _mm512_permutex2var_ps(first, odds, second))
            };
            for (xi, v) in a_dy_a_t(cols(0), cols(1)).into_iter().enumerate() {
                _mm512_mask_storeu_ps(mp.add(xi * pitch + o * stride + at), first_lanes(rows * tw), v);
            }
        }
    }
}

/// Adds to `out` (16 floats, [a][b]) the DW_TILE x DW_TILE sums over `nvec` vectors of 16 tiles
/// of Y' rows `y` times V rows `v` (rows `stride` apart): each lane a running sum over its tiles,
/// then the 16 accumulators' lanes added in one transpose-and-add tree (45 instructions, not 16
/// horizontal sums of 8).
///
/// # Safety
/// AVX-512F present; DW_TILE rows of 16 nvec floats readable at `y` and at `v`; 16 floats at `out`.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
unsafe fn dw_products(y: *const f32, v: *const f32, stride: usize, nvec: usize, out: *mut f32) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); DW_TILE]; DW_TILE];
    for q in 0..nvec {
        let yv: [__m512; DW_TILE] = std::array::from_fn(|a| _mm512_loadu_ps(y.add(a * stride + 16 * q)));
        for b in 0..DW_TILE {
            let vv = _mm512_loadu_ps(v.add(b * stride + 16 * q));
            for (acc_a, ya) in acc.iter_mut().zip(&yv) {
                acc_a[b] = _mm512_fmadd_ps(*ya, vv, acc_a[b]);
            }
        }
    }
    add_tile_totals(acc, out)
}

/// The bf16 weight-gradient sums of one transform point: V's and Y''s rows (`stride` floats
/// apart; `v` and `y` hold whole register tiles of them, 16 nvec tiles each, zeros past the
/// group's last tile) rounded to bf16 into `scratch` (rows `bf_stride` u16 apart, V's first),
/// then every DW_TILE x DW_TILE tile of (output, input) channels added to its 16 sums in
/// `sums` ([co / DW_TILE][ci / DW_TILE][16]).
fn dw_point_bf16(
    v: &[f32],
    y: &[f32],
    stride: usize,
    nvec: usize,
    scratch: &mut [u16],
    bf_stride: usize,
    sums: &mut [f32],
) {
    let (ci4, co4, nbf) = (v.len() / stride, y.len() / stride, nvec.div_ceil(2));
    let (obs, cbs) = (co4 / DW_TILE, ci4 / DW_TILE);
    assert!(
        ci4 % DW_TILE == 0 && co4 % DW_TILE == 0 && 16 * nvec <= stride && 32 * nbf <= bf_stride,
        "winograd::dw_point_bf16: {ci4} x {co4} rows of {stride}, {nvec} vectors"
    );
    assert!(
        scratch.len() >= (ci4 + co4) * bf_stride && sums.len() >= obs * cbs * 16,
        "winograd::dw_point_bf16: buffers"
    );
    assert!(bf16::available(), "winograd::dw_point_bf16: a CPU without AVX512-BF16");
    let (vh, yh) = scratch.split_at_mut(ci4 * bf_stride);
    // SAFETY: AVX512-BF16 (asserted); the asserts bound the ci4 and co4 rows of 16 nvec floats
    // read, the rows of 32 nbf u16 written to and read from vh and yh, and the 16 sums per tile.
    unsafe {
        bf16::convert_rows(v.as_ptr(), stride, ci4, nvec, vh.as_mut_ptr(), bf_stride);
        bf16::convert_rows(y.as_ptr(), stride, co4, nvec, yh.as_mut_ptr(), bf_stride);
        for ob in 0..obs {
            for cb in 0..cbs {
                let yp = yh.as_ptr().add(ob * DW_TILE * bf_stride);
                let vp = vh.as_ptr().add(cb * DW_TILE * bf_stride);
                dw_products_bf16(yp, vp, bf_stride, nbf, sums.as_mut_ptr().add((ob * cbs + cb) * 16));
            }
        }
    }
}

/// `dw_products` of bf16 rows (`bf16::convert_rows`): `nbf` vectors of 32 tiles, rows
/// `stride` u16 apart.
///
/// # Safety
/// AVX-512F and BF16 present; DW_TILE rows of 32 nbf u16 readable at `y` and at `v`; 16 floats
/// at `out`.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx512bf16")]
unsafe fn dw_products_bf16(y: *const u16, v: *const u16, stride: usize, nbf: usize, out: *mut f32) {
    add_tile_totals(bf16::dw_sums::<DW_TILE>(y, v, stride, nbf), out)
}

/// Adds to `out` (16 floats, [a][b]) the lane totals of the DW_TILE x DW_TILE accumulators.
///
/// # Safety
/// AVX-512F present; 16 floats at `out`.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
unsafe fn add_tile_totals(acc: [[std::arch::x86_64::__m512; DW_TILE]; DW_TILE], out: *mut f32) {
    use std::arch::x86_64::*;
    let r: [__m512; 16] = std::array::from_fn(|i| acc[i / DW_TILE][i % DW_TILE]);
    // Pairs: each 128-bit lane holds two partial sums of each of r[2i], r[2i + 1].
    let p: [__m512; 8] = std::array::from_fn(|i| {
        let (a, b) = (r[2 * i], r[2 * i + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
    });
    // Quads: each 128-bit lane holds one partial sum of each of r[4i .. 4i + 4].
    let q: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (p[2 * i], p[2 * i + 1]);
        _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b))
    });
    // Across the 128-bit lanes, twice: lane j of the result holds r[4j .. 4j + 4]'s totals.
    let h: [__m512; 2] = std::array::from_fn(|i| {
        let (a, b) = (q[2 * i], q[2 * i + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
    });
    let t = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(h[0], h[1]),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(h[0], h[1]),
    );
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), t));
}

/// The AVX2 + FMA kernels: 8-lane twins of the AVX-512 ones above, operation for operation
/// (the same adds in the same order, the same FMA chain over input channels), so an AVX2
/// machine computes the bits an AVX-512 one does. Partial vectors are stored through a stack
/// copy, not `vmaskmovps`, which is microcoded and slow on AMD's Zen.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{scratch_row, OCB, XI};
    use std::arch::x86_64::*;

    /// Output channels per register tile: half an OCB block of U.
    const OCH: usize = 4;
    /// Vectors of 8 tiles per register tile: 4 x 3 accumulators, 3 loads and a broadcast fill
    /// the 16 registers.
    const RV: usize = 3;

    /// Stores the first `n` lanes of `v` at `p`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store_first(p: *mut f32, n: usize, v: __m256) {
        if n >= 8 {
            _mm256_storeu_ps(p, v);
        } else {
            let mut t = [0.0f32; 8];
            _mm256_storeu_ps(t.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(t.as_ptr(), p, n);
        }
    }

    /// (even lanes, odd lanes) of the 16 floats a, b.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn deinterleave(a: __m256, b: __m256) -> (__m256, __m256) {
        // Within each 128-bit half: a0 a2 b0 b2 | a4 a6 b4 b6; then the 64-bit pairs reordered.
        let even = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
        let odd = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
        let fix = |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)));
        (fix(even), fix(odd))
    }

    /// `super::input_transform` on 8 tiles per vector.
    ///
    /// # Safety
    /// AVX2 + FMA present; `e` holds 5 `scratch_row(w)` floats, zero outside columns 1..=w of
    /// its first four rows and zero in the fifth; `v` holds XI x pitch >= ci x stride floats with
    /// t0 + (h / 2) (w / 2) <= stride.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn input_transform(
        x: &[f32],
        ci: usize,
        h: usize,
        w: usize,
        v: &mut [f32],
        t0: usize,
        stride: usize,
        pitch: usize,
        e: &mut [f32],
    ) {
        let (th, tw) = (h / 2, w / 2);
        let er = scratch_row(w);
        assert!(
            x.len() >= ci * h * w
                && e.len() >= 5 * er
                && pitch >= ci * stride
                && v.len() >= XI * pitch
                && t0 + th * tw <= stride
        );
        let vp = v.as_mut_ptr();
        for c in 0..ci {
            let plane = &x[c * h * w..][..h * w];
            for ty in 0..th {
                // Patch rows 2 ty - 1 .. 2 ty + 2 (the zero row outside the image) combined by
                // B^T's rows over whole image rows: plain loops that the compiler vectorizes.
                let (rows, zero) = e.split_at_mut(4 * er);
                let zero = &zero[..w];
                let d = |k: usize| {
                    let r = (2 * ty + k) as isize - 1;
                    if r < 0 || r as usize >= h {
                        zero
                    } else {
                        &plane[r as usize * w..][..w]
                    }
                };
                let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
                let (e0, rest) = rows.split_at_mut(er);
                let (e1, rest) = rest.split_at_mut(er);
                let (e2, e3) = rest.split_at_mut(er);
                let (e0, e1, e2, e3) = (&mut e0[1..=w], &mut e1[1..=w], &mut e2[1..=w], &mut e3[1..=w]);
                for col in 0..w {
                    let (a, b, c2, d) = (d0[col], d1[col], d2[col], d3[col]);
                    e0[col] = a - c2;
                    e1[col] = b + c2;
                    e2[col] = c2 - b;
                    e3[col] = b - d;
                }
                // Tile tx's patch columns 2 tx - 1 .. 2 tx + 2 are padded columns 2 tx .. 2 tx + 3.
                let ep = e.as_ptr();
                for tx0 in (0..tw).step_by(8) {
                    let n = (tw - tx0).min(8);
                    let at = t0 + ty * tw + tx0;
                    for k in 0..4 {
                        let p = ep.add(k * er + 2 * tx0);
                        let (p0, p1) = deinterleave(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
                        let (p2, p3) = deinterleave(_mm256_loadu_ps(p.add(2)), _mm256_loadu_ps(p.add(10)));
                        let out = [
                            _mm256_sub_ps(p0, p2),
                            _mm256_add_ps(p1, p2),
                            _mm256_sub_ps(p2, p1),
                            _mm256_sub_ps(p1, p3),
                        ];
                        for (j, o) in out.iter().enumerate() {
                            store_first(vp.add((k * 4 + j) * pitch + c * stride + at), n, *o);
                        }
                    }
                }
            }
        }
    }

    /// `super::grad_transform` on 8 tiles per vector (even sides): each tile's two gradient
    /// rows split into even and odd columns, then `super::a_dy_a_t`'s operations.
    ///
    /// # Safety
    /// AVX2 + FMA present; `m` holds XI x pitch >= co x stride floats with t0 + (h / 2) (w / 2)
    /// <= stride; `dy` holds co x h x w floats.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn grad_transform(
        dy: &[f32],
        co: usize,
        h: usize,
        w: usize,
        m: &mut [f32],
        t0: usize,
        stride: usize,
        pitch: usize,
    ) {
        let (th, tw) = (h / 2, w / 2);
        assert!(pitch >= co * stride && m.len() >= XI * pitch && t0 + th * tw <= stride && dy.len() >= co * h * w);
        let mp = m.as_mut_ptr();
        let z = _mm256_setzero_ps();
        for o in 0..co {
            for ty in 0..th {
                for tx0 in (0..tw).step_by(8) {
                    let n = (tw - tx0).min(8);
                    let at = t0 + ty * tw + tx0;
                    // A row's 2 n values from column 2 tx0: whole vectors, or through a zeroed
                    // copy at the row's end.
                    let cols = |dr: usize| {
                        let src = &dy[(o * h + 2 * ty + dr) * w + 2 * tx0..][..2 * n];
                        let mut t = [0.0f32; 16];
                        t[..2 * n].copy_from_slice(src);
                        deinterleave(_mm256_loadu_ps(t.as_ptr()), _mm256_loadu_ps(t.as_ptr().add(8)))
                    };
                    let (r0, r1) = (cols(0), cols(1));
                    // A over the rows, then over the columns: `super::a_dy_a_t`'s operations.
                    let rows = [
                        r0,
                        (_mm256_add_ps(r0.0, r1.0), _mm256_add_ps(r0.1, r1.1)),
                        (_mm256_sub_ps(r0.0, r1.0), _mm256_sub_ps(r0.1, r1.1)),
                        (_mm256_sub_ps(z, r1.0), _mm256_sub_ps(z, r1.1)),
                    ];
                    for (k, (c0, c1)) in rows.into_iter().enumerate() {
                        let out = [c0, _mm256_add_ps(c0, c1), _mm256_sub_ps(c0, c1), _mm256_sub_ps(z, c1)];
                        for (j, v) in out.into_iter().enumerate() {
                            store_first(mp.add((k * 4 + j) * pitch + o * stride + at), n, v);
                        }
                    }
                }
            }
        }
    }

    /// The 512-bit value x = [X0 X1 X2 X3] (128-bit lanes; as its 256-bit halves) to [X0 + X1,
    /// X2 + X3]: one half of `_mm512_shuffle_f32x4` 0b10_00_10_00 plus 0b11_01_11_01 of x and
    /// another value.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn lane_pairs(x: [__m256; 2]) -> __m256 {
        _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(x[0], x[1]), _mm256_permute2f128_ps::<0x31>(x[0], x[1]))
    }

    /// `super::dw_products` with 8-lane vectors: each AVX-512 accumulator is two halves (tiles
    /// 0 - 7 and 8 - 15 of every vector of 16) with the same FMA chains, run a half and two
    /// rows of Y' at a time (8 accumulators; the 32 halves would not fit 16 registers), then the
    /// same transpose-and-add tree, its 256-bit lane moves standing in for the 512-bit ones:
    /// the same bits.
    ///
    /// # Safety
    /// AVX2 + FMA present; as `super::dw_products`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dw_products(y: *const f32, v: *const f32, stride: usize, nvec: usize, out: *mut f32) {
        const T: usize = super::DW_TILE;
        // acc[half][a][b]: lanes 8 half .. 8 half + 8 of the AVX-512 accumulator (a, b).
        let mut acc = [[[_mm256_setzero_ps(); T]; T]; 2];
        for (half, acc_h) in acc.iter_mut().enumerate() {
            for a0 in (0..T).step_by(2) {
                let mut t = [[_mm256_setzero_ps(); T]; 2];
                for q in 0..nvec {
                    let off = 16 * q + 8 * half;
                    let yv =
                        [_mm256_loadu_ps(y.add(a0 * stride + off)), _mm256_loadu_ps(y.add((a0 + 1) * stride + off))];
                    for b in 0..T {
                        let vv = _mm256_loadu_ps(v.add(b * stride + off));
                        for (ta, ya) in t.iter_mut().zip(&yv) {
                            ta[b] = _mm256_fmadd_ps(*ya, vv, ta[b]);
                        }
                    }
                }
                acc_h[a0..a0 + 2].copy_from_slice(&t);
            }
        }
        // (lo, hi) halves of the AVX-512 tree's values.
        let r: [[__m256; 2]; 16] = std::array::from_fn(|i| [acc[0][i / T][i % T], acc[1][i / T][i % T]]);
        let mut p = [[_mm256_setzero_ps(); 2]; 8];
        for (i, pi) in p.iter_mut().enumerate() {
            for (h, ph) in pi.iter_mut().enumerate() {
                let (a, b) = (r[2 * i][h], r[2 * i + 1][h]);
                *ph = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
            }
        }
        let mut q = [[_mm256_setzero_ps(); 2]; 4];
        for (i, qi) in q.iter_mut().enumerate() {
            for (h, qh) in qi.iter_mut().enumerate() {
                let (a, b) = (p[2 * i][h], p[2 * i + 1][h]);
                *qh = _mm256_add_ps(_mm256_shuffle_ps::<0x44>(a, b), _mm256_shuffle_ps::<0xEE>(a, b));
            }
        }
        let h = [[lane_pairs(q[0]), lane_pairs(q[1])], [lane_pairs(q[2]), lane_pairs(q[3])]];
        let t = [lane_pairs(h[0]), lane_pairs(h[1])];
        for (half, th) in t.into_iter().enumerate() {
            let o = out.add(8 * half);
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), th));
        }
    }

    /// `super::output_transform` on 8 tiles per vector.
    ///
    /// # Safety
    /// AVX2 + FMA present; `mb` holds XI x pitch floats, pitch >= co x stride + 8, with
    /// t0 + (h / 2) (w / 2) <= stride; `y` holds co x h x w floats.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn output_transform(
        mb: &[f32],
        co: usize,
        h: usize,
        w: usize,
        t0: usize,
        stride: usize,
        pitch: usize,
        y: &mut [f32],
    ) {
        let (th, tw) = (h / 2, w / 2);
        // Whole-vector loads reach up to 7 floats past the last tile of a row of M.
        assert!(pitch >= co * stride + 8 && mb.len() >= XI * pitch && t0 + th * tw <= stride && y.len() >= co * h * w);
        let yp = y.as_mut_ptr();
        for o in 0..co {
            for ty in 0..th {
                for tx0 in (0..tw).step_by(8) {
                    let n = (tw - tx0).min(8);
                    let at = t0 + ty * tw + tx0;
                    let mut m = [_mm256_setzero_ps(); XI];
                    for (xi, mv) in m.iter_mut().enumerate() {
                        *mv = _mm256_loadu_ps(mb.as_ptr().add(xi * pitch + o * stride + at));
                    }
                    let v = |k: usize, j: usize| m[k * 4 + j];
                    // A^T over k, then over j.
                    let mut s0 = [_mm256_setzero_ps(); 4];
                    let mut s1 = [_mm256_setzero_ps(); 4];
                    for j in 0..4 {
                        s0[j] = _mm256_add_ps(_mm256_add_ps(v(0, j), v(1, j)), v(2, j));
                        s1[j] = _mm256_sub_ps(_mm256_sub_ps(v(1, j), v(2, j)), v(3, j));
                    }
                    let rows = [
                        (
                            _mm256_add_ps(_mm256_add_ps(s0[0], s0[1]), s0[2]),
                            _mm256_sub_ps(_mm256_sub_ps(s0[1], s0[2]), s0[3]),
                        ),
                        (
                            _mm256_add_ps(_mm256_add_ps(s1[0], s1[1]), s1[2]),
                            _mm256_sub_ps(_mm256_sub_ps(s1[1], s1[2]), s1[3]),
                        ),
                    ];
                    for (dr, (even, odd)) in rows.into_iter().enumerate() {
                        let dst = yp.add((o * h + 2 * ty + dr) * w + 2 * tx0);
                        // e0 o0 e1 o1 | e4 o4 e5 o5 and e2 o2 e3 o3 | e6 o6 e7 o7, halves regrouped.
                        let (lo, hi) = (_mm256_unpacklo_ps(even, odd), _mm256_unpackhi_ps(even, odd));
                        store_first(dst, (2 * n).min(8), _mm256_permute2f128_ps::<0x20>(lo, hi));
                        if n > 4 {
                            store_first(dst.add(8), 2 * n - 8, _mm256_permute2f128_ps::<0x31>(lo, hi));
                        }
                    }
                }
            }
        }
    }

    /// M rows o < valid (`stride` apart) at every vector of 8 tiles covering `ntiles` = sum
    /// over c < ci of U[c][o] x V row c, in register tiles of OCH channels x RV vectors.
    ///
    /// # Safety
    /// AVX2 + FMA present; `v + c * stride .. + ntiles` rounded up to 8 readable for c < ci; `u`
    /// holds ci * OCB floats; `m + o * stride ..` likewise writable for o < valid <= OCB.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn products(
        v: *const f32,
        stride: usize,
        u: *const f32,
        ci: usize,
        m: *mut f32,
        valid: usize,
        ntiles: usize,
    ) {
        let nvec = ntiles.div_ceil(8);
        let whole = nvec / RV * RV;
        for o0 in (0..valid).step_by(OCH) {
            let rows = (valid - o0).min(OCH);
            let (uo, mo) = (u.add(o0), m.add(o0 * stride));
            for q in (0..whole).step_by(RV) {
                product::<RV>(v.add(8 * q), stride, uo, ci, mo.add(8 * q), rows);
            }
            for q in whole..nvec {
                product::<1>(v.add(8 * q), stride, uo, ci, mo.add(8 * q), rows);
            }
        }
    }

    /// One register tile: OCH channels (U columns `u + o`, OCB apart per c) x R vectors.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn product<const R: usize>(
        v: *const f32,
        stride: usize,
        u: *const f32,
        ci: usize,
        m: *mut f32,
        valid: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); R]; OCH];
        for c in 0..ci {
            let row = v.add(c * stride);
            let mut xv = [_mm256_setzero_ps(); R];
            for (r, x) in xv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(row.add(8 * r));
            }
            for (o, acc_o) in acc.iter_mut().enumerate() {
                let g = _mm256_broadcast_ss(&*u.add(c * OCB + o));
                for r in 0..R {
                    acc_o[r] = _mm256_fmadd_ps(g, xv[r], acc_o[r]);
                }
            }
        }
        for (o, acc_o) in acc.iter().enumerate().take(valid) {
            for (r, a) in acc_o.iter().enumerate() {
                _mm256_storeu_ps(m.add(o * stride + 8 * r), *a);
            }
        }
    }
}

/// The scalar twin of `forward`: every tile's transforms, its FMA chains over input channels
/// and its output transform in the SIMD kernels' order, one value at a time. Both SIMD paths
/// must give its bits (tests); it runs on any CPU, slowly, as the reference.
pub fn forward_reference(s: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f32> {
    forward_reference_in(s, x, w, Precision::F32)
}

/// `forward_reference` with the products' operands in `precision`: with bf16, U and V rounded
/// to bf16 before each (exact) product, summed in f32 one channel at a time (the SIMD kernel adds
/// channel pairs: the same terms, the sum's rounding apart).
pub fn forward_reference_in(s: &ConvShape, x: &[f32], w: &[f32], precision: Precision) -> Vec<f32> {
    let operand = |v: f32| match precision {
        Precision::F32 => v,
        Precision::Bf16 => f32::from_bits(u32::from(bf16::round(v)) << 16),
    };
    assert!(shape_written_for(s) && x.len() >= s.n * s.ci * s.h * s.w, "winograd::forward_reference: {s:?}");
    let blocks = s.co.div_ceil(OCB);
    let u = transform_weights(s, w);
    let (h, wd) = (s.h as isize, s.w as isize);
    let mut y = vec![0.0f32; s.n * s.co * s.h * s.w];
    let mut v = vec![0.0f32; XI * s.ci];
    for n in 0..s.n {
        let (th, tw) = tile_grid(s.h, s.w);
        for ty in 0..th {
            for tx in 0..tw {
                for c in 0..s.ci {
                    let plane = &x[(n * s.ci + c) * s.h * s.w..][..s.h * s.w];
                    let px = |r: isize, q: isize| {
                        if r < 0 || q < 0 || r >= h || q >= wd {
                            0.0
                        } else {
                            plane[(r * wd + q) as usize]
                        }
                    };
                    // B^T over the patch's rows, then over its columns.
                    // cols[j][k]: patch column j after B^T over the rows.
                    let cols: [[f32; 4]; 4] = std::array::from_fn(|j| {
                        let q = (2 * tx + j) as isize - 1;
                        let d = |k: usize| px((2 * ty + k) as isize - 1, q);
                        [d(0) - d(2), d(1) + d(2), d(2) - d(1), d(1) - d(3)]
                    });
                    for k in 0..4 {
                        let p = cols.map(|col| col[k]);
                        let out = [p[0] - p[2], p[1] + p[2], p[2] - p[1], p[1] - p[3]];
                        for (j, o) in out.iter().enumerate() {
                            v[(k * 4 + j) * s.ci + c] = *o;
                        }
                    }
                }
                for o in 0..s.co {
                    let mut m = [0.0f32; XI];
                    for (xi, mv) in m.iter_mut().enumerate() {
                        let ub = &u[(xi * blocks + o / OCB) * s.ci * OCB..];
                        *mv = (0..s.ci).fold(0.0f32, |acc, c| {
                            operand(ub[c * OCB + o % OCB]).mul_add(operand(v[xi * s.ci + c]), acc)
                        });
                    }
                    let mut s0 = [0.0f32; 4];
                    let mut s1 = [0.0f32; 4];
                    for j in 0..4 {
                        s0[j] = (m[j] + m[4 + j]) + m[8 + j];
                        s1[j] = (m[4 + j] - m[8 + j]) - m[12 + j];
                    }
                    for (dr, sr) in [s0, s1].iter().enumerate().take(s.h - 2 * ty) {
                        let at = ((n * s.co + o) * s.h + 2 * ty + dr) * s.w + 2 * tx;
                        y[at] = (sr[0] + sr[1]) + sr[2];
                        if 2 * tx + 1 < s.w {
                            y[at + 1] = (sr[1] - sr[2]) - sr[3];
                        }
                    }
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::im2col::assert_forward_matches_naive;

    fn conv(n: usize, ci: usize, h: usize, w: usize, co: usize) -> ConvShape {
        ConvShape { n, ci, h, w, co, kh: 3, kw: 3, stride: 1, pad: 1 }
    }

    /// Planes of 2 x 2 up to 32 x 32, wide and tall, tile rows that leave partial 8- and
    /// 16-tile vectors (the convnet's 28 and 14 wide), partial register tiles, output channels
    /// short of a block and of half a block, groups of one and of several images (with a
    /// partial last group).
    fn shapes() -> Vec<ConvShape> {
        vec![
            conv(2, 16, 4, 4, 17),
            conv(3, 16, 2, 2, 20),
            conv(5, 16, 8, 8, 16),
            conv(2, 32, 32, 32, 16),
            conv(3, 17, 6, 10, 23),
            conv(4, 64, 16, 16, 24),
            conv(7, 128, 8, 8, 16),
            conv(2, 20, 2, 12, 19),
            conv(4, 16, 32, 32, 32),
            conv(4, 32, 32, 32, 32),
            conv(4, 128, 8, 8, 128),
            conv(4, 64, 16, 16, 64),
            conv(3, 32, 28, 28, 32),
            conv(5, 64, 14, 14, 32),
            conv(2, 16, 4, 30, 18),
        ]
    }

    /// Odd sides (AVX-512 only): the convnet's 7 x 7, packed and one-row vectors, odd in one
    /// direction only, a last tile row half outside, a second vector of columns.
    fn odd_shapes() -> Vec<ConvShape> {
        vec![
            conv(3, 16, 7, 7, 32),
            conv(4, 64, 7, 7, 128),
            conv(2, 32, 5, 9, 16),
            conv(2, 16, 3, 3, 16),
            conv(2, 16, 15, 13, 17),
            conv(2, 16, 8, 7, 16),
            conv(2, 16, 7, 8, 20),
            conv(2, 16, 5, 33, 16),
            conv(40, 16, 7, 7, 16),
        ]
    }

    /// `shapes`, and `odd_shapes` where this CPU takes them.
    fn shapes_here() -> Vec<ConvShape> {
        let mut all = shapes();
        if super::super::simd::level() == super::super::simd::Level::Avx512 {
            all.extend(odd_shapes());
        }
        all
    }

    /// The AVX2 weight gradient (8-lane transforms, the products' FMA chains in halves, the same
    /// reduction tree) gives the AVX-512 one's bits, on every even shape: run both here when the
    /// CPU has both.
    #[test]
    fn avx2_weight_grad_gives_the_avx512_bits() {
        if !weight_grad_applies(&shapes()[0]) || super::super::simd::level() != super::super::simd::Level::Avx512 {
            eprintln!("skipped: needs AVX-512 (and MUSCLE_CONV unset) to run both");
            return;
        }
        for (k, s) in shapes().iter().enumerate() {
            let x = crate::rng::normal_vec(s.x_len(), 1.0, 400 + k as u64);
            let dy = crate::rng::normal_vec(s.y_len(), 1.0, 420 + k as u64);
            let (mut a, mut b) = (vec![f32::NAN; s.w_len()], vec![f32::NAN; s.w_len()]);
            weight_grad_on(s, &x, None, &dy, &mut a, true, Precision::F32);
            weight_grad_on(s, &x, None, &dy, &mut b, false, Precision::F32);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a), bits(&b), "{s:?}");
        }
    }

    /// dW read through an affine (with and without its LeakyReLU) is, bit for bit, dW of the
    /// tensor `InputAffine` describes, written out first with that arithmetic (a product, then a
    /// sum, then the slope where z <= 0). That this is batch norm's own output is the conv tape
    /// test's (`ops::conv`), which compares the gradients against a kept batch-norm output.
    #[test]
    fn weight_grad_through_an_affine_is_that_of_the_affine_input() {
        if !weight_grad_reads_affine(&shapes()[0]) {
            eprintln!("skipped: no AVX-512 (or MUSCLE_CONV set to something other than winograd)");
            return;
        }
        for (k, s) in shapes_here().iter().enumerate() {
            let x = crate::rng::normal_vec(s.x_len(), 1.0, 200 + k as u64);
            let dy = crate::rng::normal_vec(s.y_len(), 1.0, 220 + k as u64);
            let scale = crate::rng::normal_vec(s.ci, 1.0, 240 + k as u64);
            let shift = crate::rng::normal_vec(s.ci, 0.5, 260 + k as u64);
            for slope in [Some(0.1f32), None] {
                let hw = s.h * s.w;
                let affine_input: Vec<f32> = x
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        let c = (i / hw) % s.ci;
                        let z = v * scale[c] + shift[c];
                        match slope {
                            Some(a) if z <= 0.0 => a * z,
                            _ => z,
                        }
                    })
                    .collect();
                let (mut want, mut got) = (vec![f32::NAN; s.w_len()], vec![f32::NAN; s.w_len()]);
                weight_grad(s, &affine_input, None, &dy, &mut want, Precision::F32);
                let affine = InputAffine { scale: &scale, shift: &shift, slope };
                weight_grad(s, &x, Some(affine), &dy, &mut got, Precision::F32);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{s:?} slope {slope:?}");
            }
        }
    }

    #[test]
    fn forward_matches_direct_loops() {
        if mode() == Mode::Off {
            eprintln!("skipped: no AVX-512 or AVX2 (or MUSCLE_CONV=gemm / direct)");
            return;
        }
        assert!(shapes_here().iter().all(fits));
        assert!(!fits(&conv(1, 8, 8, 8, 16)) && !fits(&conv(1, 16, 8, 8, 8)) && !fits(&conv(1, 16, 1, 8, 16)));
        let avx512 = super::super::simd::level() == super::super::simd::Level::Avx512;
        assert_eq!(fits(&conv(1, 16, 7, 8, 16)), avx512, "odd sides on AVX-512 only");
        for (k, s) in shapes_here().iter().enumerate() {
            assert_forward_matches_naive(s, k as u64, |s, x, w, y| forward(s, x, w, y, Precision::F32));
        }
    }

    /// The scalar twin is a Winograd convolution (on every CPU).
    #[test]
    fn reference_matches_direct_loops() {
        for (k, s) in shapes().iter().chain(&odd_shapes()).enumerate().step_by(2) {
            assert_forward_matches_naive(s, 40 + k as u64, |s, x, w, y| y.copy_from_slice(&forward_reference(s, x, w)));
        }
    }

    /// The weight gradient against im2col + GEMM's, and the same bits whatever the threads (a
    /// sum split by thread count, or a transform point or tile lost, would fail one of them).
    #[test]
    fn weight_grad_matches_the_gemm_path_on_any_threads() {
        if !weight_grad_applies(&shapes()[0]) {
            eprintln!("skipped: no AVX-512 (or MUSCLE_CONV set to something other than winograd)");
            return;
        }
        let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("pool");
        let (one, three) = (pool(1), pool(3));
        let mut shapes = shapes_here();
        // More groups than ranges, and a last range with fewer groups.
        shapes.push(conv(37, 32, 28, 28, 32));
        for (k, s) in shapes.iter().enumerate() {
            let x = crate::rng::normal_vec(s.x_len(), 1.0, 100 + k as u64);
            let w = crate::rng::normal_vec(s.w_len(), 1.0, 120 + k as u64);
            let dy = crate::rng::normal_vec(s.y_len(), 1.0, 140 + k as u64);
            let (mut dw, mut dw3) = (vec![f32::NAN; s.w_len()], vec![f32::NAN; s.w_len()]);
            one.install(|| weight_grad(s, &x, None, &dy, &mut dw, Precision::F32));
            three.install(|| weight_grad(s, &x, None, &dy, &mut dw3, Precision::F32));
            let mut want = vec![0.0; s.w_len()];
            crate::cpu::im2col::gemm_backward(s, &x, &w, &dy, &mut want, None);
            let scale = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
            for (i, ((a, b), c)) in dw.iter().zip(&want).zip(&dw3).enumerate() {
                assert!((a - b).abs() <= 2e-5 * scale, "{s:?} dw[{i}]: {a} vs {b} (rms {scale})");
                assert_eq!(a.to_bits(), c.to_bits(), "{s:?} dw[{i}]: 1 thread {a}, 3 threads {c}");
            }
        }
    }

    /// bf16 products (forward, and so input gradients): within the f32 sums' rounding of the twin
    /// that rounds U and V to bf16, and so clearly apart from the f32 path (which a missing or
    /// misplaced rounding, or pairs of the wrong channels, would not be); the same bits on 1 and
    /// 3 threads.
    #[test]
    fn bf16_forward_is_the_twin_of_rounded_operands_on_any_threads() {
        if !bf16::available() || mode() == Mode::Off {
            eprintln!("skipped: this CPU has no AVX512-BF16 (or MUSCLE_CONV / MUSCLE_SIMD turned Winograd off)");
            return;
        }
        let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("pool");
        let (one, three) = (pool(1), pool(3));
        let mut shapes = shapes_here();
        // An odd channel count: a last pair with a zero.
        shapes.push(conv(3, 17, 8, 8, 16));
        for (k, s) in shapes.iter().enumerate() {
            let x = crate::rng::normal_vec(s.x_len(), 1.0, 500 + k as u64);
            let w = crate::rng::normal_vec(s.w_len(), 1.0, 520 + k as u64);
            let (mut y, mut y3) = (vec![f32::NAN; s.y_len()], vec![f32::NAN; s.y_len()]);
            one.install(|| forward(s, &x, &w, &mut y, Precision::Bf16));
            three.install(|| forward(s, &x, &w, &mut y3, Precision::Bf16));
            let twin = forward_reference_in(s, &x, &w, Precision::Bf16);
            let f32_twin = forward_reference(s, &x, &w);
            let rms = (twin.iter().map(|v| v * v).sum::<f32>() / twin.len() as f32).sqrt();
            let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
            let (err, rounding) = (max_diff(&y, &twin), max_diff(&twin, &f32_twin));
            assert!(err <= 2e-5 * rms, "{s:?}: {err} from the bf16 twin (rms {rms})");
            assert!(rounding >= 1e-3 * rms, "{s:?}: bf16 only {rounding} from f32 (rms {rms})");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&y), bits(&y3), "{s:?}: 1 and 3 threads");
        }
    }

    /// bf16 weight gradients: near the GEMM path's (each transformed operand rounded to 8
    /// significant bits), further than the f32 path's, the same bits on 1 and 3 threads.
    #[test]
    fn bf16_weight_grad_is_near_the_f32_one_on_any_threads() {
        if !bf16::available() || !weight_grad_applies(&shapes()[0]) {
            eprintln!("skipped: this CPU has no AVX512-BF16 (or MUSCLE_CONV / MUSCLE_SIMD turned Winograd off)");
            return;
        }
        let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("pool");
        let (one, three) = (pool(1), pool(3));
        let mut shapes = shapes_here();
        // Several groups, and an odd number of 16-tile vectors in a group (7 x 7: 16 tiles).
        shapes.push(conv(37, 32, 28, 28, 32));
        shapes.push(conv(3, 16, 7, 7, 16));
        for (k, s) in shapes.iter().enumerate() {
            let x = crate::rng::normal_vec(s.x_len(), 1.0, 540 + k as u64);
            let w = crate::rng::normal_vec(s.w_len(), 1.0, 560 + k as u64);
            let dy = crate::rng::normal_vec(s.y_len(), 1.0, 580 + k as u64);
            let (mut dw, mut dw3) = (vec![f32::NAN; s.w_len()], vec![f32::NAN; s.w_len()]);
            one.install(|| weight_grad(s, &x, None, &dy, &mut dw, Precision::Bf16));
            three.install(|| weight_grad(s, &x, None, &dy, &mut dw3, Precision::Bf16));
            let mut want = vec![0.0; s.w_len()];
            crate::cpu::im2col::gemm_backward(s, &x, &w, &dy, &mut want, None);
            let rms = (want.iter().map(|v| v * v).sum::<f32>() / want.len() as f32).sqrt();
            let diffs: Vec<f32> = dw.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
            let max = diffs.iter().fold(0.0f32, |m, d| m.max(*d));
            let rms_err = (diffs.iter().map(|d| d * d).sum::<f32>() / diffs.len() as f32).sqrt();
            // On these shapes: rms 0.34 - 0.50%, max 1.4 - 2.6% of the gradient's rms.
            assert!(
                max <= 5e-2 * rms && rms_err <= 1e-2 * rms,
                "{s:?}: bf16 dW max {max}, rms {rms_err} off (rms {rms})"
            );
            assert!(rms_err >= 1e-4 * rms, "{s:?}: bf16 dW only {rms_err} from f32's (rms {rms})");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&dw), bits(&dw3), "{s:?}: 1 and 3 threads");
        }
    }

    /// This CPU's SIMD path gives the twin's bits; an add in another order, a mul + add in
    /// place of an FMA or a stale lane stored would not.
    #[test]
    fn simd_gives_the_scalar_twins_bits() {
        if mode() == Mode::Off {
            eprintln!("skipped: no AVX-512 or AVX2 (or MUSCLE_CONV=gemm / direct)");
            return;
        }
        for (k, s) in shapes_here().iter().enumerate() {
            let x = crate::rng::normal_vec(s.x_len(), 1.0, 60 + k as u64);
            let w = crate::rng::normal_vec(s.w_len(), 1.0, 80 + k as u64);
            let mut y = vec![f32::NAN; s.y_len()];
            forward(s, &x, &w, &mut y, Precision::F32);
            let want = forward_reference(s, &x, &w);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{s:?} output {i}: {a} vs {b}");
            }
        }
    }
}
