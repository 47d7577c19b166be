//! MixMatch (Berthelot et al. 2019), as its official code does it, and MixMatch + MUSCLE.
//!
//! Label guessing: average the softmax of K = 2 augmented views of each unlabeled image and
//! sharpen it with temperature T; no gradient flows through the guess. MixUp: mu ~ Beta(a, a),
//! mu' = max(mu, 1 - mu), every input and target mixed with a random shuffle of all of them.
//! L = L_X (soft cross-entropy on the mixed labeled rows) + w_u(t) L_U (mean squared error of the
//! mixed unlabeled rows' probabilities), plus w_mi(t) L_mi between the two guessing views in
//! `mixmatch-muscle`, where the guessing forward keeps its gradient for that term.

use super::{LossTerms, ObjectiveConfig, StepInput};
use crate::autograd::Tape;
use crate::error::Result;
use crate::nn::{ForwardCtx, Model};
use crate::ops;
use crate::optim::ramp;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// RNG purpose of MixUp's coefficient and shuffle.
const MIXUP: u64 = u64::from_be_bytes(*b"ssl:mixu");

/// Sharpens each row of probabilities: p^(1/T) / sum p^(1/T).
pub fn sharpen(p: &[f32], classes: usize, temperature: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; p.len()];
    for (src, dst) in p.chunks(classes).zip(out.chunks_mut(classes)) {
        // Powers of probabilities relative to the row's largest keep 1/T large without underflow
        // to an all-zero row.
        let m = src.iter().cloned().fold(0.0f32, f32::max).max(f32::MIN_POSITIVE);
        let mut s = 0.0f32;
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = (v / m).powf(1.0 / temperature);
            s += *d;
        }
        dst.iter_mut().for_each(|d| *d /= s);
    }
    out
}

/// mu' = max(mu, 1 - mu) with mu ~ Beta(alpha, alpha), and a permutation of `n` rows, both a
/// pure function of (seed, step).
pub fn mixup_draw(seed: u64, step: u64, alpha: f64, n: usize) -> (f32, Vec<usize>) {
    let mut rng = Rng::keyed(seed, &[MIXUP, step]);
    let mu = rng.beta(alpha, alpha);
    let mu = mu.max(1.0 - mu) as f32;
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        perm.swap(i, rng.below(i as u32 + 1) as usize);
    }
    (mu, perm)
}

/// rows' = mu * rows + (1 - mu) * rows[perm], for an [n, ...] buffer of `row` elements per row.
fn mix_rows(data: &[f32], row: usize, mu: f32, perm: &[usize]) -> Vec<f32> {
    let mut out = crate::pool::take(data.len());
    for (i, &j) in perm.iter().enumerate() {
        let (a, b) = (&data[i * row..(i + 1) * row], &data[j * row..(j + 1) * row]);
        for ((o, &x), &y) in out[i * row..(i + 1) * row].iter_mut().zip(a).zip(b) {
            *o = mu * x + (1.0 - mu) * y;
        }
    }
    out
}

/// The MixMatch loss (with the MI term when `cfg.method` is MixMatchMuscle).
pub fn mixmatch_loss(cfg: &ObjectiveConfig, model: &mut Model, input: &StepInput) -> Result<LossTerms> {
    let StepInput { tape, batch, step, seed } = *input;
    let [u1, u2] = input.two_views("mixmatch")?;
    let with_mi = cfg.method == super::Method::MixMatchMuscle;
    let (nl, nu) = (batch.labels.len(), u1.shape()[0]);
    let classes = model.spec().classes;
    let mut ctx = ForwardCtx::train(seed, step);

    // Label guessing: one forward of both views (BN statistics over both). With the MI term it is
    // recorded on the tape; the guess itself is computed from plain values (stop-gradient).
    let guess_tape = Tape::no_grad();
    let u = ops::concat_rows(if with_mi { tape } else { &guess_tape }, &[u1, u2])?;
    let gl = model.forward(if with_mi { tape } else { &guess_tape }, &u, &ctx)?;
    let probs = ops::softmax(&guess_tape, &gl.detach())?;
    // The guess and MixUp are host work on small arrays (n x C probabilities, index draws).
    let pd = probs.to_vec()?;
    let avg: Vec<f32> = (0..nu * classes).map(|i| 0.5 * (pd[i] + pd[nu * classes + i])).collect();
    let q = sharpen(&avg, classes, cfg.temperature);

    // MixUp over [labeled, view 1, view 2] with targets [one-hot, q, q].
    let n = nl + 2 * nu;
    let (mu, perm) = mixup_draw(seed, step, cfg.mixup_alpha as f64, n);
    let x = ops::concat_rows(&guess_tape, &[&batch.labeled, u1, u2])?;
    let row = x.numel() / n;
    let mut targets = vec![0.0f32; n * classes];
    for (i, &y) in batch.labels.iter().enumerate() {
        targets[i * classes + y] = 1.0;
    }
    targets[nl * classes..(nl + nu) * classes].copy_from_slice(&q);
    targets[(nl + nu) * classes..].copy_from_slice(&q);
    let mut shape = x.shape().to_vec();
    shape[0] = n;
    let xm = Tensor::from_vec(mix_rows(&x.to_vec()?, row, mu, &perm), &shape)?;
    let tm = mix_rows(&targets, classes, mu, &perm);

    // One forward of every mixed row, so BN statistics cover labeled and unlabeled parts alike.
    ctx.pass = 1;
    let logits = model.forward(tape, &xm, &ctx)?;
    let lx = ops::cross_entropy_soft(
        tape,
        &ops::narrow_rows(tape, &logits, 0, nl)?,
        &Tensor::from_vec(tm[..nl * classes].to_vec(), &[nl, classes])?.to_device(logits.device())?,
    )?;
    let pu = ops::softmax(tape, &ops::narrow_rows(tape, &logits, nl, 2 * nu)?)?;
    let qu = Tensor::from_vec(tm[nl * classes..].to_vec(), &[2 * nu, classes])?.to_device(logits.device())?;
    let lu = ops::mse(tape, &pu, &qu)?;
    let w_u = ramp(cfg.w_u, step, cfg.ramp_steps);
    let mut total = ops::add(tape, &lx, &ops::scale(tape, &lu, w_u)?)?;
    let (mut mi_term, mut w) = (None, 0.0);
    if with_mi {
        let za = ops::narrow_rows(tape, &gl, 0, nu)?;
        let zb = ops::narrow_rows(tape, &gl, nu, nu)?;
        let mi = ops::mutual_info_loss(tape, &za, &zb, cfg.lambda)?;
        w = ramp(cfg.w_mi, step, cfg.ramp_steps);
        total = ops::add(tape, &total, &ops::scale(tape, &mi, w)?)?;
        mi_term = Some(mi);
    }
    Ok(LossTerms { sup: Some(lx), host: Some(lu), w_u, mi: mi_term, w_mi: w, total })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharpening_matches_the_formula_and_keeps_rows_normalised() {
        let p = [0.1, 0.2, 0.7, 0.5, 0.25, 0.25];
        let q = sharpen(&p, 3, 0.5);
        let row = |a: f32, b: f32, c: f32| {
            let s = a * a + b * b + c * c;
            [a * a / s, b * b / s, c * c / s]
        };
        let want: Vec<f32> = row(0.1, 0.2, 0.7).into_iter().chain(row(0.5, 0.25, 0.25)).collect();
        for (a, b) in q.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // A very small temperature gives (nearly) one-hot rows, never NaN.
        let hard = sharpen(&[1e-3, 2e-3, 1e-3], 3, 0.01);
        assert!(hard.iter().all(|v| v.is_finite()) && hard[1] > 0.999);
    }

    #[test]
    fn mixup_coefficient_and_shuffle() {
        let (mu, perm) = mixup_draw(3, 7, 0.75, 50);
        assert!((0.5..=1.0).contains(&mu));
        let mut sorted = perm.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(mixup_draw(3, 7, 0.75, 50), (mu, perm.clone()));
        assert_ne!(mixup_draw(3, 8, 0.75, 50).1, perm);
        let rows = [1.0, 2.0, 10.0, 20.0];
        assert_eq!(mix_rows(&rows, 2, 0.75, &[1, 0]), vec![3.25, 6.5, 7.75, 15.5]);
    }
}
