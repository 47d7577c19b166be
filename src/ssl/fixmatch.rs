//! FixMatch (Sohn et al. 2020), as its official code does it, and FixMatch + MUSCLE.
//!
//! One forward of [labeled, weak views, strong views] (batch norm sees them together). The weak
//! view's prediction, under stop-gradient, gives a pseudo-label where its largest probability
//! reaches tau; L_U is the strong view's cross-entropy against it, averaged over the whole
//! unlabeled batch. L = L_X + w_u L_U (not ramped), plus w_mi(t) L_mi between the weak and the
//! strong predictions (both with gradient) in `fixmatch-muscle`.

use super::{LossTerms, ObjectiveConfig, PseudoLabelStats, StepInput};
use crate::error::Result;
use crate::nn::Model;
use crate::ops::{self, Indices};
use crate::optim::ramp;

/// The FixMatch loss (with the MI term when `cfg.method` is FixMatchMuscle).
pub fn fixmatch_loss(cfg: &ObjectiveConfig, model: &mut Model, input: &StepInput) -> Result<LossTerms> {
    let StepInput { tape, batch, step, seed, .. } = *input;
    let [weak, strong] = input.two_views("fixmatch")?;
    let (nl, nu) = (batch.labels.len(), weak.shape()[0]);
    let x = ops::concat_rows(tape, &[&batch.labeled, weak, strong])?;
    let logits = model.forward(tape, &x, &cfg.forward_ctx(seed, step))?;
    let sup = ops::cross_entropy_labels(tape, &ops::narrow_rows(tape, &logits, 0, nl)?, &batch.labels)?;
    let zw = ops::narrow_rows(tape, &logits, nl, nu)?;
    let zs = ops::narrow_rows(tape, &logits, nl + nu, nu)?;
    // The true labels came with the batch's upload when the trainer put them there.
    let truth = match input.indices.first() {
        Some(t) if t.host == batch.unlabeled_labels => t.clone(),
        _ => Indices::from(batch.unlabeled_labels.clone()),
    };
    let pl = ops::cross_entropy_pseudo(tape, &zw.detach(), &zs, cfg.tau, &truth)?;
    let mut total = ops::add(tape, &sup, &ops::scale(tape, &pl.loss, cfg.w_u)?)?;
    let (mut mi_term, mut w) = (None, 0.0);
    if cfg.method == super::Method::FixMatchMuscle {
        let mi = ops::mutual_info_loss_across(tape, &zw, &zs, cfg.lambda, cfg.world)?;
        w = ramp(cfg.w_mi, step, cfg.ramp_steps);
        total = ops::add(tape, &total, &ops::scale(tape, &mi, w)?)?;
        mi_term = Some(mi);
    }
    Ok(LossTerms {
        sup: Some(sup),
        host: Some(pl.loss),
        w_u: cfg.w_u,
        mi: mi_term,
        w_mi: w,
        total,
        pseudo: Some(PseudoLabelStats { kept: pl.kept, right: pl.right }),
    })
}
