//! Row softmax and log-softmax of an n x c matrix, and the losses built on them: the fused
//! softmax + cross-entropy (hard and soft targets) and the mean squared error of probabilities
//! (MixMatch's L_U). A fused loss computes its gradient in the forward pass; the backward scales
//! it by the upstream gradient.

pub mod bench;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::rows_cols;
use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::tensor::{fmt_shape, Tensor};
use cpu as k;

/// Softmax of each row.
pub fn softmax(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    row_softmax(tape, x, false)
}

/// Log-softmax of each row.
pub fn log_softmax(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    row_softmax(tape, x, true)
}

/// Softmax (`log` false) or log-softmax (`log` true) of each row; both backwards read only the
/// output.
fn row_softmax(tape: &Tape, x: &Tensor, log: bool) -> Result<Tensor> {
    let what = if log { "log_softmax" } else { "softmax" };
    let (_, c) = rows_cols(x, &format!("{what} input"))?;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu(what, &[x])? {
        return cuda::softmax(gpu, tape, x, c, log);
    }
    type Fwd = fn(&[f32], usize, &mut [f32]);
    type Bwd = fn(&[f32], &[f32], usize, &mut [f32]);
    let (fwd, bwd): (Fwd, Bwd) =
        if log { (k::log_softmax_fwd, k::log_softmax_bwd) } else { (k::softmax_fwd, k::softmax_bwd) };
    let mut y = crate::pool::take(x.numel());
    fwd(x.data()?, c, &mut y);
    let out = Tensor::cpu(y, x.shape().to_vec());
    let (xc, yc) = (x.clone(), out.clone());
    Ok(tape.record(out, &[x], move |g, grads| {
        let mut dx = crate::pool::take(xc.numel());
        bwd(yc.data()?, g.data()?, c, &mut dx);
        grads.add_to(&xc, Tensor::cpu(dx, xc.shape().to_vec()))
    }))
}

/// Records a scalar loss whose gradient wrt `x` was computed in the forward pass (scaled by the
/// upstream gradient in the backward).
fn fused(tape: &Tape, x: &Tensor, loss: f32, grad: Vec<f32>) -> Tensor {
    let xc = x.clone();
    tape.record(Tensor::scalar(loss), &[x], move |g, grads| {
        let s = g.item()?;
        let dx: Vec<f32> = grad.iter().map(|v| v * s).collect();
        grads.add_to(&xc, Tensor::cpu(dx, xc.shape().to_vec()))
    })
}

/// Mean cross-entropy against `labels`, using their device copy when the logits are on its GPU.
pub fn cross_entropy_labels(tape: &Tape, logits: &Tensor, labels: &crate::ops::Indices) -> Result<Tensor> {
    match &labels.device {
        #[cfg(feature = "cuda")]
        Some(ids) if ids.device() == logits.device() => {
            let (_, c) = checked_labels(logits, &labels.host)?;
            let gpu = crate::ops::gpu::on_gpu("cross_entropy", &[logits, ids])?
                .ok_or_else(|| Error::device("cross_entropy: device labels for host logits"))?;
            let bits = labels.on_gpu(&gpu)?;
            cuda::cross_entropy_ids(gpu, tape, logits, &bits, c)
        }
        _ => cross_entropy(tape, logits, &labels.host),
    }
}

/// Checks `labels` against the logits (one per row, each below C); returns (n, C).
fn checked_labels(logits: &Tensor, labels: &[usize]) -> Result<(usize, usize)> {
    let (n, c) = rows_cols(logits, "cross_entropy logits")?;
    if labels.len() != n || n == 0 {
        return Err(Error::shape(format!(
            "cross_entropy: {} labels for logits {}",
            labels.len(),
            fmt_shape(logits.shape())
        )));
    }
    if let Some(&bad) = labels.iter().find(|&&y| y >= c) {
        return Err(Error::shape(format!("cross_entropy: label {bad} out of range for {c} classes")));
    }
    Ok((n, c))
}

/// Mean cross-entropy of `logits` [n, c] against class indices.
pub fn cross_entropy(tape: &Tape, logits: &Tensor, labels: &[usize]) -> Result<Tensor> {
    let (n, c) = checked_labels(logits, labels)?;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("cross_entropy", &[logits])? {
        return cuda::cross_entropy(gpu, tape, logits, labels, c);
    }
    let mut grad = crate::pool::take(n * c);
    let loss = k::cross_entropy_hard_fwd(logits.data()?, labels, c, &mut grad);
    Ok(fused(tape, logits, loss, grad))
}

/// Mean over rows of -sum_c q_c log softmax(logits)_c, for constant target rows `targets`.
pub fn cross_entropy_soft(tape: &Tape, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, c) = rows_cols(logits, "cross_entropy_soft logits")?;
    logits.same_shape(targets, "cross_entropy_soft logits vs targets")?;
    if n == 0 {
        return Err(Error::shape("cross_entropy_soft: no rows"));
    }
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("cross_entropy_soft", &[logits, targets])? {
        return cuda::cross_entropy_soft(gpu, tape, logits, targets, (n, c));
    }
    let mut grad = crate::pool::take(n * c);
    let loss = k::cross_entropy_soft_fwd(logits.data()?, targets.data()?, c, &mut grad);
    Ok(fused(tape, logits, loss, grad))
}

/// FixMatch's unlabeled term and its diagnostics ([`cross_entropy_pseudo`]).
pub struct PseudoLabelLoss {
    /// Mean over every unlabeled image of mask * CE(pseudo-label, strong logits), on the tape.
    pub loss: Tensor,
    /// Fraction of the images whose weak prediction reached the threshold (the mask rate).
    pub kept: Tensor,
    /// Fraction of the images kept with a pseudo-label equal to their true label.
    pub right: Tensor,
}

/// FixMatch's L_U: the cross-entropy of `strong` (n x c logits, with gradient) against the
/// argmax of softmax(`weak`) (read only: the pseudo-label is under stop-gradient), over the rows
/// whose largest weak probability is at least `tau`, averaged over all n rows. `truth` (the
/// images' true labels, for the diagnostics only) scores the kept pseudo-labels.
pub fn cross_entropy_pseudo(
    tape: &Tape,
    weak: &Tensor,
    strong: &Tensor,
    tau: f32,
    truth: &crate::ops::Indices,
) -> Result<PseudoLabelLoss> {
    let (n, c) = rows_cols(strong, "cross_entropy_pseudo strong logits")?;
    weak.same_shape(strong, "cross_entropy_pseudo weak vs strong logits")?;
    if n == 0 || truth.len() != n {
        return Err(Error::shape(format!(
            "cross_entropy_pseudo: {} true labels for logits {}",
            truth.len(),
            fmt_shape(strong.shape())
        )));
    }
    if !(tau > 0.0 && tau <= 1.0) {
        return Err(Error::usage(format!("--tau {tau}: must be in (0, 1]")));
    }
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("cross_entropy_pseudo", &[weak, strong])? {
        let ids = truth.on_gpu(&gpu)?;
        let [loss, kept, right] = cuda::cross_entropy_pseudo(gpu, tape, (weak, strong), &ids, (n, c), tau)?;
        return Ok(PseudoLabelLoss { loss, kept, right });
    }
    let mut grad = crate::pool::take(n * c);
    let (loss, kept, right) = k::cross_entropy_pseudo_fwd(weak.data()?, strong.data()?, truth, c, tau, &mut grad);
    Ok(PseudoLabelLoss {
        loss: fused(tape, strong, loss, grad),
        kept: Tensor::scalar(kept),
        right: Tensor::scalar(right),
    })
}

/// Mean over every element of (p - q)^2, for a constant target `q` (MixMatch's L_U).
pub fn mse(tape: &Tape, p: &Tensor, q: &Tensor) -> Result<Tensor> {
    p.same_shape(q, "mse")?;
    let n = p.numel();
    if n == 0 {
        return Err(Error::shape("mse: empty tensors"));
    }
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("mse", &[p, q])? {
        return cuda::mse(gpu, tape, p, q);
    }
    let (pd, qd) = (p.data()?, q.data()?);
    let loss = pd.iter().zip(qd).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / n as f64;
    let grad: Vec<f32> = pd.iter().zip(qd).map(|(a, b)| 2.0 * (a - b) / n as f32).collect();
    Ok(fused(tape, p, loss as f32, grad))
}
