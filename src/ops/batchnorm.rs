//! Batch normalisation of NCHW tensors over (N, H, W).

use crate::autograd::Tape;
use crate::cpu::batchnorm::{self as k, BatchStats};
use crate::error::{Error, Result};
use crate::tensor::{fmt_shape, Tensor};
use std::sync::Arc;

fn check(x: &Tensor, params: &[&Tensor]) -> Result<(usize, usize, usize)> {
    let [n, c, h, w] = x.dims::<4>("batch_norm input")?;
    for p in params {
        if p.shape() != [c] {
            return Err(Error::shape(format!(
                "batch_norm: per-channel tensor {} does not fit input {}",
                fmt_shape(p.shape()),
                fmt_shape(x.shape())
            )));
        }
    }
    Ok((n, c, h * w))
}

/// Training mode: normalise with batch statistics, which are returned so that the layer can
/// update its running estimates.
pub fn batch_norm_train(
    tape: &Tape,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
) -> Result<(Tensor, BatchStats)> {
    let (n, c, hw) = check(x, &[gamma, beta])?;
    let _p = crate::profile::scope("batch_norm.fwd");
    if n * hw < 2 {
        return Err(Error::shape(format!(
            "batch_norm: training needs more than one value per channel, got input {}",
            fmt_shape(x.shape())
        )));
    }
    let mut y = vec![0.0; x.numel()];
    let stats = k::forward_train(x.data()?, n, c, hw, gamma.data()?, beta.data()?, eps, &mut y);
    let out = Tensor::cpu(y, x.shape().to_vec());
    let saved = Arc::new(stats.clone());
    let (xc, gc, bc) = (x.clone(), gamma.clone(), beta.clone());
    let out = tape.record(out, &[x, gamma, beta], move |g, grads| {
        let _p = crate::profile::scope("batch_norm.bwd");
        let mut dx = xc.requires_grad().then(|| vec![0.0; xc.numel()]);
        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
        k::backward_train(xc.data()?, g.data()?, n, c, hw, gc.data()?, &saved, dx.as_deref_mut(), &mut dg, &mut db);
        if let Some(dx) = dx {
            grads.add_to(&xc, Tensor::cpu(dx, xc.shape().to_vec()))?;
        }
        grads.add_to(&gc, Tensor::cpu(dg, vec![c]))?;
        grads.add_to(&bc, Tensor::cpu(db, vec![c]))
    });
    Ok((out, stats))
}

/// Evaluation mode: normalise with the running statistics (constants).
pub fn batch_norm_eval(
    tape: &Tape,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let (n, c, hw) = check(x, &[gamma, beta, mean, var])?;
    let mut y = vec![0.0; x.numel()];
    k::forward_eval(x.data()?, n, c, hw, gamma.data()?, beta.data()?, mean.data()?, var.data()?, eps, &mut y);
    let out = Tensor::cpu(y, x.shape().to_vec());
    let (xc, gc, bc, mc, vc) = (x.clone(), gamma.clone(), beta.clone(), mean.clone(), var.clone());
    Ok(tape.record(out, &[x, gamma, beta], move |g, grads| {
        let mut dx = xc.requires_grad().then(|| vec![0.0; xc.numel()]);
        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
        k::backward_eval(
            xc.data()?,
            g.data()?,
            n,
            c,
            hw,
            gc.data()?,
            mc.data()?,
            vc.data()?,
            eps,
            dx.as_deref_mut(),
            &mut dg,
            &mut db,
        );
        if let Some(dx) = dx {
            grads.add_to(&xc, Tensor::cpu(dx, xc.shape().to_vec()))?;
        }
        grads.add_to(&gc, Tensor::cpu(dg, vec![c]))?;
        grads.add_to(&bc, Tensor::cpu(db, vec![c]))
    }))
}
