//! Stand-alone MUSCLE: L = L_sup + w_mi(t) * L_mi, with L_mi the IIC loss between the model's
//! predictions on two augmented views of each unlabeled image.

use super::{LossTerms, ObjectiveConfig, StepInput};
use crate::error::{Error, Result};
use crate::nn::Model;
use crate::ops;
use crate::optim::ramp;

/// One forward over [labeled, view 1, view 2] so batch-norm statistics cover every image, then
/// the supervised term on the labeled rows and the IIC term between the two views' rows.
pub fn muscle_loss(cfg: &ObjectiveConfig, model: &mut Model, input: &StepInput) -> Result<LossTerms> {
    let StepInput { tape, batch, step, seed, .. } = *input;
    let [v1, v2] = input.two_views("muscle")?;
    let nl = batch.labels.len();
    let nu = v1.shape()[0];
    let ctx = cfg.forward_ctx(seed, step);
    let (sup, za, zb) = match (&batch.labeled_view2, cfg.mi_labeled) {
        (Some(l2), true) => {
            // [labeled, labeled view 2, view 1, view 2]: the MI term pairs (labeled, view 1)
            // rows with (labeled view 2, view 2) rows.
            let x = ops::concat_rows(tape, &[&batch.labeled, l2, v1, v2])?;
            let logits = model.forward(tape, &x, &ctx)?;
            let l1 = ops::narrow_rows(tape, &logits, 0, nl)?;
            let sup = ops::cross_entropy_labels(tape, &l1, &batch.labels)?;
            let za = ops::concat_rows(tape, &[&l1, &ops::narrow_rows(tape, &logits, 2 * nl, nu)?])?;
            let zb = ops::narrow_rows(tape, &logits, nl, nl)?;
            let zb = ops::concat_rows(tape, &[&zb, &ops::narrow_rows(tape, &logits, 2 * nl + nu, nu)?])?;
            (sup, za, zb)
        }
        (None, true) => return Err(Error::usage("--mi-labeled: the batch has no second labeled view")),
        _ => {
            let x = ops::concat_rows(tape, &[&batch.labeled, v1, v2])?;
            let logits = model.forward(tape, &x, &ctx)?;
            let sup = ops::cross_entropy_labels(tape, &ops::narrow_rows(tape, &logits, 0, nl)?, &batch.labels)?;
            (sup, ops::narrow_rows(tape, &logits, nl, nu)?, ops::narrow_rows(tape, &logits, nl + nu, nu)?)
        }
    };
    let mi = ops::mutual_info_loss_across(tape, &za, &zb, cfg.lambda, cfg.world)?;
    let w = ramp(cfg.w_mi, step, cfg.ramp_steps);
    let total = ops::add(tape, &sup, &ops::scale(tape, &mi, w)?)?;
    Ok(LossTerms { sup: Some(sup), mi: Some(mi), w_mi: w, host: None, w_u: 0.0, total, pseudo: None })
}
