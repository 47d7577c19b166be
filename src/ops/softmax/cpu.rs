//! Row softmax, log-softmax and the fused softmax + cross-entropy (hard and soft targets).
//!
//! The fused kernels return the loss and the gradient of the mean loss with respect to the
//! logits in one pass over the logits, so the backward is a scale by the upstream gradient.
//! Rows are processed in fixed chunks on the worker threads and the per-chunk losses summed in
//! chunk order, so results do not depend on the thread count.

use crate::cpu::simd::{self, logsumexp_row, softmax_row};
use crate::multiversion;
use rayon::prelude::*;

/// Rows per parallel work item.
const CHUNK_ROWS: usize = 1024;

multiversion! {
    /// Row softmax of an n x c matrix.
    pub fn softmax_fwd(x: &[f32], c: usize, y: &mut [f32]) {
        for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            softmax_row(xr, yr);
        }
    }
}

multiversion! {
    /// dx = y * (dy - <y, dy>) per row.
    pub fn softmax_bwd(y: &[f32], dy: &[f32], c: usize, dx: &mut [f32]) {
        for ((yr, gr), dr) in y.chunks_exact(c).zip(dy.chunks_exact(c)).zip(dx.chunks_exact_mut(c)) {
            let dot = simd::dot(yr, gr);
            for ((d, &p), &g) in dr.iter_mut().zip(yr).zip(gr) {
                *d = p * (g - dot);
            }
        }
    }
}

multiversion! {
    /// Row log-softmax of an n x c matrix.
    pub fn log_softmax_fwd(x: &[f32], c: usize, y: &mut [f32]) {
        for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            let l = logsumexp_row(xr);
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = v - l;
            }
        }
    }
}

multiversion! {
    /// dx = dy - softmax * sum(dy) per row, from the log-softmax output y.
    pub fn log_softmax_bwd(y: &[f32], dy: &[f32], c: usize, dx: &mut [f32]) {
        for ((yr, gr), dr) in y.chunks_exact(c).zip(dy.chunks_exact(c)).zip(dx.chunks_exact_mut(c)) {
            let s = simd::sum(gr);
            for ((d, &l), &g) in dr.iter_mut().zip(yr).zip(gr) {
                *d = g - simd::exp(l) * s;
            }
        }
    }
}

multiversion! {
    /// Sum over these rows of the hard-target cross-entropy; `grad` gets softmax - onehot, times
    /// `inv_n`.
    fn cross_entropy_hard_rows(x: &[f32], labels: &[usize], c: usize, inv_n: f32, grad: &mut [f32]) -> f64 {
        let mut total = 0.0f64;
        for ((xr, gr), &y) in x.chunks_exact(c).zip(grad.chunks_exact_mut(c)).zip(labels) {
            let l = logsumexp_row(xr);
            total += (l - xr[y]) as f64;
            for (g, &v) in gr.iter_mut().zip(xr) {
                *g = simd::exp(v - l) * inv_n;
            }
            gr[y] -= inv_n;
        }
        total
    }
}

multiversion! {
    /// Sum over these rows of -sum_c q_c log softmax(x)_c; `grad` as for hard targets.
    fn cross_entropy_soft_rows(x: &[f32], q: &[f32], c: usize, inv_n: f32, grad: &mut [f32]) -> f64 {
        let mut total = 0.0f64;
        for ((xr, qr), gr) in x.chunks_exact(c).zip(q.chunks_exact(c)).zip(grad.chunks_exact_mut(c)) {
            let l = logsumexp_row(xr);
            let qsum = simd::sum(qr);
            let mut row = 0.0f32;
            for ((g, &v), &t) in gr.iter_mut().zip(xr).zip(qr) {
                row -= t * (v - l);
                *g = (simd::exp(v - l) * qsum - t) * inv_n;
            }
            total += row as f64;
        }
        total
    }
}

/// AVX-512 fused softmax-CE for C <= 16: one masked register per row.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::cpu::simd::avx512::exp16_nonpositive;
    use std::arch::x86_64::*;

    /// `super::cross_entropy_hard_rows` for C <= 16.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; c in 1..=16; x and grad hold labels.len() rows of C; every
    /// label is below c.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn cross_entropy_hard_rows(x: &[f32], labels: &[usize], c: usize, inv_n: f32, grad: &mut [f32]) -> f64 {
        let mask = ((1u32 << c) - 1) as __mmask16;
        let mut total = 0.0f64;
        for (r, &y) in labels.iter().enumerate() {
            let v = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), mask, x.as_ptr().add(r * c));
            let m = _mm512_reduce_max_ps(v);
            let e = exp16_nonpositive(_mm512_sub_ps(v, _mm512_set1_ps(m)));
            let s = _mm512_reduce_add_ps(e);
            total += (m + s.ln() - x[r * c + y]) as f64;
            let g = _mm512_mul_ps(e, _mm512_set1_ps(inv_n / s));
            _mm512_mask_storeu_ps(grad.as_mut_ptr().add(r * c), mask, g);
            grad[r * c + y] -= inv_n;
        }
        total
    }
}

/// Mean cross-entropy of logits (n x c) against class indices; `grad` gets d(mean loss)/d logits.
pub fn cross_entropy_hard_fwd(x: &[f32], labels: &[usize], c: usize, grad: &mut [f32]) -> f32 {
    let n = labels.len();
    let inv_n = 1.0 / n as f32;
    let step = CHUNK_ROWS * c;
    let fast = cfg!(target_arch = "x86_64") && c <= simd::LANES && simd::level() == simd::Level::Avx512;
    let rows = |xc: &[f32], lc: &[usize], gc: &mut [f32]| -> f64 {
        #[cfg(target_arch = "x86_64")]
        if fast && lc.iter().all(|&y| y < c) {
            // SAFETY: the CPU has AVX-512F (checked above), c <= 16, labels are in range, and the
            // chunks hold lc.len() whole rows.
            return unsafe { avx512::cross_entropy_hard_rows(xc, lc, c, inv_n, gc) };
        }
        cross_entropy_hard_rows(xc, lc, c, inv_n, gc)
    };
    let parts: Vec<f64> = x
        .par_chunks(step)
        .zip(grad.par_chunks_mut(step))
        .zip(labels.par_chunks(CHUNK_ROWS))
        .map(|((xc, gc), lc)| rows(xc, lc, gc))
        .collect();
    (parts.iter().sum::<f64>() / n as f64) as f32
}

/// Mean over rows of -sum_c q_c log softmax(x)_c for target rows q (n x c); `grad` as above.
pub fn cross_entropy_soft_fwd(x: &[f32], q: &[f32], c: usize, grad: &mut [f32]) -> f32 {
    let n = x.len() / c;
    let inv_n = 1.0 / n as f32;
    let step = CHUNK_ROWS * c;
    let parts: Vec<f64> = x
        .par_chunks(step)
        .zip(q.par_chunks(step))
        .zip(grad.par_chunks_mut(step))
        .map(|((xc, qc), gc)| cross_entropy_soft_rows(xc, qc, c, inv_n, gc))
        .collect();
    (parts.iter().sum::<f64>() / n as f64) as f32
}

/// FixMatch's pseudo-labelled cross-entropy of `strong` (n x c) against the confident argmax of
/// `weak` (n x c, read only): row i is kept when its weak softmax's largest probability reaches
/// `tau`; `grad` gets d(mean over all n rows)/d strong (zero rows where not kept). Returns (mean
/// loss, fraction of rows kept, fraction kept with the pseudo-label equal to `truth`). Twin of
/// `cross_entropy_pseudo_fwd_f32`.
pub fn cross_entropy_pseudo_fwd(
    weak: &[f32],
    strong: &[f32],
    truth: &[usize],
    c: usize,
    tau: f32,
    grad: &mut [f32],
) -> (f32, f32, f32) {
    let n = truth.len();
    let inv_n = 1.0 / n as f32;
    let step = CHUNK_ROWS * c;
    let parts: Vec<[f64; 3]> = weak
        .par_chunks(step)
        .zip(strong.par_chunks(step))
        .zip(grad.par_chunks_mut(step))
        .zip(truth.par_chunks(CHUNK_ROWS))
        .map(|(((wc, sc), gc), tc)| {
            let mut acc = [0.0f64; 3];
            for (((wr, sr), gr), &y) in wc.chunks_exact(c).zip(sc.chunks_exact(c)).zip(gc.chunks_exact_mut(c)).zip(tc) {
                let wm = simd::max(wr);
                let ws: f32 = wr.iter().map(|&v| simd::exp(v - wm)).sum();
                // The first column holding the max (none in a row of NaNs).
                let t = wr.iter().position(|&v| v == wm);
                let Some(t) = t.filter(|_| 1.0 / ws >= tau) else {
                    gr.fill(0.0);
                    continue;
                };
                let l = logsumexp_row(sr);
                for (g, &v) in gr.iter_mut().zip(sr) {
                    *g = simd::exp(v - l) * inv_n;
                }
                gr[t] -= inv_n;
                acc[0] += (l - sr[t]) as f64;
                acc[1] += 1.0;
                acc[2] += (t == y) as u8 as f64;
            }
            acc
        })
        .collect();
    let mut total = [0.0f64; 3];
    for p in &parts {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    let mean = |v: f64| (v / n as f64) as f32;
    (mean(total[0]), mean(total[1]), mean(total[2]))
}

/// Reference mean cross-entropy in f64 by plain loops: against class indices (`labels`, n of
/// them) or target rows (`q`, n x c); returns (loss, d loss / d x). For checking other
/// implementations (the Python package's float64 path), not for speed.
pub fn cross_entropy_f64(x: &[f64], labels: Option<&[usize]>, q: Option<&[f64]>, c: usize) -> (f64, Vec<f64>) {
    let n = x.len() / c;
    let mut grad = vec![0.0f64; x.len()];
    let mut total = 0.0f64;
    for r in 0..n {
        let xr = &x[r * c..(r + 1) * c];
        let m = xr.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let s: f64 = xr.iter().map(|&v| (v - m).exp()).sum();
        let lse = m + s.ln();
        let gr = &mut grad[r * c..(r + 1) * c];
        // d/dx of -sum_k t_k (x_k - lse) = softmax(x) * sum_k t_k - t.
        let t = |k: usize| match (labels, q) {
            (Some(l), _) => f64::from(u8::from(l[r] == k)),
            (None, Some(q)) => q[r * c + k],
            (None, None) => 0.0,
        };
        let mass: f64 = (0..c).map(t).sum();
        for k in 0..c {
            total -= t(k) * (xr[k] - lse);
            gr[k] = (((xr[k] - m).exp() / s) * mass - t(k)) / n as f64;
        }
    }
    (total / n as f64, grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn randn(len: usize, std: f32, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed, 3);
        (0..len).map(|_| std * r.normal()).collect()
    }

    /// Loss and gradient in f64 by the textbook formulas, for soft targets q (hard = one-hot).
    fn reference(x: &[f32], q: &[f32], c: usize) -> (f64, Vec<f64>) {
        let n = x.len() / c;
        let (mut loss, mut grad) = (0.0, vec![0.0; x.len()]);
        for i in 0..n {
            let row: Vec<f64> = x[i * c..(i + 1) * c].iter().map(|&v| v as f64).collect();
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let qs: f64 = q[i * c..(i + 1) * c].iter().map(|&t| t as f64).sum();
            for k in 0..c {
                let t = q[i * c + k] as f64;
                loss -= t * (row[k] - lse);
                grad[i * c + k] = ((row[k] - lse).exp() * qs - t) / n as f64;
            }
        }
        (loss / n as f64, grad)
    }

    fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
        }
    }

    #[test]
    fn fused_cross_entropy_matches_f64_reference_hard_and_soft() {
        // Rows across several chunks, awkward class counts, and logits of +-80.
        for (k, &(n, c, std)) in [(1, 3, 1.0), (2500, 10, 3.0), (70, 1000, 1.0), (300, 7, 80.0)].iter().enumerate() {
            let x = randn(n * c, std, 10 + k as u64);
            let labels: Vec<usize> = (0..n).map(|i| (i * 7 + k) % c).collect();
            let mut onehot = vec![0.0f32; n * c];
            labels.iter().enumerate().for_each(|(i, &y)| onehot[i * c + y] = 1.0);
            let (want, want_g) = reference(&x, &onehot, c);
            let mut g = vec![0.0f32; n * c];
            let got = cross_entropy_hard_fwd(&x, &labels, c, &mut g);
            assert!((got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "hard n {n} c {c}: {got} vs {want}");
            assert_close(&g, &want_g, 1e-5, "hard grad");
            let q: Vec<f32> = randn(n * c, 1.0, 90 + k as u64).iter().map(|v| v.abs()).collect();
            let (want, want_g) = reference(&x, &q, c);
            let got = cross_entropy_soft_fwd(&x, &q, c, &mut g);
            assert!((got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "soft n {n} c {c}: {got} vs {want}");
            assert_close(&g, &want_g, 1e-5, "soft grad");
        }
    }

    /// FixMatch's term by the textbook formulas in f64: (loss, kept, right, grad).
    fn pseudo_reference(w: &[f32], s: &[f32], truth: &[usize], c: usize, tau: f64) -> (f64, f64, f64, Vec<f64>) {
        let n = truth.len();
        let (mut loss, mut kept, mut right, mut grad) = (0.0, 0.0, 0.0, vec![0.0; n * c]);
        for i in 0..n {
            let wr: Vec<f64> = w[i * c..(i + 1) * c].iter().map(|&v| v as f64).collect();
            let m = wr.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            // A row of NaNs has no max and is never kept.
            let Some(t) = wr.iter().position(|&v| v == m) else { continue };
            if 1.0 / wr.iter().map(|v| (v - m).exp()).sum::<f64>() < tau {
                continue;
            }
            let sr: Vec<f64> = s[i * c..(i + 1) * c].iter().map(|&v| v as f64).collect();
            let ms = sr.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let lse = ms + sr.iter().map(|v| (v - ms).exp()).sum::<f64>().ln();
            loss += lse - sr[t];
            kept += 1.0;
            right += (t == truth[i]) as u8 as f64;
            for k in 0..c {
                grad[i * c + k] = ((sr[k] - lse).exp() - (k == t) as u8 as f64) / n as f64;
            }
        }
        (loss / n as f64, kept / n as f64, right / n as f64, grad)
    }

    #[test]
    fn pseudo_labelled_cross_entropy_matches_the_formulas() {
        let (n, c) = (2100, 10); // more than two chunks of rows
        let mut r = Rng::new(5, 5);
        let mut w = randn(n * c, 1.0, 61);
        // Every other row confident (a +9 spike: max probability ~0.99), the rest near-uniform,
        // so no row sits within rounding of tau = 0.95.
        for i in (0..n).step_by(2) {
            w[i * c + r.below(c as u32) as usize] += 9.0;
        }
        // A tie (the first column wins) and a NaN row (never kept).
        w[..c].fill(0.0);
        w[1] = 12.0;
        w[4] = 12.0;
        w[3 * c..4 * c].fill(f32::NAN);
        let s = randn(n * c, 3.0, 62);
        let truth: Vec<usize> = (0..n).map(|i| (i * 3) % c).collect();
        let mut g = vec![f32::NAN; n * c];
        let (loss, kept, right) = cross_entropy_pseudo_fwd(&w, &s, &truth, c, 0.95, &mut g);
        let (want, want_kept, want_right, want_g) = pseudo_reference(&w, &s, &truth, c, 0.95);
        assert!((loss as f64 - want).abs() <= 1e-5 * (1.0 + want), "{loss} vs {want}");
        assert_eq!((kept as f64, right as f64), (want_kept as f32 as f64, want_right as f32 as f64));
        assert!((0.45..0.55).contains(&kept), "kept {kept}");
        assert!(right > 0.0 && right < kept);
        assert_close(&g, &want_g, 1e-6, "pseudo grad");
        // The tied row (max probability < 0.5), the NaN row and the uncertain rows: no gradient.
        assert!(g[..c].iter().chain(&g[c..2 * c]).chain(&g[3 * c..4 * c]).all(|&v| v == 0.0));
        // At tau 0.4 the tied row is kept with the first of its two columns as the label.
        let mut g1 = vec![0.0; c];
        cross_entropy_pseudo_fwd(&w[..c], &s[..c], &[1], c, 0.4, &mut g1);
        assert!(g1[1] < 0.0 && g1[4] > 0.0 && g1[0] > 0.0, "{g1:?}");
        // tau = 1 keeps only rows whose softmax is exactly one-hot in f32; none here.
        let (loss, kept, _) = cross_entropy_pseudo_fwd(&w, &s, &truth, c, 1.0, &mut g);
        assert_eq!((loss, kept), (0.0, 0.0));
        assert!(g.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_exp() {
        let (n, c) = (33, 17);
        let x = randn(n * c, 30.0, 4);
        let mut y = vec![0.0f32; n * c];
        softmax_fwd(&x, c, &mut y);
        for (xr, yr) in x.chunks(c).zip(y.chunks(c)) {
            let m = xr.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let s: f64 = xr.iter().map(|&v| (v as f64 - m).exp()).sum();
            for (&v, &p) in xr.iter().zip(yr) {
                let want = (v as f64 - m).exp() / s;
                // Relative 1e-5: rounding v - m in f32 at |v - m| ~ 100 alone costs ~6e-6.
                assert!((p as f64 - want).abs() <= 1e-5 * want + 1e-30, "{p} vs {want}");
            }
        }
    }

    #[test]
    fn loss_does_not_depend_on_the_thread_count() {
        let (n, c) = (3 * CHUNK_ROWS + 5, 10);
        let x = randn(n * c, 2.0, 8);
        let labels: Vec<usize> = (0..n).map(|i| i % c).collect();
        let on = |t: usize| match rayon::ThreadPoolBuilder::new().num_threads(t).build() {
            Ok(pool) => pool.install(|| {
                let mut g = vec![0.0f32; n * c];
                (cross_entropy_hard_fwd(&x, &labels, c, &mut g).to_bits(), g)
            }),
            Err(e) => panic!("thread pool: {e}"),
        };
        assert_eq!(on(1), on(2));
    }
}
