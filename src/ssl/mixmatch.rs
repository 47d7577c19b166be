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
use crate::nn::Model;
use crate::ops::{self, mixmatch, Indices};
use crate::optim::ramp;
use crate::rng::Rng;

/// RNG purpose of MixUp's coefficient and shuffle.
const MIXUP: u64 = u64::from_be_bytes(*b"ssl:mixu");

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

/// The MixMatch loss (with the MI term when `cfg.method` is MixMatchMuscle).
pub fn mixmatch_loss(cfg: &ObjectiveConfig, model: &mut Model, input: &StepInput) -> Result<LossTerms> {
    let StepInput { tape, batch, step, seed, .. } = *input;
    let [u1, u2] = input.two_views("mixmatch")?;
    let with_mi = cfg.method == super::Method::MixMatchMuscle;
    let (nl, nu) = (batch.labels.len(), u1.shape()[0]);
    let classes = model.spec().classes;
    let mut ctx = cfg.forward_ctx(seed, step);

    // Label guessing: one forward of both views (BN statistics over both). With the MI term it is
    // recorded on the tape; the guess itself is computed from detached values (stop-gradient).
    let guess_tape = Tape::no_grad();
    let u = ops::concat_rows(if with_mi { tape } else { &guess_tape }, &[u1, u2])?;
    let gl = model.forward(if with_mi { tape } else { &guess_tape }, &u, &ctx)?;
    let probs = ops::softmax(&guess_tape, &gl.detach())?;
    let q = mixmatch::guess(&probs, cfg.temperature)?;

    // MixUp over [labeled, view 1, view 2] with targets [one-hot, q, q], on the batch's device
    // (the permutation was uploaded with the batch when the trainer knew it).
    let n = nl + 2 * nu;
    let (mu, perm) = mixup_draw(seed, step, cfg.mixup_alpha as f64, n);
    let perm = match input.indices.first() {
        Some(p) if p.host == perm => p.clone(),
        _ => Indices::from(perm),
    };
    let x = ops::concat_rows(&guess_tape, &[&batch.labeled, u1, u2])?;
    let xm = mixmatch::mix_rows(&x, &perm, mu)?;
    let one_hot = mixmatch::one_hot(&batch.labels, classes, &x)?;
    let tm = mixmatch::mix_rows(&ops::concat_rows(&guess_tape, &[&one_hot, &q, &q])?, &perm, mu)?;

    // One forward of every mixed row, so BN statistics cover labeled and unlabeled parts alike.
    ctx.pass = 1;
    let logits = model.forward(tape, &xm, &ctx)?;
    let lx = ops::cross_entropy_soft(
        tape,
        &ops::narrow_rows(tape, &logits, 0, nl)?,
        &ops::narrow_rows(&guess_tape, &tm, 0, nl)?,
    )?;
    let pu = ops::softmax(tape, &ops::narrow_rows(tape, &logits, nl, 2 * nu)?)?;
    let qu = ops::narrow_rows(&guess_tape, &tm, nl, 2 * nu)?;
    let lu = ops::mse(tape, &pu, &qu)?;
    let w_u = ramp(cfg.w_u, step, cfg.ramp_steps);
    let mut total = ops::add(tape, &lx, &ops::scale(tape, &lu, w_u)?)?;
    let (mut mi_term, mut w) = (None, 0.0);
    if with_mi {
        let za = ops::narrow_rows(tape, &gl, 0, nu)?;
        let zb = ops::narrow_rows(tape, &gl, nu, nu)?;
        let mi = ops::mutual_info_loss_across(tape, &za, &zb, cfg.lambda, cfg.world)?;
        w = ramp(cfg.w_mi, step, cfg.ramp_steps);
        total = ops::add(tape, &total, &ops::scale(tape, &mi, w)?)?;
        mi_term = Some(mi);
    }
    Ok(LossTerms { sup: Some(lx), host: Some(lu), w_u, mi: mi_term, w_mi: w, total, pseudo: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixup_coefficient_and_shuffle() {
        let (mu, perm) = mixup_draw(3, 7, 0.75, 50);
        assert!((0.5..=1.0).contains(&mu));
        let mut sorted = perm.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(mixup_draw(3, 7, 0.75, 50), (mu, perm.clone()));
        assert_ne!(mixup_draw(3, 8, 0.75, 50).1, perm);
    }
}
