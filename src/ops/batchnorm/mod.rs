//! Batch normalisation of NCHW tensors over (N, H, W), optionally fused with the LeakyReLU that
//! follows it in every model here.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::kernel_args::BatchNormArgs;
use crate::tensor::{fmt_shape, Tensor};
use cpu as k;
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

/// Hands a CPU backward's gradients to the tape: dx (computed when x needs one), dgamma, dbeta.
fn add_grads(
    grads: &mut crate::autograd::Gradients,
    [x, gamma, beta]: [&Tensor; 3],
    dx: Option<Tensor>,
    dg: Vec<f32>,
    db: Vec<f32>,
) -> Result<()> {
    if let Some(dx) = dx {
        grads.add_to(x, dx)?;
    }
    grads.add_to(gamma, Tensor::cpu(dg, gamma.shape().to_vec()))?;
    grads.add_to(beta, Tensor::cpu(db, beta.shape().to_vec()))
}

/// A recorded training output, carrying the recipe that recomputes it from the input and
/// statistics its own backward keeps anyway: a convolution after it then holds no copy of it
/// between the passes (`autograd::Saved`).
fn recomputable(out: Tensor, x: &Tensor, args: BatchNormArgs, stats: Arc<k::BatchStats>) -> Tensor {
    if !out.requires_grad() {
        return out;
    }
    let affine = crate::tensor::AffineRecipe {
        x: x.clone(),
        scale: stats.scale.clone(),
        shift: stats.shift.clone(),
        slope: args.slope,
    };
    let x = x.clone();
    // `batchnorm_apply` is `normalize_plane`, the arithmetic `InputAffine` names.
    let recipe = move || {
        let mut y = crate::pool::take(x.numel());
        k::batchnorm_apply(&args, x.data()?, &stats, &mut y);
        Ok(Tensor::cpu(y, x.shape().to_vec()))
    };
    out.with_affine_recompute(recipe, affine)
}

/// A training batch's per-channel mean and biased variance ([c] each, on the input's device): what
/// the layer folds into its running estimates.
#[derive(Debug, Clone)]
pub struct BatchMoments {
    /// Batch mean.
    pub mean: Tensor,
    /// Biased batch variance (what normalised the batch).
    pub var: Tensor,
}

/// Training mode: normalise with the batch statistics, which are returned so that the layer can
/// update its running estimates; LeakyReLU(`slope`) fused when given: act(BN(x)).
pub fn batch_norm_train(
    tape: &Tape,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    slope: Option<f32>,
) -> Result<(Tensor, BatchMoments)> {
    let _p = crate::profile::scope("batch_norm.fwd");
    let (n, c, hw) = check(x, &[gamma, beta])?;
    let args = BatchNormArgs { n, c, hw, eps, slope };
    if n * hw < 2 {
        return Err(Error::shape(format!(
            "batch_norm: training needs more than one value per channel, got input {}",
            fmt_shape(x.shape())
        )));
    }
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("batch_norm", &[x, gamma, beta])? {
        let (y, mean, var) = cuda::batch_norm_train(gpu, tape, (x, gamma, beta), args, None)?;
        return Ok((y, BatchMoments { mean, var }));
    }
    let mut y = crate::pool::take(x.numel());
    let stats = k::batchnorm_train_fwd(&args, x.data()?, gamma.data()?, beta.data()?, &mut y);
    let out = Tensor::cpu(y, x.shape().to_vec());
    let saved = Arc::new(stats);
    let stats = saved.clone();
    let (xc, gc, bc) = (x.clone(), gamma.clone(), beta.clone());
    // The backward takes dy by value and writes dx over it.
    let out = tape.record_consuming(out, &[x, gamma, beta], move |mut g, grads| {
        let _p = crate::profile::scope("batch_norm.bwd");
        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
        let (x, gamma, beta) = (xc.data()?, gc.data()?, bc.data()?);
        let dx = if xc.requires_grad() {
            k::batchnorm_train_bwd_in_place(&args, x, g.data_mut()?, gamma, beta, &saved, &mut dg, &mut db);
            Some(g)
        } else {
            k::batchnorm_train_bwd(&args, x, g.data()?, gamma, beta, &saved, None, &mut dg, &mut db);
            None
        };
        add_grads(grads, [&xc, &gc, &bc], dx, dg, db)
    });
    let out = recomputable(out, x, args, stats.clone());
    let moments =
        BatchMoments { mean: Tensor::cpu(stats.mean.clone(), vec![c]), var: Tensor::cpu(stats.var.clone(), vec![c]) };
    Ok((out, moments))
}

/// [`batch_norm_train`] with the statistics of the whole batch of a data-parallel run
/// (`--sync-bn`): each channel's sums over this process's rows are summed over the processes (in
/// rank order, around rank 0's shift), in the forward and in the backward, so every process
/// normalises with the same statistics a single process would compute for the whole batch. A
/// world of one is [`batch_norm_train`]. On GPUs the same sums meet through
/// `cuda::collective` (NCCL), between the statistics kernels.
pub fn batch_norm_train_across(
    tape: &Tape,
    (x, gamma, beta): (&Tensor, &Tensor, &Tensor),
    eps: f32,
    slope: Option<f32>,
    world: &'static crate::dist::World,
) -> Result<(Tensor, BatchMoments)> {
    if world.size() == 1 {
        return batch_norm_train(tape, x, gamma, beta, eps, slope);
    }
    let _p = crate::profile::scope("batch_norm.fwd");
    let (n, c, hw) = check(x, &[gamma, beta])?;
    if n == 0 || hw == 0 {
        return Err(Error::shape(format!("batch_norm: an empty input {}", fmt_shape(x.shape()))));
    }
    let args = BatchNormArgs { n, c, hw, eps, slope };
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("batch_norm", &[x, gamma, beta])? {
        let (y, mean, var) = cuda::batch_norm_train(gpu, tape, (x, gamma, beta), args, Some(world))?;
        return Ok((y, BatchMoments { mean, var }));
    }
    // Every process shifts a channel's sums by rank 0's first value of it (the shift keeps the
    // one-pass variance accurate; the sums only add up if it is the same everywhere).
    let xd = x.data()?;
    let mut ks: Vec<f64> = (0..c).map(|ch| if world.is_root() { xd[ch * hw] as f64 } else { 0.0 }).collect();
    world.sum_f64(&mut ks)?;
    let ks: Vec<f32> = ks.iter().map(|&k| k as f32).collect();
    let rows = n * world.size();
    let reduce = |v: &mut [f64]| world.sum_f64(v);
    let mut y = crate::pool::take(x.numel());
    let stats = k::batchnorm_train_fwd_synced(&args, xd, gamma.data()?, beta.data()?, &mut y, (&ks, rows), &reduce)?;
    let out = Tensor::cpu(y, x.shape().to_vec());
    let saved = Arc::new(stats);
    let stats = saved.clone();
    let (xc, gc, bc) = (x.clone(), gamma.clone(), beta.clone());
    let out = tape.record(out, &[x, gamma, beta], move |g, grads| {
        let _p = crate::profile::scope("batch_norm.bwd");
        let mut dx = xc.requires_grad().then(|| crate::pool::take(xc.numel()));
        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
        let (x, g, gamma, beta) = (xc.data()?, g.data()?, gc.data()?, bc.data()?);
        let reduce = |v: &mut [f64]| world.sum_f64(v);
        k::batchnorm_train_bwd_synced(
            &args,
            x,
            g,
            gamma,
            beta,
            &saved,
            dx.as_deref_mut(),
            (&mut dg, &mut db),
            rows,
            &reduce,
        )?;
        let dx = dx.map(|d| Tensor::cpu(d, xc.shape().to_vec()));
        add_grads(grads, [&xc, &gc, &bc], dx, dg, db)
    });
    let out = recomputable(out, x, args, stats.clone());
    let moments =
        BatchMoments { mean: Tensor::cpu(stats.mean.clone(), vec![c]), var: Tensor::cpu(stats.var.clone(), vec![c]) };
    Ok((out, moments))
}

/// Evaluation mode: normalise with the running statistics (constants); LeakyReLU(`slope`) fused
/// when given.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval(
    tape: &Tape,
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f32,
    slope: Option<f32>,
) -> Result<Tensor> {
    let (n, c, hw) = check(x, &[gamma, beta, mean, var])?;
    let args = BatchNormArgs { n, c, hw, eps, slope };
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("batch_norm", &[x, gamma, beta, mean, var])? {
        return cuda::batch_norm_eval(gpu, tape, [x, gamma, beta, mean, var], args);
    }
    let mut y = crate::pool::take(x.numel());
    k::batchnorm_eval_fwd(&args, x.data()?, gamma.data()?, beta.data()?, mean.data()?, var.data()?, &mut y);
    let out = Tensor::cpu(y, x.shape().to_vec());
    let (xc, gc, bc, mc, vc) = (x.clone(), gamma.clone(), beta.clone(), mean.clone(), var.clone());
    Ok(tape.record(out, &[x, gamma, beta], move |g, grads| {
        let mut dx = xc.requires_grad().then(|| crate::pool::take(xc.numel()));
        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
        let (x, g, gamma, beta) = (xc.data()?, g.data()?, gc.data()?, bc.data()?);
        k::batchnorm_eval_bwd(&args, x, g, gamma, beta, mc.data()?, vc.data()?, dx.as_deref_mut(), &mut dg, &mut db);
        let dx = dx.map(|d| Tensor::cpu(d, xc.shape().to_vec()));
        add_grads(grads, [&xc, &gc, &bc], dx, dg, db)
    }))
}

/// running = (1 - momentum) running + momentum batch factor per channel, on the batch
/// statistic's device (`running` follows it there): a layer's running estimate after a training
/// batch (PyTorch's momentum; `factor` n / (n - 1) unbiases the variance, 1 for the mean).
pub fn running_update(running: &mut Tensor, batch: &Tensor, momentum: f32, factor: f32) -> Result<()> {
    running.same_shape(batch, "batch_norm running estimate")?;
    #[cfg(feature = "cuda")]
    if batch.device() != crate::device::Device::Cpu {
        return cuda::running_update(running, batch, momentum, factor);
    }
    k::batchnorm_running_fwd(running.data_mut()?, batch.data()?, momentum, factor);
    Ok(())
}
