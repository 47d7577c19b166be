//! ReLU and LeakyReLU.

use crate::autograd::Tape;
use crate::cpu::activation as k;
use crate::error::Result;
use crate::tensor::Tensor;

/// max(x, 0).
pub fn relu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    leaky_relu(tape, x, 0.0)
}

/// x > 0 ? x : slope * x.
pub fn leaky_relu(tape: &Tape, x: &Tensor, slope: f32) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(gpu) = super::cuda::on_gpu("leaky_relu", &[x])? {
        return super::cuda::leaky_relu(gpu, tape, x, slope);
    }
    let _p = crate::profile::scope("leaky_relu.fwd");
    let mut y = crate::pool::take(x.numel());
    k::leaky_relu_forward(x.data()?, slope, &mut y);
    let out = Tensor::cpu(y, x.shape().to_vec());
    let xs = x.clone();
    Ok(tape.record(out, &[x], move |g, grads| {
        let _p = crate::profile::scope("leaky_relu.bwd");
        let mut dx = crate::pool::take(xs.numel());
        k::leaky_relu_backward(xs.data()?, g.data()?, slope, &mut dx);
        grads.add_to(&xs, Tensor::cpu(dx, xs.shape().to_vec()))
    }))
}
