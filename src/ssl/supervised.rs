//! The supervised baseline: mean cross-entropy on the augmented labeled batch.

use super::{LossTerms, ObjectiveConfig, StepInput};
use crate::error::Result;
use crate::nn::Model;
use crate::ops;

/// L = CE(f(A(x)), y).
pub fn supervised_loss(cfg: &ObjectiveConfig, model: &mut Model, input: &StepInput) -> Result<LossTerms> {
    let StepInput { tape, batch, step, seed, .. } = *input;
    let logits = model.forward(tape, &batch.labeled, &cfg.forward_ctx(seed, step))?;
    let total = ops::cross_entropy_labels(tape, &logits, &batch.labels)?;
    Ok(LossTerms { sup: Some(total.clone()), total, mi: None, w_mi: 0.0, host: None, w_u: 0.0, pseudo: None })
}
