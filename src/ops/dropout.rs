//! Inverted dropout with a counter-based mask, so a run is reproducible at any thread count.

use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;

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
    if let Some(gpu) = super::cuda::on_gpu("dropout", &[x])? {
        return super::cuda::dropout(gpu, tape, x, p, seed, stream);
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
