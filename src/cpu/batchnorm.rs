//! Batch normalisation over (N, H, W) per channel, NCHW, parallel over channels.

use super::conv::SyncPtr;
use rayon::prelude::*;

/// Per-channel batch statistics saved by the training forward for the backward.
#[derive(Clone, Debug)]
pub struct BatchStats {
    /// Batch mean per channel.
    pub mean: Vec<f32>,
    /// Biased batch variance per channel (what normalises).
    pub var: Vec<f32>,
    /// 1 / sqrt(var + eps).
    pub invstd: Vec<f32>,
}

/// Runs `f(c, &channel_view)` for every channel in parallel; the view yields the channel's
/// `n` planes of `hw` elements.
fn planes(x: &[f32], n: usize, c: usize, hw: usize, ch: usize) -> impl Iterator<Item = &[f32]> {
    (0..n).map(move |i| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw])
}

/// Training forward: normalise with the batch statistics; returns them.
pub fn forward_train(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    y: &mut [f32],
) -> BatchStats {
    let m = (n * hw) as f64;
    let yp = SyncPtr(y.as_mut_ptr());
    let stats: Vec<(f32, f32, f32)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            // Two passes in f64: the one-pass formula loses digits when |mean| >> std.
            let sum: f64 = planes(x, n, c, hw, ch).map(|p| p.iter().map(|&v| v as f64).sum::<f64>()).sum();
            let mean = sum / m;
            let ss: f64 =
                planes(x, n, c, hw, ch).map(|p| p.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>()).sum();
            let var = ss / m;
            let invstd = 1.0 / (var + eps as f64).sqrt();
            let scale = (gamma[ch] as f64 * invstd) as f32;
            let shift = (beta[ch] as f64 - mean * gamma[ch] as f64 * invstd) as f32;
            for i in 0..n {
                let off = (i * c + ch) * hw;
                // SAFETY: each (image, channel) plane is written by one task only.
                let dst = unsafe { yp.slice(off, hw) };
                for (d, &v) in dst.iter_mut().zip(&x[off..off + hw]) {
                    *d = v * scale + shift;
                }
            }
            (mean as f32, var as f32, invstd as f32)
        })
        .collect();
    BatchStats {
        mean: stats.iter().map(|s| s.0).collect(),
        var: stats.iter().map(|s| s.1).collect(),
        invstd: stats.iter().map(|s| s.2).collect(),
    }
}

/// Evaluation forward: normalise with running statistics.
pub fn forward_eval(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
    y: &mut [f32],
) {
    y.par_chunks_mut(hw).zip(x.par_chunks(hw)).enumerate().for_each(|(plane, (dst, src))| {
        let ch = plane % c;
        let invstd = 1.0 / (var[ch] + eps).sqrt();
        let scale = gamma[ch] * invstd;
        let shift = beta[ch] - mean[ch] * scale;
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = v * scale + shift;
        }
    });
    debug_assert_eq!(x.len(), n * c * hw);
}

/// Training backward: dx (overwritten, when given), and dgamma, dbeta (overwritten).
pub fn backward_train(
    x: &[f32],
    dy: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    gamma: &[f32],
    stats: &BatchStats,
    dx: Option<&mut [f32]>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let m = (n * hw) as f64;
    let dxp = dx.map(|d| SyncPtr(d.as_mut_ptr()));
    let sums: Vec<(f32, f32)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mean, invstd) = (stats.mean[ch], stats.invstd[ch]);
            let mut sdy = 0.0f64;
            let mut sdyx = 0.0f64;
            for i in 0..n {
                let off = (i * c + ch) * hw;
                for (&g, &v) in dy[off..off + hw].iter().zip(&x[off..off + hw]) {
                    sdy += g as f64;
                    sdyx += g as f64 * ((v - mean) * invstd) as f64;
                }
            }
            if let Some(dxp) = dxp {
                let k = gamma[ch] * invstd;
                let a = (sdy / m) as f32;
                let b = (sdyx / m) as f32;
                for i in 0..n {
                    let off = (i * c + ch) * hw;
                    // SAFETY: each (image, channel) plane is written by one task only.
                    let dst = unsafe { dxp.slice(off, hw) };
                    for ((d, &g), &v) in dst.iter_mut().zip(&dy[off..off + hw]).zip(&x[off..off + hw]) {
                        *d = k * (g - a - (v - mean) * invstd * b);
                    }
                }
            }
            (sdyx as f32, sdy as f32)
        })
        .collect();
    for (ch, (g, b)) in sums.into_iter().enumerate() {
        dgamma[ch] = g;
        dbeta[ch] = b;
    }
}

/// Evaluation backward (running statistics are constants): dx, dgamma, dbeta.
pub fn backward_eval(
    x: &[f32],
    dy: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
    dx: Option<&mut [f32]>,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    dgamma.fill(0.0);
    dbeta.fill(0.0);
    for i in 0..n {
        for ch in 0..c {
            let off = (i * c + ch) * hw;
            let invstd = 1.0 / (var[ch] + eps).sqrt();
            for (&g, &v) in dy[off..off + hw].iter().zip(&x[off..off + hw]) {
                dgamma[ch] += g * (v - mean[ch]) * invstd;
                dbeta[ch] += g;
            }
        }
    }
    if let Some(dx) = dx {
        for (plane, (d, g)) in dx.chunks_mut(hw).zip(dy.chunks(hw)).enumerate() {
            let ch = plane % c;
            let k = gamma[ch] / (var[ch] + eps).sqrt();
            for (a, &b) in d.iter_mut().zip(g) {
                *a = k * b;
            }
        }
    }
}
