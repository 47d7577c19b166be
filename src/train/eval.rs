//! Evaluation: accuracy, per-class accuracy and the confusion matrix of a model on a data set.

use crate::autograd::Tape;
use crate::data::{eval_batches, Augment, Dataset};
use crate::error::Result;
use crate::nn::{ForwardCtx, Model};
use serde::Serialize;

/// What an evaluation measured.
#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    /// Fraction of images classified correctly.
    pub accuracy: f64,
    /// Accuracy per true class (NaN-free: a class without images gets 0).
    pub per_class_accuracy: Vec<f64>,
    /// confusion_matrix[true][predicted] counts.
    pub confusion_matrix: Vec<Vec<u64>>,
    /// Images evaluated.
    pub images: usize,
}

/// Index of the largest logit of each row.
pub fn argmax_rows(logits: &[f32], classes: usize) -> Vec<usize> {
    logits
        .chunks(classes)
        .map(|r| r.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0)
        .collect()
}

/// Evaluates `model` (evaluation mode: running BN statistics) on `idx` of `ds` (all if None).
pub fn evaluate(
    model: &mut Model,
    ds: &Dataset,
    idx: Option<&[usize]>,
    aug: &Augment,
    batch: usize,
) -> Result<EvalResult> {
    let c = model.spec().classes.max(ds.classes);
    let mut confusion = vec![vec![0u64; c]; c];
    let tape = Tape::no_grad();
    for b in eval_batches(ds, idx, aug, batch) {
        let (x, labels) = b?;
        let logits = model.forward(&tape, &x, &ForwardCtx::eval())?;
        for (p, y) in argmax_rows(&logits.to_vec()?, model.spec().classes).into_iter().zip(labels) {
            confusion[y][p] += 1;
        }
    }
    let images: u64 = confusion.iter().flatten().sum();
    let correct: u64 = (0..c).map(|i| confusion[i][i]).sum();
    let per_class = confusion
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let n: u64 = row.iter().sum();
            if n == 0 {
                0.0
            } else {
                row[i] as f64 / n as f64
            }
        })
        .collect();
    Ok(EvalResult {
        accuracy: if images == 0 { 0.0 } else { correct as f64 / images as f64 },
        per_class_accuracy: per_class,
        confusion_matrix: confusion,
        images: images as usize,
    })
}
