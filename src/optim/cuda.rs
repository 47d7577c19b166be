//! In-place updates of tensors that live on a GPU: the optimizer steps, the EMA, and batch norm's
//! running estimates, each one fused kernel over the tensor (the CPU twins are in cpu::optim and
//! nn::layers). State that arrives on the host (a fresh moment buffer, a resumed optimizer) is
//! moved to the parameter's device on first use.

use crate::cpu::optim::{AdamScalars, SgdScalars};
use crate::cuda::{context, kernels as k};
use crate::error::Result;
use crate::tensor::Tensor;

/// Moves `t` to `like`'s device if it is elsewhere.
fn follow(t: &mut Tensor, like: &Tensor) -> Result<()> {
    if t.device() != like.device() {
        *t = t.to_device(like.device())?;
    }
    Ok(())
}

/// One AdamW step of `p` with gradient `g` and moments on the GPU.
pub(crate) fn adam(
    p: &mut Tensor,
    g: &Tensor,
    exp_avg: &mut Tensor,
    exp_avg_sq: &mut Tensor,
    s: &AdamScalars,
) -> Result<()> {
    let mut g = g.clone();
    for t in [&mut g, &mut *exp_avg, &mut *exp_avg_sq] {
        follow(t, p)?;
    }
    let n = p.numel();
    let gpu = context::gpu_of(p.cuda_slice()?)?;
    k::adam_step(
        &gpu,
        p.cuda_slice_mut()?,
        g.cuda_slice()?,
        exp_avg.cuda_slice_mut()?,
        exp_avg_sq.cuda_slice_mut()?,
        n,
        s,
    )
}

/// One SGD step (with a momentum buffer when given) on the GPU.
pub(crate) fn sgd(p: &mut Tensor, g: &Tensor, buf: Option<&mut Tensor>, s: &SgdScalars) -> Result<()> {
    let mut g = g.clone();
    follow(&mut g, p)?;
    let n = p.numel();
    let gpu = context::gpu_of(p.cuda_slice()?)?;
    match buf {
        Some(b) => {
            follow(b, p)?;
            k::sgd_step(&gpu, p.cuda_slice_mut()?, g.cuda_slice()?, Some(b.cuda_slice_mut()?), n, s)
        }
        None => k::sgd_step(&gpu, p.cuda_slice_mut()?, g.cuda_slice()?, None, n, s),
    }
}

/// avg = decay avg + (1 - decay) value on the GPU (`avg` is moved to value's device first).
pub(crate) fn ema(avg: &mut Tensor, value: &Tensor, decay: f32) -> Result<()> {
    follow(avg, value)?;
    let n = value.numel();
    let gpu = context::gpu_of(value.cuda_slice()?)?;
    k::ema_update(&gpu, avg.cuda_slice_mut()?, value.cuda_slice()?, n, decay)
}

/// Batch norm's running estimate on the GPU: running = (1 - momentum) running + momentum batch
/// factor, rounded as the CPU twin (`cpu::batchnorm::running_update`) rounds.
pub(crate) fn running_update(running: &mut Tensor, batch: &Tensor, momentum: f32, factor: f32) -> Result<()> {
    follow(running, batch)?;
    let n = batch.numel();
    let gpu = context::gpu_of(batch.cuda_slice()?)?;
    k::bn_running_update(&gpu, running.cuda_slice_mut()?, batch.cuda_slice()?, n, momentum, factor)
}
