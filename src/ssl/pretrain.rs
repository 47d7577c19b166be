//! Unsupervised pre-training: the IIC loss alone between two views of unlabeled images (IIC's
//! clustering objective), optionally with more outputs than classes (over-clustering).

use super::{LossTerms, ObjectiveConfig, StepInput};
use crate::error::Result;
use crate::nn::Model;
use crate::ops;

/// L = L_mi(f(A(u)), f(A'(u))), one forward over both views.
pub fn pretrain_loss(cfg: &ObjectiveConfig, model: &mut Model, input: &StepInput) -> Result<LossTerms> {
    let StepInput { tape, step, seed, .. } = *input;
    let [v1, v2] = input.two_views("pre-training")?;
    let nu = v1.shape()[0];
    let x = ops::concat_rows(tape, &[v1, v2])?;
    let logits = model.forward(tape, &x, &cfg.forward_ctx(seed, step))?;
    let za = ops::narrow_rows(tape, &logits, 0, nu)?;
    let zb = ops::narrow_rows(tape, &logits, nu, nu)?;
    let total = ops::mutual_info_loss_across(tape, &za, &zb, cfg.lambda, cfg.world)?;
    Ok(LossTerms { sup: None, mi: Some(total.clone()), w_mi: 1.0, host: None, w_u: 0.0, total, pseudo: None })
}
