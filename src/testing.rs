//! Test support shared by unit and integration tests: seeded random tensors and a central
//! finite-difference gradient check.

use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// A tensor of standard normal draws, reproducible from `seed`.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed, 0x7e57);
    let n = shape.iter().product();
    Tensor::cpu((0..n).map(|_| r.normal()).collect(), shape.to_vec())
}

/// A tensor of uniform draws in [lo, hi), reproducible from `seed`.
pub fn rand_uniform(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
    let mut r = Rng::new(seed, 0x7e58);
    let n = shape.iter().product();
    Tensor::cpu((0..n).map(|_| r.range(lo, hi)).collect(), shape.to_vec())
}

/// Result of a gradient check for one input.
#[derive(Debug)]
pub struct GradCheck {
    /// Which input.
    pub input: usize,
    /// ||analytic - numeric|| / ||numeric|| over the probed elements.
    pub rel_error: f64,
    /// ||numeric|| over the probed elements.
    pub norm: f64,
}

/// Compares the tape's gradients of <f(inputs), r> (r a fixed random projection, so outputs of any
/// shape work) with central differences of step `eps`, on up to `probes` elements per input.
/// Fails when the relative error of any input exceeds `tol`.
pub fn check_gradients(
    f: &dyn Fn(&Tape, &[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    eps: f32,
    tol: f64,
    probes: usize,
) -> Result<Vec<GradCheck>> {
    let params: Vec<Tensor> = inputs.iter().map(|t| t.clone().into_param()).collect();
    let tape = Tape::new();
    let y = f(&tape, &params)?;
    let proj = randn(y.shape(), 991);
    let grads = tape.backward_with(&y, proj.clone())?;
    let objective = |xs: &[Tensor]| -> Result<f64> {
        let y = f(&Tape::no_grad(), xs)?;
        Ok(y.data()?.iter().zip(proj.data()?).map(|(a, b)| *a as f64 * *b as f64).sum())
    };
    let mut report = Vec::new();
    for (i, p) in params.iter().enumerate() {
        let analytic = match grads.get(p) {
            Some(g) => g.to_vec()?,
            None => vec![0.0; p.numel()],
        };
        let mut pick = Rng::new(i as u64, 77);
        let idx: Vec<usize> = if p.numel() <= probes {
            (0..p.numel()).collect()
        } else {
            (0..probes).map(|_| pick.below(p.numel() as u32) as usize).collect()
        };
        let (mut diff2, mut norm2) = (0.0f64, 0.0f64);
        for &j in &idx {
            let mut xs: Vec<Tensor> = params.iter().map(|t| t.detach()).collect();
            let base = xs[i].data()?[j];
            xs[i].data_mut()?[j] = base + eps;
            let up = objective(&xs)?;
            xs[i].data_mut()?[j] = base - eps;
            let down = objective(&xs)?;
            let numeric = (up - down) / (2.0 * eps as f64);
            diff2 += (analytic[j] as f64 - numeric).powi(2);
            norm2 += numeric.powi(2);
        }
        let norm = norm2.sqrt();
        let rel_error = diff2.sqrt() / norm.max(1e-6);
        if rel_error.is_nan() || rel_error > tol {
            return Err(Error::shape(format!(
                "gradient check failed for input {i} {:?}: relative error {rel_error:.3e} > {tol:.1e} \
                 (numeric norm {norm:.3e})",
                p.shape()
            )));
        }
        report.push(GradCheck { input: i, rel_error, norm });
    }
    Ok(report)
}
