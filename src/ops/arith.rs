//! Sums and scalings (residual connections, weighted loss terms).

use crate::autograd::Tape;
use crate::cpu::activation as k;
use crate::error::Result;
use crate::tensor::Tensor;

/// a + b (same shapes).
pub fn add(tape: &Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.same_shape(b, "add")?;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = super::cuda::on_gpu("add", &[a, b])? {
        return super::cuda::add(gpu, tape, a, b);
    }
    let mut y = crate::pool::take(a.numel());
    k::add(a.data()?, b.data()?, &mut y);
    let out = Tensor::cpu(y, a.shape().to_vec());
    let (ac, bc) = (a.clone(), b.clone());
    Ok(tape.record(out, &[a, b], move |g, grads| {
        grads.add_to(&ac, g.detach())?;
        grads.add_to(&bc, g.detach())
    }))
}

/// s * x.
pub fn scale(tape: &Tape, x: &Tensor, s: f32) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(gpu) = super::cuda::on_gpu("scale", &[x])? {
        return super::cuda::scale(gpu, tape, x, s);
    }
    let mut y = crate::pool::take(x.numel());
    k::scale(x.data()?, s, &mut y);
    let out = Tensor::cpu(y, x.shape().to_vec());
    let xc = x.clone();
    Ok(tape.record(out, &[x], move |g, grads| {
        let mut dx = crate::pool::take(g.numel());
        k::scale(g.data()?, s, &mut dx);
        grads.add_to(&xc, Tensor::cpu(dx, xc.shape().to_vec()))
    }))
}
