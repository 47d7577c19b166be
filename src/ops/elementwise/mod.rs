//! Elementwise ops: ReLU and LeakyReLU, sums and scalings (residual connections, weighted loss
//! terms), and inverted dropout with a counter-based mask (reproducible at any thread count).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;
use cpu as k;

/// max(x, 0).
pub fn relu(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    leaky_relu(tape, x, 0.0)
}

/// x > 0 ? x : slope * x.
pub fn leaky_relu(tape: &Tape, x: &Tensor, slope: f32) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("leaky_relu", &[x])? {
        return cuda::leaky_relu(gpu, tape, x, slope);
    }
    let _p = crate::profile::scope("leaky_relu.fwd");
    let mut y = crate::pool::take(x.numel());
    k::leaky_relu_fwd(x.data()?, slope, &mut y);
    let out = Tensor::cpu(y, x.shape().to_vec());
    let xs = x.clone();
    Ok(tape.record(out, &[x], move |g, grads| {
        let _p = crate::profile::scope("leaky_relu.bwd");
        let mut dx = crate::pool::take(xs.numel());
        k::leaky_relu_bwd(xs.data()?, g.data()?, slope, &mut dx);
        grads.add_to(&xs, Tensor::cpu(dx, xs.shape().to_vec()))
    }))
}

/// a + b (same shapes).
pub fn add(tape: &Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.same_shape(b, "add")?;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("add", &[a, b])? {
        return cuda::add(gpu, tape, a, b);
    }
    let mut y = crate::pool::take(a.numel());
    k::add_fwd(a.data()?, b.data()?, &mut y);
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
    if let Some(gpu) = crate::ops::gpu::on_gpu("scale", &[x])? {
        return cuda::scale(gpu, tape, x, s);
    }
    let mut y = crate::pool::take(x.numel());
    k::scale_fwd(x.data()?, s, &mut y);
    let out = Tensor::cpu(y, x.shape().to_vec());
    let xc = x.clone();
    Ok(tape.record(out, &[x], move |g, grads| {
        let mut dx = crate::pool::take(g.numel());
        k::scale_fwd(g.data()?, s, &mut dx);
        grads.add_to(&xc, Tensor::cpu(dx, xc.shape().to_vec()))
    }))
}

/// Zeroes each element with probability `p` and scales the rest by 1 / (1 - p); the mask is a pure
/// function of (`seed`, `stream`), e.g. stream = mix(layer, step).
pub fn dropout(tape: &Tape, x: &Tensor, p: f32, seed: u64, stream: u64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::usage(format!("dropout: probability {p} is not in [0, 1)")));
    }
    if p == 0.0 {
        return Ok(x.clone());
    }
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("dropout", &[x])? {
        return cuda::dropout(gpu, tape, x, p, seed, stream);
    }
    let keep = 1.0 / (1.0 - p);
    let mut rng = Rng::new(seed, stream);
    let mask: Vec<f32> = (0..x.numel()).map(|_| if rng.uniform() < p { 0.0 } else { keep }).collect();
    let y: Vec<f32> = x.data()?.iter().zip(&mask).map(|(a, m)| a * m).collect();
    let out = Tensor::cpu(y, x.shape().to_vec());
    let xc = x.clone();
    Ok(tape.record(out, &[x], move |g, grads| {
        let dx: Vec<f32> = g.data()?.iter().zip(&mask).map(|(a, m)| a * m).collect();
        grads.add_to(&xc, Tensor::cpu(dx, xc.shape().to_vec()))
    }))
}
