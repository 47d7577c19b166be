//! Run-time SIMD dispatch for our own loops, and a vectorisable `exp`.
//!
//! The crate is built for baseline x86-64 (SSE2) so that one binary runs everywhere; the GEMM
//! crate picks AVX-512/AVX2 at run time itself, but our elementwise loops would not. `multiversion!`
//! compiles a plain-Rust body three times (AVX-512, AVX2 + FMA, baseline) and calls the best one
//! the CPU supports, so LLVM's auto-vectoriser can use the wide registers without `unsafe`
//! intrinsics in kernel code.

use std::sync::OnceLock;

/// The widest instruction set the running CPU offers, among those we compile for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// AVX-512 F/VL/BW/DQ (x86-64-v4).
    Avx512,
    /// AVX2 + FMA (x86-64-v3).
    Avx2,
    /// Whatever the build targets (SSE2 on x86-64).
    Baseline,
}

/// Detected once per process.
pub fn level() -> Level {
    static L: OnceLock<Level> = OnceLock::new();
    *L.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    // MUSCLE_SIMD=baseline|avx2 lowers the level, to compare the paths on one machine.
    let cap = std::env::var("MUSCLE_SIMD").unwrap_or_default();
    let has_v4 = std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512dq");
    let has_v3 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    match cap.as_str() {
        "baseline" => Level::Baseline,
        "avx2" if has_v3 => Level::Avx2,
        _ if has_v4 => Level::Avx512,
        _ if has_v3 => Level::Avx2,
        _ => Level::Baseline,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Baseline
}

/// Asks the cache for the lines of the `len` floats at `p` ahead of use (for writing: the
/// line comes exclusive, so the store that follows does not ask again): for loops that jump
/// between short runs (one image's planes, then the next image's, an activation apart), where
/// the hardware prefetcher, which stops at page boundaries, starts cold at every run. A hint:
/// any address is allowed (nothing is read), no effect on results, none off x86-64.
#[inline]
pub fn prefetch<const WRITE: bool>(p: *const f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for i in (0..len).step_by(16) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0, _MM_HINT_T0};
        let q = p.wrapping_add(i).cast::<i8>();
        // SAFETY: SSE is part of x86-64 (PREFETCHW decodes as a hint or a no-op everywhere);
        // a prefetch reads nothing and cannot fault.
        unsafe {
            if WRITE {
                _mm_prefetch::<_MM_HINT_ET0>(q)
            } else {
                _mm_prefetch::<_MM_HINT_T0>(q)
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// Defines a function whose body is compiled for AVX-512, AVX2 + FMA and the baseline, and runs
/// the best of them for the CPU (see the module docs). Arguments must be plain `name: Type`.
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                match $crate::cpu::simd::level() {
                    // SAFETY: `level()` reported these features on the running CPU.
                    $crate::cpu::simd::Level::Avx512 => return unsafe { v4($($arg),*) },
                    $crate::cpu::simd::Level::Avx2 => return unsafe { v3($($arg),*) },
                    $crate::cpu::simd::Level::Baseline => {}
                }
            }
            body($($arg),*)
        }
    };
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n * LN2_HI is exact for |n| < 2^9 (Cephes).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// e^x to about 2 ulp, branch-free so that loops over it vectorise. Below -87.3 (where e^x
/// leaves the normal range) it returns 0, above 88.3 it saturates at e^88.3.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * LOG2E).round_ties_even();
    let r = xc - n * LN2_HI - n * LN2_LO;
    // Cephes expf minimax polynomial on |r| <= ln2 / 2.
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n through the exponent bits; n is in [-126, 127] after the clamp. The integer comes from
    // the bits of n + 1.5 * 2^23 (exact: n is a small whole number), not from `n as i32`, whose
    // saturating semantics LLVM lowers lane by lane (scalar converts and inserts: most of a wide
    // softmax's time); the result is the same bits.
    const MAGIC: f32 = 12_582_912.0;
    let n_int = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        e * scale
    }
}

/// Lanes of the row helpers below: one AVX-512 register of f32.
pub const LANES: usize = 16;

// Float reductions do not vectorise on their own (LLVM keeps their sequential order), so the
// helpers below keep LANES partial results and combine them with a fixed tree at the end: the
// result depends only on the data, not on the instruction set.

/// Sum of the lanes, as a fixed tree.
#[inline(always)]
pub fn hsum(a: [f32; LANES]) -> f32 {
    let mut h = [0.0f32; 8];
    for l in 0..8 {
        h[l] = a[l] + a[l + 8];
    }
    let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// Maximum of the lanes.
#[inline(always)]
pub fn hmax(a: [f32; LANES]) -> f32 {
    let mut h = [0.0f32; 8];
    for l in 0..8 {
        h[l] = a[l].max(a[l + 8]);
    }
    let q = [h[0].max(h[4]), h[1].max(h[5]), h[2].max(h[6]), h[3].max(h[7])];
    q[0].max(q[2]).max(q[1].max(q[3]))
}

/// The remainder of `x` after whole blocks of LANES, padded with `fill`.
#[inline(always)]
fn padded(rem: &[f32], fill: f32) -> [f32; LANES] {
    let mut t = [fill; LANES];
    t[..rem.len()].copy_from_slice(rem);
    t
}

/// Largest element (-inf for an empty row).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut it = x.chunks_exact(LANES);
    for ch in &mut it {
        for l in 0..LANES {
            acc[l] = acc[l].max(ch[l]);
        }
    }
    let t = padded(it.remainder(), f32::NEG_INFINITY);
    for l in 0..LANES {
        acc[l] = acc[l].max(t[l]);
    }
    hmax(acc)
}

/// Sum of the elements.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for ch in &mut it {
        for l in 0..LANES {
            acc[l] += ch[l];
        }
    }
    let t = padded(it.remainder(), 0.0);
    for l in 0..LANES {
        acc[l] += t[l];
    }
    hsum(acc)
}

/// Dot product of two equally long rows.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (mut ia, mut ib) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let (ta, tb) = (padded(ia.remainder(), 0.0), padded(ib.remainder(), 0.0));
    for l in 0..LANES {
        acc[l] += ta[l] * tb[l];
    }
    hsum(acc)
}

/// out = e^(x - shift) elementwise; returns the sum of out.
#[inline(always)]
pub fn exp_shifted(x: &[f32], shift: f32, out: &mut [f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (mut ix, mut io) = (x.chunks_exact(LANES), out.chunks_exact_mut(LANES));
    for (cx, co) in (&mut ix).zip(&mut io) {
        for l in 0..LANES {
            let e = exp(cx[l] - shift);
            co[l] = e;
            acc[l] += e;
        }
    }
    let t = padded(ix.remainder(), f32::NEG_INFINITY);
    let mut e = [0.0f32; LANES];
    for l in 0..LANES {
        e[l] = exp(t[l] - shift);
        acc[l] += e[l];
    }
    let rest = io.into_remainder();
    let r = rest.len();
    rest.copy_from_slice(&e[..r]);
    hsum(acc)
}

/// AVX-512 building blocks for hand-written kernels.
#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use std::arch::x86_64::*;

    /// In-register transpose of a 16 x 16 block (v[i] lane k <-> v[k] lane i): 64 shuffles, which
    /// beat 16 gathers or 160 scalar moves for turning rows into class registers and back.
    ///
    /// # Safety
    /// The CPU must support AVX-512F (call it from a function that enables it).
    #[inline(always)]
    pub unsafe fn transpose16(v: &mut [__m512; 16]) {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
        }
        // u[4i + j], 128-bit lane L: column 4L + j of rows 4i..4i+3.
        let mut u = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            u[4 * i] = _mm512_shuffle_ps::<0x44>(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = _mm512_shuffle_ps::<0x44>(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * i + 1], t[4 * i + 3]);
        }
        // Gather lane L of u[j], u[4 + j], u[8 + j], u[12 + j] into column 4L + j.
        for j in 0..4 {
            let v0 = _mm512_shuffle_f32x4::<0x44>(u[j], u[4 + j]);
            let v1 = _mm512_shuffle_f32x4::<0xEE>(u[j], u[4 + j]);
            let v2 = _mm512_shuffle_f32x4::<0x44>(u[8 + j], u[12 + j]);
            let v3 = _mm512_shuffle_f32x4::<0xEE>(u[8 + j], u[12 + j]);
            v[j] = _mm512_shuffle_f32x4::<0x88>(v0, v2);
            v[4 + j] = _mm512_shuffle_f32x4::<0xDD>(v0, v2);
            v[8 + j] = _mm512_shuffle_f32x4::<0x88>(v1, v3);
            v[12 + j] = _mm512_shuffle_f32x4::<0xDD>(v1, v3);
        }
    }

    /// e^x lane-wise: the same Cephes range reduction and polynomial as `simd::exp`.
    ///
    /// # Safety
    /// The CPU must support AVX-512F (call it from a function that enables it).
    #[inline(always)]
    pub unsafe fn exp16(x: __m512) -> __m512 {
        let xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3)), _mm512_set1_ps(88.3));
        exp16_clamped(x, xc)
    }

    /// `exp16` for lanes that are at most 0 or NaN (a softmax row less its max), with its bits:
    /// such lanes never reach the upper clamp, so it is left out (one instruction of 16 in the
    /// softmaxes' hottest loop). A lane above 0 (only from a row with a NaN, whose max can miss
    /// a larger value) may give inf where exp16 gives its clamp's 2e38.
    ///
    /// # Safety
    /// The CPU must support AVX-512F (call it from a function that enables it).
    #[inline(always)]
    pub unsafe fn exp16_nonpositive(x: __m512) -> __m512 {
        exp16_clamped(x, _mm512_max_ps(x, _mm512_set1_ps(-87.3)))
    }

    /// e^x from x and x clamped to [-87.3, 88.3]: lanes with x below -87.3 come out 0.
    #[inline(always)]
    unsafe fn exp16_clamped(x: __m512, xc: __m512) -> __m512 {
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            xc,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_HI), xc);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(super::LN2_LO), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for k in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(k));
        }
        let e = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0));
        // e * 2^n in one instruction (n is integral and in [-126, 127] after the clamp, so this is
        // the scalar twin's exponent-bits product, rounding included); its zero-masking gives
        // the underflowing lanes their 0. A NaN lane is not NaN here: the clamp's max returns
        // -87.3 for it, so it comes out e^-87.3 (the scalar twin gives NaN).
        let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(-87.3));
        _mm512_maskz_scalef_ps(keep, e, n)
    }

    /// Softmax of one row of any length into `out` (same length): the max, then exp16 with the
    /// sum in one register, then the scale; the last partial register is masked (its lanes read
    /// as -inf and give exp 0), so no row is copied into a padded buffer.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `out.len() == x.len()`.
    #[inline(always)]
    pub unsafe fn softmax_row(x: &[f32], out: &mut [f32]) {
        debug_assert_eq!(x.len(), out.len());
        let (full, tail) = (x.len() / 16, x.len() % 16);
        let mask = ((1u32 << tail) - 1) as __mmask16;
        let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
        let neg = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut m = neg;
        for k in 0..full {
            m = _mm512_max_ps(m, _mm512_loadu_ps(xp.add(16 * k)));
        }
        if tail > 0 {
            m = _mm512_max_ps(m, _mm512_mask_loadu_ps(neg, mask, xp.add(16 * full)));
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
        let mut acc = _mm512_setzero_ps();
        for k in 0..full {
            let e = exp16_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(xp.add(16 * k)), mx));
            _mm512_storeu_ps(op.add(16 * k), e);
            acc = _mm512_add_ps(acc, e);
        }
        if tail > 0 {
            let e = exp16_nonpositive(_mm512_sub_ps(_mm512_mask_loadu_ps(neg, mask, xp.add(16 * full)), mx));
            _mm512_mask_storeu_ps(op.add(16 * full), mask, e);
            acc = _mm512_add_ps(acc, e);
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(acc));
        for k in 0..full {
            _mm512_storeu_ps(op.add(16 * k), _mm512_mul_ps(_mm512_loadu_ps(op.add(16 * k)), inv));
        }
        if tail > 0 {
            let v = _mm512_maskz_loadu_ps(mask, op.add(16 * full));
            _mm512_mask_storeu_ps(op.add(16 * full), mask, _mm512_mul_ps(v, inv));
        }
    }
}

/// AVX2 + FMA building blocks: 8-lane twins of the AVX-512 ones, for machines without AVX-512.
#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    /// e^x lane-wise with `avx512::exp16`'s operations (FMA range reduction and polynomial, then
    /// e * 2^n), so both give the same bits; 2^n comes from the exponent bits, as in `simd::exp`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA (call it from a function that enables them).
    #[inline(always)]
    pub unsafe fn exp8(x: __m256) -> __m256 {
        let xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3)), _mm256_set1_ps(88.3));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            xc,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(super::LN2_LO), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for k in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(k));
        }
        let e = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0));
        // n is integral and in [-126, 127] after the clamp: the conversion is exact, 2^n is normal,
        // and one rounded product gives what `vscalefps` gives.
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        let y = _mm256_mul_ps(e, _mm256_castsi256_ps(bits));
        let under = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_set1_ps(-87.3));
        _mm256_andnot_ps(under, y)
    }

    /// Sum of the 8 lanes, as the tree ((0 + 4) + (2 + 6)) + ((1 + 5) + (3 + 7)).
    ///
    /// # Safety
    /// The CPU must support AVX (any AVX2 caller does).
    #[inline(always)]
    pub unsafe fn hsum8(v: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
    }

    /// Largest of the 8 lanes.
    ///
    /// # Safety
    /// The CPU must support AVX (any AVX2 caller does).
    #[inline(always)]
    pub unsafe fn hmax8(v: __m256) -> f32 {
        let q = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let h = _mm_max_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps::<1>(h, h)))
    }

    /// The last `len < 8` floats at `p` in a register, the other lanes `fill`: a stack copy, since
    /// Zen 1 microcodes `vmaskmovps`.
    #[inline(always)]
    unsafe fn load_tail(p: *const f32, len: usize, fill: f32) -> __m256 {
        let mut t = [fill; 8];
        std::ptr::copy_nonoverlapping(p, t.as_mut_ptr(), len);
        _mm256_loadu_ps(t.as_ptr())
    }

    /// Stores the first `len < 8` lanes of `v` at `p`.
    #[inline(always)]
    unsafe fn store_tail(v: __m256, p: *mut f32, len: usize) {
        let mut t = [0.0f32; 8];
        _mm256_storeu_ps(t.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(t.as_ptr(), p, len);
    }

    /// Softmax of one row of any length into `out` (same length), as `avx512::softmax_row` with
    /// 8 lanes: the tail's lanes read as -inf and give exp 0.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `out.len() == x.len()`.
    #[inline(always)]
    pub unsafe fn softmax_row(x: &[f32], out: &mut [f32]) {
        debug_assert_eq!(x.len(), out.len());
        let (full, tail) = (x.len() / 8, x.len() % 8);
        let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        for k in 0..full {
            m = _mm256_max_ps(m, _mm256_loadu_ps(xp.add(8 * k)));
        }
        let t = load_tail(xp.add(8 * full), tail, f32::NEG_INFINITY);
        if tail > 0 {
            m = _mm256_max_ps(m, t);
        }
        let mx = _mm256_set1_ps(hmax8(m));
        // Two independent exps per iteration: one exp8 is a chain of a dozen dependent FMAs, and
        // with one per iteration the loop ran at its latency, not its throughput.
        let (mut acc, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for k in (0..full / 2).map(|k| 2 * k) {
            let e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(xp.add(8 * k)), mx));
            let e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(xp.add(8 * k + 8)), mx));
            _mm256_storeu_ps(op.add(8 * k), e0);
            _mm256_storeu_ps(op.add(8 * k + 8), e1);
            acc = _mm256_add_ps(acc, e0);
            acc1 = _mm256_add_ps(acc1, e1);
        }
        if full % 2 == 1 {
            let k = full - 1;
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(xp.add(8 * k)), mx));
            _mm256_storeu_ps(op.add(8 * k), e);
            acc = _mm256_add_ps(acc, e);
        }
        acc = _mm256_add_ps(acc, acc1);
        let mut et = _mm256_setzero_ps();
        if tail > 0 {
            et = exp8(_mm256_sub_ps(t, mx));
            acc = _mm256_add_ps(acc, et);
        }
        let inv = _mm256_set1_ps(1.0 / hsum8(acc));
        for k in 0..full {
            _mm256_storeu_ps(op.add(8 * k), _mm256_mul_ps(_mm256_loadu_ps(op.add(8 * k)), inv));
        }
        if tail > 0 {
            store_tail(_mm256_mul_ps(et, inv), op.add(8 * full), tail);
        }
    }
}

/// Softmax of one row into `out` (max subtracted first so exp never overflows).
#[inline(always)]
pub fn softmax_row(x: &[f32], out: &mut [f32]) {
    let inv = 1.0 / exp_shifted(x, max(x), out);
    out.iter_mut().for_each(|o| *o *= inv);
}

/// Log-sum-exp of one row.
#[inline(always)]
pub fn logsumexp_row(x: &[f32]) -> f32 {
    let m = max(x);
    let mut e = [0.0f32; LANES];
    let s = if x.len() <= LANES {
        exp_shifted(x, m, &mut e[..x.len()])
    } else {
        let mut s = 0.0;
        for ch in x.chunks(LANES) {
            s += exp_shifted(ch, m, &mut e[..ch.len()]);
        }
        s
    };
    m + s.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx512_softmax_row_matches_the_portable_one_at_every_tail() {
        if level() != Level::Avx512 {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        for len in [1usize, 15, 16, 17, 31, 100, 1000] {
            let x: Vec<f32> = (0..len).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3).collect();
            let (mut want, mut got) = (vec![0.0f32; len], vec![-1.0f32; len]);
            softmax_row(&x, &mut want);
            // SAFETY: AVX-512 checked above; equal lengths.
            unsafe { avx512::softmax_row(&x, &mut got) };
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 4.0 * f32::EPSILON * w.max(f32::MIN_POSITIVE), "len {len}, [{k}]: {g} vs {w}");
            }
            assert!((got.iter().sum::<f32>() - 1.0).abs() < 1e-5, "len {len}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_softmax_row_matches_the_portable_one_at_every_tail() {
        if level() == Level::Baseline {
            eprintln!("skipped: no AVX2 + FMA on this CPU");
            return;
        }
        for len in [1usize, 7, 8, 9, 15, 16, 17, 100, 1000] {
            let x: Vec<f32> = (0..len).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.3).collect();
            let (mut want, mut got) = (vec![0.0f32; len], vec![-1.0f32; len]);
            softmax_row(&x, &mut want);
            #[target_feature(enable = "avx2,fma")]
            unsafe fn run(x: &[f32], out: &mut [f32]) {
                avx2::softmax_row(x, out)
            }
            // SAFETY: AVX2 + FMA checked above; equal lengths.
            unsafe { run(&x, &mut got) };
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= 4.0 * f32::EPSILON * w.max(f32::MIN_POSITIVE), "len {len}, [{k}]: {g} vs {w}");
            }
            assert!((got.iter().sum::<f32>() - 1.0).abs() < 1e-5, "len {len}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp8_equals_the_scalar_exp_and_the_avx512_exp16() {
        if level() == Level::Baseline {
            eprintln!("skipped: no AVX2 + FMA on this CPU");
            return;
        }
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run8(x: &[f32; 16]) -> [f32; 16] {
            let mut out = [0.0f32; 16];
            _mm256_storeu_ps(out.as_mut_ptr(), avx2::exp8(_mm256_loadu_ps(x.as_ptr())));
            _mm256_storeu_ps(out.as_mut_ptr().add(8), avx2::exp8(_mm256_loadu_ps(x.as_ptr().add(8))));
            out
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn run16(x: &[f32; 16]) -> [f32; 16] {
            let mut out = [0.0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), avx512::exp16(_mm512_loadu_ps(x.as_ptr())));
            out
        }
        let mut x = [0.0f32; 16];
        for k in 0..2000 {
            x.iter_mut().enumerate().for_each(|(l, v)| *v = (k * 16 + l) as f32 * 0.0061 - 97.0);
            x[0] = f32::NEG_INFINITY;
            x[1] = -87.3;
            // SAFETY: level() reported at least AVX2 + FMA.
            let got = unsafe { run8(&x) };
            for (g, &v) in got.iter().zip(&x) {
                let want = exp(v);
                assert!((g - want).abs() <= 2.0 * f32::EPSILON * want, "exp8({v}) = {g}, scalar {want}");
            }
            if level() == Level::Avx512 {
                // SAFETY: level() reported AVX-512.
                let wide = unsafe { run16(&x) };
                let bits = |v: [f32; 16]| v.map(f32::to_bits);
                assert_eq!(bits(got), bits(wide), "exp8 and exp16 at {x:?}");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp16_nonpositive_has_exp16s_bits() {
        if level() != Level::Avx512 {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f")]
        unsafe fn both(x: &[f32; 16]) -> ([u32; 16], [u32; 16]) {
            let (mut a, mut b) = ([0.0f32; 16], [0.0f32; 16]);
            _mm512_storeu_ps(a.as_mut_ptr(), avx512::exp16(_mm512_loadu_ps(x.as_ptr())));
            _mm512_storeu_ps(b.as_mut_ptr(), avx512::exp16_nonpositive(_mm512_loadu_ps(x.as_ptr())));
            (a.map(f32::to_bits), b.map(f32::to_bits))
        }
        let mut x = [0.0f32; 16];
        for k in 0..4000 {
            x.iter_mut().enumerate().for_each(|(l, v)| *v = -((k * 16 + l) as f32) * 0.0015);
            x[..6].copy_from_slice(&[f32::NEG_INFINITY, -87.3, -87.29999, -0.0, f32::NAN, -f32::MIN_POSITIVE]);
            // SAFETY: level() reported AVX-512.
            let (a, b) = unsafe { both(&x) };
            assert_eq!(a, b, "at {x:?}");
            assert_eq!(a[0], 0, "exp(-inf)");
        }
    }

    #[test]
    fn the_exponent_bits_trick_gives_the_cast_formulas_bits() {
        // The earlier formula, with `n as i32`.
        fn exp_cast(x: f32) -> f32 {
            let xc = x.clamp(-87.3, 88.3);
            let n = (xc * LOG2E).round_ties_even();
            let r = xc - n * LN2_HI - n * LN2_LO;
            let mut p = 1.987_569_1e-4f32;
            p = p * r + 1.398_199_9e-3;
            p = p * r + 8.333_452e-3;
            p = p * r + 4.166_579_6e-2;
            p = p * r + 1.666_666_5e-1;
            p = p * r + 0.5;
            let e = p * r * r + r + 1.0;
            let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
            if x < -87.3 {
                0.0
            } else {
                e * scale
            }
        }
        let mut x = -100.0f32;
        while x < 100.0 {
            assert_eq!(exp(x).to_bits(), exp_cast(x).to_bits(), "x = {x}");
            x += 0.000_731;
        }
        for x in [f32::INFINITY, f32::NEG_INFINITY, -87.3, 88.3, 0.0, -0.0, f32::MIN_POSITIVE] {
            assert_eq!(exp(x).to_bits(), exp_cast(x).to_bits(), "x = {x}");
        }
    }

    #[test]
    fn exp_is_within_3_ulp_of_std_over_its_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        // 3 ulp of f32 = 3 * 2^-23 relative.
        assert!(worst < 3.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp16_equals_the_scalar_exp() {
        if level() != Level::Avx512 {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn run(x: &[f32; 16]) -> [f32; 16] {
            use std::arch::x86_64::*;
            let mut out = [0.0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), avx512::exp16(_mm512_loadu_ps(x.as_ptr())));
            out
        }
        let mut x = [0.0f32; 16];
        for k in 0..2000 {
            x.iter_mut().enumerate().for_each(|(l, v)| *v = (k * 16 + l) as f32 * 0.0061 - 97.0);
            x[0] = f32::NEG_INFINITY;
            // SAFETY: level() reported AVX-512.
            let got = unsafe { run(&x) };
            for (g, &v) in got.iter().zip(&x) {
                let want = exp(v);
                assert!((g - want).abs() <= 2.0 * f32::EPSILON * want, "exp16({v}) = {g}, scalar {want}");
            }
        }
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(100.0).is_finite() && exp(100.0) > 1e38);
        assert!((exp(1.0) - std::f32::consts::E).abs() <= 2.0 * f32::EPSILON * std::f32::consts::E);
    }

    multiversion! {
        fn sum_of_exps(x: &[f32]) -> f32 {
            x.iter().map(|&v| exp(v)).sum()
        }
    }

    #[test]
    fn row_helpers_match_plain_loops_at_awkward_lengths() {
        for len in [1usize, 3, 10, 16, 17, 33, 100] {
            let x: Vec<f32> = (0..len).map(|i| ((i * 37 % 11) as f32) - 4.5).collect();
            let y: Vec<f32> = (0..len).map(|i| ((i * 13 % 7) as f32) * 0.25).collect();
            let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs());
            let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(max(&x), m, "len {len}");
            assert!(close(sum(&x), x.iter().map(|&v| v as f64).sum()), "sum len {len}");
            assert!(close(dot(&x, &y), x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum()), "dot len {len}");
            let mut out = vec![f32::NAN; len];
            let s = exp_shifted(&x, m, &mut out);
            let want: Vec<f64> = x.iter().map(|&v| (v as f64 - m as f64).exp()).collect();
            assert!(close(s, want.iter().sum()), "exp sum len {len}");
            assert!(out.iter().zip(&want).all(|(&o, &w)| close(o, w)), "exp len {len}");
        }
    }

    #[test]
    fn multiversioned_body_gives_the_baseline_result() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32) * 0.01 - 5.0).collect();
        let want: f64 = x.iter().map(|&v| (v as f64).exp()).sum();
        let got = sum_of_exps(&x) as f64;
        assert!(((got - want) / want).abs() < 1e-5, "{got} vs {want}");
    }
}
