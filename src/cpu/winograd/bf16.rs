//! Winograd's transform-domain products in bf16 (`--precision bf16`, AVX512-BF16): the
//! transformed operands rounded to bf16 (round to nearest even), multiplied in pairs by
//! `vdpbf16ps` (32 products per instruction, twice `vfmadd231ps`'s 16) into f32 accumulators.
//! The transforms, the accumulation, the output transform and dW's f64 epilogue stay f32/f64:
//! only the products' operands lose precision (8 significant bits, a relative 2^-9 each).
//!
//! Layouts. `vdpbf16ps` adds, per 32-bit lane j, a[2j] b[2j] + a[2j + 1] b[2j + 1]: the pair it
//! sums must be two terms of one sum.
//! - Forward (and input gradient): the sum runs over input channels, so V's rows c and c + 1
//!   are interleaved tile by tile (`interleave_rows`: element 2t of pair row p is V[2p][t], 2t + 1
//!   is V[2p + 1][t]) and U is packed as (U[2p][o], U[2p + 1][o]) pairs, one 32-bit broadcast.
//! - Weight gradient: the sum runs over tiles, so both operands keep their tile order and pair
//!   neighbouring tiles (`convert_rows`: 32 tiles per vector).
//!
//! The sums' order is fixed by the shape, as in f32: results depend neither on the thread count
//! nor on the run. They are not the f32 path's bits, and bitwise agreement across CPU models is
//! not claimed: how `vdpbf16ps` rounds within a pair is the hardware's (the tests hold the sums
//! to f64 sums of the same rounded operands, to the f32 sums' rounding).

use std::arch::x86_64::*;

/// Whether this CPU runs the bf16 products (AVX-512 F/VL/BW/DQ and BF16; not under
/// `MUSCLE_SIMD`'s lower levels).
pub fn available() -> bool {
    static BF16: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *BF16.get_or_init(|| {
        super::super::simd::level() == super::super::simd::Level::Avx512 && std::is_x86_feature_detected!("avx512bf16")
    })
}

/// `x` rounded to bf16, to nearest even, NaNs kept (what `vcvtne2ps2bf16` does to normal values;
/// the instruction flushes subnormal inputs to zero, as `vdpbf16ps` does its operands).
pub fn round(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// U packed for [`product`]: from f32 [XI][blocks][ci][OCB] to bf16 pairs
/// [XI][blocks][ci / 2 rounded up][OCB], (U[2p][o], U[2p + 1][o]) in each u32 (low half first;
/// a zero for the missing channel of an odd count).
pub fn pack_weights(u: &[f32], ci: usize, ocb: usize) -> Vec<u32> {
    let pairs = ci.div_ceil(2);
    let blocks = u.len() / (ci * ocb);
    let mut out = vec![0u32; blocks * pairs * ocb];
    for (src, dst) in u.chunks_exact(ci * ocb).zip(out.chunks_exact_mut(pairs * ocb)) {
        for p in 0..pairs {
            for o in 0..ocb {
                let lo = round(src[2 * p * ocb + o]);
                let hi = if 2 * p + 1 < ci { round(src[(2 * p + 1) * ocb + o]) } else { 0 };
                dst[p * ocb + o] = u32::from(lo) | (u32::from(hi) << 16);
            }
        }
    }
    out
}

/// u16 elements per pair row of [`interleave_rows`]'s output for rows of `stride` floats.
pub fn pair_row(stride: usize) -> usize {
    2 * stride
}

/// V's `ci` rows (`stride` floats apart, `nvec` vectors of 16 tiles each) rounded to bf16 and
/// interleaved in channel pairs: pair row p (`pair_row(stride)` elements apart in `out`) holds
/// V[2p][t], V[2p + 1][t] at 2t, 2t + 1; a zero row stands in for row ci when ci is odd.
///
/// # Safety
/// AVX-512F/BW and BF16 present ([`available`]); `v + c stride .. + 16 nvec` readable for c < ci;
/// `out + p pair_row(stride) .. + 32 nvec` writable for p < ci / 2 rounded up; 16 nvec <= stride.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx512bf16")]
pub unsafe fn interleave_rows(v: *const f32, stride: usize, ci: usize, nvec: usize, out: *mut u16) {
    // Element 2t from lane t of the low half (row 2p), 2t + 1 from lane t of the high half.
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
        16, 0,
    );
    for p in 0..ci.div_ceil(2) {
        let (r0, r1) = (v.add(2 * p * stride), v.add((2 * p + 1) * stride));
        let dst = out.add(p * pair_row(stride));
        for q in 0..nvec {
            let lo = _mm512_loadu_ps(r0.add(16 * q));
            let hi = if 2 * p + 1 < ci { _mm512_loadu_ps(r1.add(16 * q)) } else { _mm512_setzero_ps() };
            let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.add(32 * q).cast(), _mm512_permutexvar_epi16(idx, packed));
        }
    }
}

/// M rows o < valid (`stride` floats apart) at R vectors of 16 tiles = sum over channel pairs
/// p < pairs of U pair [p][o] . V pair row p: `winograd::product` with two channels per
/// instruction.
///
/// # Safety
/// AVX-512F and BF16 present; `v + p row .. + 32 R` readable (u16) for p < pairs; `u` holds
/// pairs * ocb u32 with OCB == ocb; `m + o * stride .. + 16 R` writable for o < valid.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx512bf16")]
pub unsafe fn product<const R: usize, const OCB: usize>(
    v: *const u16,
    row: usize,
    u: *const u32,
    pairs: usize,
    m: *mut f32,
    stride: usize,
    valid: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); R]; OCB];
    for p in 0..pairs {
        let src = v.add(p * row);
        let xv: [__m512bh; R] =
            std::array::from_fn(|r| std::mem::transmute(_mm512_loadu_si512(src.add(32 * r).cast())));
        for (o, acc_o) in acc.iter_mut().enumerate() {
            let g: __m512bh = std::mem::transmute(_mm512_set1_epi32(*u.add(p * OCB + o) as i32));
            for r in 0..R {
                acc_o[r] = _mm512_dpbf16_ps(acc_o[r], g, xv[r]);
            }
        }
    }
    for (o, acc_o) in acc.iter().enumerate().take(valid) {
        for (r, a) in acc_o.iter().enumerate() {
            _mm512_storeu_ps(m.add(o * stride + 16 * r), *a);
        }
    }
}

/// `rows` rows of `nvec` vectors of 16 floats (`stride` floats apart) rounded to bf16 in their
/// own order, 32 per vector: row r of `out` (`out_stride` u16 apart) holds vectors 2k and 2k + 1
/// of row r in its vector k; an odd `nvec`'s last vector is paired with zeros.
///
/// # Safety
/// AVX-512F and BF16 present; `src + r stride .. + 16 nvec` readable and `out + r out_stride ..
/// + 32 (nvec / 2 rounded up)` writable (u16) for r < rows.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx512bf16")]
pub unsafe fn convert_rows(src: *const f32, stride: usize, rows: usize, nvec: usize, out: *mut u16, out_stride: usize) {
    for r in 0..rows {
        let (s, d) = (src.add(r * stride), out.add(r * out_stride));
        for k in 0..nvec.div_ceil(2) {
            let a = _mm512_loadu_ps(s.add(32 * k));
            let b = if 2 * k + 1 < nvec { _mm512_loadu_ps(s.add(32 * k + 16)) } else { _mm512_setzero_ps() };
            let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
            _mm512_storeu_si512(d.add(32 * k).cast(), packed);
        }
    }
}

/// The DW_TILE x DW_TILE sums (T x T) over `nbf` bf16 vectors (32 tiles each) of Y' rows `y`
/// times V rows `v` (rows `stride` u16 apart), as `winograd::dw_products`'s accumulators: each
/// lane a running sum over its pairs of tiles, added across lanes by the caller.
///
/// # Safety
/// AVX-512F and BF16 present; T rows of 32 nbf u16 readable at `y` and at `v`.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx512bf16")]
pub unsafe fn dw_sums<const T: usize>(y: *const u16, v: *const u16, stride: usize, nbf: usize) -> [[__m512; T]; T] {
    let load = |p: *const u16| -> __m512bh { std::mem::transmute(_mm512_loadu_si512(p.cast())) };
    let mut acc = [[_mm512_setzero_ps(); T]; T];
    for q in 0..nbf {
        let yv: [__m512bh; T] = std::array::from_fn(|a| load(y.add(a * stride + 32 * q)));
        for b in 0..T {
            let vv = load(v.add(b * stride + 32 * q));
            for (acc_a, ya) in acc.iter_mut().zip(&yv) {
                acc_a[b] = _mm512_dpbf16_ps(acc_a[b], *ya, vv);
            }
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widen(b: u16) -> f32 {
        f32::from_bits(u32::from(b) << 16)
    }

    /// The instruction's rounding is `round`'s (to nearest even, ties included) and the
    /// interleaving puts rows 2p and 2p + 1 at even and odd elements, with zeros for an odd
    /// count's missing row.
    #[test]
    fn interleaved_rows_are_rounded_pairs_in_tile_order() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let (ci, stride, nvec) = (5, 48, 3);
        let mut v = crate::rng::normal_vec(ci * stride, 1.0, 7);
        // Ties: 1 + 2^-8 rounds down to 1 (even), 1 + 3 * 2^-8 up to 1 + 2^-6.
        v[0] = 1.0 + 1.0 / 256.0;
        v[1] = 1.0 + 3.0 / 256.0;
        let mut out = vec![0xFFFFu16; ci.div_ceil(2) * pair_row(stride)];
        // SAFETY: checked above; the buffers hold the rows the contract names.
        unsafe { interleave_rows(v.as_ptr(), stride, ci, nvec, out.as_mut_ptr()) };
        assert_eq!(widen(out[0]), 1.0);
        assert_eq!(widen(out[2]), 1.0 + 1.0 / 64.0);
        for p in 0..ci.div_ceil(2) {
            for t in 0..16 * nvec {
                let got = &out[p * pair_row(stride) + 2 * t..][..2];
                let hi = if 2 * p + 1 < ci { round(v[(2 * p + 1) * stride + t]) } else { 0 };
                assert_eq!(got, [round(v[2 * p * stride + t]), hi], "pair {p} tile {t}");
            }
        }
    }

    /// The forward product against f64 sums of the same bf16-rounded operands: only the f32
    /// accumulation's rounding apart, over an odd channel count (a zero-padded last pair) and a
    /// partial block of output channels.
    #[test]
    fn product_is_the_sum_of_the_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        const OCB: usize = 8;
        let (ci, stride, valid) = (37, 48, 5);
        let v = crate::rng::normal_vec(ci * stride, 1.0, 8);
        let u = crate::rng::normal_vec(ci * OCB, 1.0, 9);
        let ub = pack_weights(&u, ci, OCB);
        let mut vb = vec![0u16; ci.div_ceil(2) * pair_row(stride)];
        let mut m = vec![f32::NAN; OCB * stride];
        // SAFETY: checked above; 3 vectors of 16 tiles lie within every row of every buffer.
        unsafe {
            interleave_rows(v.as_ptr(), stride, ci, 3, vb.as_mut_ptr());
            product::<3, OCB>(
                vb.as_ptr(),
                pair_row(stride),
                ub.as_ptr(),
                ci.div_ceil(2),
                m.as_mut_ptr(),
                stride,
                valid,
            );
        }
        let r = |x: f32| f64::from(widen(round(x)));
        for o in 0..OCB {
            for t in 0..48 {
                let got = m[o * stride + t];
                if o >= valid {
                    assert!(got.is_nan(), "row {o} past `valid` is written");
                    continue;
                }
                let want: f64 = (0..ci).map(|c| r(u[c * OCB + o]) * r(v[c * stride + t])).sum();
                let scale: f64 = (0..ci).map(|c| (r(u[c * OCB + o]) * r(v[c * stride + t])).abs()).sum();
                assert!((f64::from(got) - want).abs() <= 1e-6 * scale, "o {o} t {t}: {got} vs {want}");
            }
        }
    }

    /// The weight-gradient sums against f64 sums of the rounded operands, over an odd number of
    /// 16-tile vectors (the last one paired with zeros).
    #[test]
    fn dw_sums_are_the_sums_of_the_rounded_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // Rows of exactly 5 vectors: the bf16 rows need 6 vectors' room (a stride of their own).
        let (stride, nvec, out_stride) = (80, 5, 96);
        let y = crate::rng::normal_vec(4 * stride, 1.0, 10);
        let v = crate::rng::normal_vec(4 * stride, 1.0, 11);
        let (mut yb, mut vb) = (vec![0u16; 4 * out_stride], vec![0u16; 4 * out_stride]);
        // SAFETY: checked above; 5 vectors in each source row, 3 bf16 vectors of 32 in each
        // output row.
        let acc = unsafe {
            convert_rows(y.as_ptr(), stride, 4, nvec, yb.as_mut_ptr(), out_stride);
            convert_rows(v.as_ptr(), stride, 4, nvec, vb.as_mut_ptr(), out_stride);
            dw_sums::<4>(yb.as_ptr(), vb.as_ptr(), out_stride, nvec.div_ceil(2))
        };
        let r = |x: f32| f64::from(widen(round(x)));
        for a in 0..4 {
            for b in 0..4 {
                // SAFETY: a vector of 16 f32 lanes.
                let lanes: [f32; 16] = unsafe { std::mem::transmute(acc[a][b]) };
                let got: f64 = lanes.iter().map(|&l| f64::from(l)).sum();
                let terms = (0..16 * nvec).map(|t| r(y[a * stride + t]) * r(v[b * stride + t]));
                let (want, scale) = terms.fold((0.0, 0.0), |(s, m), p| (s + p, m + p.abs()));
                assert!((got - want).abs() <= 1e-6 * scale, "({a}, {b}): {got} vs {want}");
            }
        }
    }
}
