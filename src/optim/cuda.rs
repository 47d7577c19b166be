/// Moves `t` to `like`'s device if it is elsewhere.
fn follow(t: &mut Tensor, like: &Tensor) -> Result<()> {
    if t.device() != like.device() {
        *t = t.to_device(like.device())?;
    }
    Ok(())
}

use crate::cuda::launch::{flat_cfg, flat_checks, flat_launcher, launch};
use crate::cuda::{context, F32Buf, Gpu};
use crate::error::Result;
use crate::kernel_args::{AdamScalars, SgdScalars};
use crate::tensor::Tensor;

/// One Adam/AdamW step in place on the first `n` elements, with the host-computed scalars of
/// this step. CPU twin: `cpu::adam_step` (bit-identical arithmetic).
pub fn adam_step(
    gpu: &Gpu,
    param: &mut F32Buf,
    grad: &F32Buf,
    exp_avg: &mut F32Buf,
    exp_avg_sq: &mut F32Buf,
    n: usize,
    s: &AdamScalars,
) -> Result<()> {
    let k = "adam_step_fwd_f32";
    let bufs =
        [("param", param.len()), ("grad", grad.len()), ("exp_avg", exp_avg.len()), ("exp_avg_sq", exp_avg_sq.len())];
    let nl = flat_checks(k, n, &bufs)?;
    launch!(
        gpu,
        k,
        flat_cfg(n),
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        &nl,
        &s.param_scale,
        &s.grad_decay,
        &s.one_minus_beta1,
        &s.beta2,
        &s.one_minus_beta2,
        &s.step_size,
        &s.bias_correction2_sqrt,
        &s.eps
    )
}

/// One SGD step in place; `momentum_buf` is None when momentum is 0 (no state). CPU twin:
/// `cpu::sgd_step` (bit-identical arithmetic).
pub fn sgd_step(
    gpu: &Gpu,
    param: &mut F32Buf,
    grad: &F32Buf,
    momentum_buf: Option<&mut F32Buf>,
    n: usize,
    s: &SgdScalars,
) -> Result<()> {
    match momentum_buf {
        None => {
            let k = "sgd_step_fwd_f32";
            let nl = flat_checks(k, n, &[("param", param.len()), ("grad", grad.len())])?;
            launch!(gpu, k, flat_cfg(n), param, grad, &nl, &s.lr, &s.weight_decay)
        }
        Some(buf) => {
            let k = "sgd_momentum_step_fwd_f32";
            let nl =
                flat_checks(k, n, &[("param", param.len()), ("grad", grad.len()), ("momentum buffer", buf.len())])?;
            let nesterov = i32::from(s.nesterov);
            launch!(gpu, k, flat_cfg(n), param, grad, buf, &nl, &s.lr, &s.momentum, &s.weight_decay, &nesterov)
        }
    }
}

flat_launcher! {
    /// avg = decay avg + (1 - decay) value on the first `n` elements. CPU twin:
    /// `cpu::ema_update` (bit-identical arithmetic).
    ema_update => "ema_update_fwd_f32" (avg: &mut F32Buf, value: &F32Buf; decay: f32)
}

// ---------------------------------------------------------------------------------------------
// The updates of GPU tensors.

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
    adam_step(&gpu, p.cuda_slice_mut()?, g.cuda_slice()?, exp_avg.cuda_slice_mut()?, exp_avg_sq.cuda_slice_mut()?, n, s)
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
            sgd_step(&gpu, p.cuda_slice_mut()?, g.cuda_slice()?, Some(b.cuda_slice_mut()?), n, s)
        }
        None => sgd_step(&gpu, p.cuda_slice_mut()?, g.cuda_slice()?, None, n, s),
    }
}

/// avg = decay avg + (1 - decay) value on the GPU (`avg` is moved to value's device first).
pub(crate) fn ema(avg: &mut Tensor, value: &Tensor, decay: f32) -> Result<()> {
    follow(avg, value)?;
    let n = value.numel();
    let gpu = context::gpu_of(value.cuda_slice()?)?;
    ema_update(&gpu, avg.cuda_slice_mut()?, value.cuda_slice()?, n, decay)
}
