//! Row softmax and log-softmax of an n x c matrix.

use super::rows_cols;
use crate::autograd::Tape;
use crate::cpu::softmax as k;
use crate::error::Result;
use crate::tensor::Tensor;

/// Softmax of each row.
pub fn softmax(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let (_, c) = rows_cols(x, "softmax input")?;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = super::cuda::on_gpu("softmax", &[x])? {
        return super::cuda::softmax(gpu, tape, x, c, false);
    }
    let mut y = crate::pool::take(x.numel());
    k::softmax_forward(x.data()?, c, &mut y);
    let out = Tensor::cpu(y, x.shape().to_vec());
    let (xc, yc) = (x.clone(), out.clone());
    Ok(tape.record(out, &[x], move |g, grads| {
        let mut dx = crate::pool::take(xc.numel());
        k::softmax_backward(yc.data()?, g.data()?, c, &mut dx);
        grads.add_to(&xc, Tensor::cpu(dx, xc.shape().to_vec()))
    }))
}

/// Log-softmax of each row.
pub fn log_softmax(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let (_, c) = rows_cols(x, "log_softmax input")?;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = super::cuda::on_gpu("log_softmax", &[x])? {
        return super::cuda::softmax(gpu, tape, x, c, true);
    }
    let mut y = crate::pool::take(x.numel());
    k::log_softmax_forward(x.data()?, c, &mut y);
    let out = Tensor::cpu(y, x.shape().to_vec());
    let (xc, yc) = (x.clone(), out.clone());
    Ok(tape.record(out, &[x], move |g, grads| {
        let mut dx = crate::pool::take(xc.numel());
        k::log_softmax_backward(yc.data()?, g.data()?, c, &mut dx);
        grads.add_to(&xc, Tensor::cpu(dx, xc.shape().to_vec()))
    }))
}
