//! The supervised baseline: mean cross-entropy on the augmented labeled batch.

use super::{LossTerms, StepInput};
use crate::error::Result;
use crate::nn::{ForwardCtx, Model};
use crate::ops;

/// L = CE(f(A(x)), y).
pub fn supervised_loss(model: &mut Model, input: &StepInput) -> Result<LossTerms> {
    let StepInput { tape, batch, step, seed } = *input;
    let logits = model.forward(tape, &batch.labeled, &ForwardCtx::train(seed, step))?;
    let total = ops::cross_entropy(tape, &logits, &batch.labels)?;
    let sup = total.item()?;
    Ok(LossTerms { total, sup, mi: 0.0, w_mi: 0.0, host: 0.0, w_u: 0.0 })
}
