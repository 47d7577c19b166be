//! Batch norm on the GPU: launchers of kernels/batchnorm.cu (sizes checked before each unsafe
//! launch; CPU twins in `cpu.rs` beside this file), the training and evaluation ops, and the
//! running-estimate update.

use crate::autograd::Tape;
use crate::cuda::launch::{cfg, elems, flat_cfg, grid_dim, int, launch, long, need, nonzero, BLOCK};
use crate::cuda::{collective, context, F32Buf, Gpu};
use crate::dist::World;
use crate::error::Result;
use crate::kernel_args::BatchNormArgs;
use crate::ops::gpu::{alloc, buf, here, wrap, GpuRef};
use crate::tensor::Tensor;

/// Per-channel statistics of a training forward, on the device (f32, c each).
pub struct BatchStatsGpu {
    /// Batch mean.
    pub mean: F32Buf,
    /// Biased batch variance.
    pub var: F32Buf,
    /// 1 / sqrt(var + eps).
    pub invstd: F32Buf,
    /// gamma * invstd (the folded affine map).
    pub scale: F32Buf,
    /// beta - mean * gamma * invstd.
    pub shift: F32Buf,
}

/// Blocks per channel of the BN reductions: from (n, hw) only (so results do not depend on the
/// GPU), about 4096 elements per block, at most 256.
pub fn bn_splits(n: usize, hw: usize) -> usize {
    (n * hw).div_ceil(4096).clamp(1, 256)
}

struct BnSizes {
    n: i32,
    c: i32,
    hw: i32,
    splits: i32,
    total: i64,
    grid: (u32, u32, u32),
}

fn bn_checks(
    kernel: &str,
    n: usize,
    c: usize,
    hw: usize,
    bufs: &[(&str, usize)],
    per_ch: &[(&str, usize)],
) -> Result<BnSizes> {
    nonzero(kernel, &[("batch", n), ("channels", c), ("plane size", hw)])?;
    let total = elems(kernel, elems(kernel, n, c)?, hw)?;
    for &(what, len) in bufs {
        need(kernel, what, len, total)?;
    }
    for &(what, len) in per_ch {
        need(kernel, what, len, c)?;
    }
    int(kernel, "batch x plane", elems(kernel, n, hw)?)?;
    let splits = bn_splits(n, hw);
    Ok(BnSizes {
        n: int(kernel, "batch", n)?,
        c: int(kernel, "channels", c)?,
        hw: int(kernel, "plane size", hw)?,
        splits: splits as i32,
        total: long(total),
        grid: (grid_dim(kernel, c)?, splits as u32, 1),
    })
}

/// Training forward of batch norm over (N, H, W) per channel (NCHW, `hw` = H W), with LeakyReLU
/// of `slope` fused when given; returns the batch statistics. CPU twin:
/// `cpu::batchnorm_train_fwd`. (The running-statistics update is the op's, not this
/// kernel's.)
pub fn batchnorm_train_fwd(
    gpu: &Gpu,
    args: &BatchNormArgs,
    x: &F32Buf,
    gamma: &F32Buf,
    beta: &F32Buf,
    y: &mut F32Buf,
) -> Result<BatchStatsGpu> {
    batchnorm_train_fwd_across(gpu, args, (x, gamma, beta), y, None)
}

/// [`batchnorm_train_fwd`] with the statistics of every process of `world` (`--sync-bn`): the
/// sums shifted by rank 0's first element of each channel and summed over the processes on the
/// device between the two statistics launches, over all their rows. CPU twin:
/// `cpu::batchnorm_train_fwd_synced`.
pub fn batchnorm_train_fwd_across(
    gpu: &Gpu,
    args: &BatchNormArgs,
    (x, gamma, beta): (&F32Buf, &F32Buf, &F32Buf),
    y: &mut F32Buf,
    world: Option<&'static World>,
) -> Result<BatchStatsGpu> {
    let BatchNormArgs { n, c, hw, eps, .. } = *args;
    let k = "batchnorm_train_fwd";
    let s = bn_checks(k, n, c, hw, &[("x", x.len()), ("y", y.len())], &[("gamma", gamma.len()), ("beta", beta.len())])?;
    let shift = match world {
        Some(w) => {
            let mut first = gpu.zeros::<f32>(c)?;
            if w.is_root() {
                let kf = "batchnorm_first_fwd_f32";
                launch!(
                    gpu,
                    kf,
                    cfg((grid_dim(kf, c.div_ceil(BLOCK as usize))?, 1, 1), BLOCK),
                    x,
                    &mut first,
                    &s.c,
                    &s.hw
                )?;
            }
            // Rank 0's values plus zeros: rank 0's shifts on every process.
            collective::sum_f32(gpu, w, &mut first, 1.0)?;
            Some(first)
        }
        None => None,
    };
    // Without a given shift the kernels read x's own first elements; x stands in for the buffer.
    let (shift_buf, given) = match &shift {
        Some(b) => (b, 1i32),
        None => (x, 0i32),
    };
    let rows = int(k, "rows of every process", n * world.map_or(1, |w| w.size()))?;
    let mut part = gpu.zeros::<f64>(c * s.splits as usize * 2)?;
    let ks = "batchnorm_stats_fwd_f32";
    launch!(gpu, ks, cfg(s.grid, BLOCK), x, shift_buf, &mut part, &s.n, &s.c, &s.hw, &s.splits, &given)?;
    if let Some(w) = world {
        collective::sum_f64(gpu, w, &mut part)?;
    }
    let mut st = BatchStatsGpu {
        mean: gpu.zeros(c)?,
        var: gpu.zeros(c)?,
        invstd: gpu.zeros(c)?,
        scale: gpu.zeros(c)?,
        shift: gpu.zeros(c)?,
    };
    launch!(
        gpu,
        "batchnorm_finish_fwd_f32",
        cfg((c.div_ceil(128) as u32, 1, 1), 128),
        x,
        shift_buf,
        &part,
        gamma,
        beta,
        &mut st.mean,
        &mut st.var,
        &mut st.invstd,
        &mut st.scale,
        &mut st.shift,
        &rows,
        &s.c,
        &s.hw,
        &s.splits,
        &eps,
        &given
    )?;
    batchnorm_apply(gpu, args, x, (&st.scale, &st.shift), y)?;
    Ok(st)
}

/// y = act(x scale + shift) per channel: the training forward's last launch, and what a
/// convolution's backward runs to recompute its batch-normalised input (the same kernel on the
/// same buffers: the same bits). CPU twin: `cpu::batchnorm_apply`.
pub fn batchnorm_apply(
    gpu: &Gpu,
    args: &BatchNormArgs,
    x: &F32Buf,
    (scale, shift): (&F32Buf, &F32Buf),
    y: &mut F32Buf,
) -> Result<()> {
    let BatchNormArgs { n, c, hw, slope, .. } = *args;
    let k = "batchnorm_norm_fwd_f32";
    let s =
        bn_checks(k, n, c, hw, &[("x", x.len()), ("y", y.len())], &[("scale", scale.len()), ("shift", shift.len())])?;
    let a = slope.unwrap_or(1.0);
    launch!(gpu, k, flat_cfg(s.total as usize), x, scale, shift, y, &s.total, &s.c, &s.hw, &a)
}

/// Evaluation forward with running statistics `mean`, `var` (then LeakyReLU when given).
/// CPU twin: `cpu::batchnorm_eval_fwd`.
pub fn batchnorm_eval_fwd(
    gpu: &Gpu,
    args: &BatchNormArgs,
    x: &F32Buf,
    gamma: &F32Buf,
    beta: &F32Buf,
    mean: &F32Buf,
    var: &F32Buf,
    y: &mut F32Buf,
) -> Result<()> {
    let BatchNormArgs { n, c, hw, eps, slope } = *args;
    let k = "batchnorm_eval_fwd_f32";
    let per_ch = [("gamma", gamma.len()), ("beta", beta.len()), ("mean", mean.len()), ("var", var.len())];
    let s = bn_checks(k, n, c, hw, &[("x", x.len()), ("y", y.len())], &per_ch)?;
    let a = slope.unwrap_or(1.0);
    let total = s.total as usize;
    launch!(gpu, k, flat_cfg(total), x, gamma, beta, mean, var, y, &s.total, &s.c, &s.hw, &eps, &a)
}

/// Training backward: `dx` (when given), `dgamma`, `dbeta` (overwritten), from the forward's
/// statistics (`mean`, `invstd` of `stats` are used). With `slope`, `dy` is the gradient of the
/// activation's output. CPU twin: `cpu::batchnorm_train_bwd`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_train_bwd(
    gpu: &Gpu,
    args: &BatchNormArgs,
    x: &F32Buf,
    dy: &F32Buf,
    gamma: &F32Buf,
    beta: &F32Buf,
    stats: &BatchStatsGpu,
    dx: Option<&mut F32Buf>,
    dgamma: &mut F32Buf,
    dbeta: &mut F32Buf,
) -> Result<()> {
    batchnorm_train_bwd_across(gpu, args, (x, dy, gamma, beta), stats, dx, (dgamma, dbeta), None)
}

/// [`batchnorm_train_bwd`] of a forward synchronised over `world` (`--sync-bn`): the sums of dz
/// and dz xhat are summed over the processes before dx; dgamma and dbeta stay this process's (the
/// trainer averages the processes' gradients). CPU twin: `cpu::batchnorm_train_bwd_synced`.
pub fn batchnorm_train_bwd_across(
    gpu: &Gpu,
    args: &BatchNormArgs,
    (x, dy, gamma, beta): (&F32Buf, &F32Buf, &F32Buf, &F32Buf),
    stats: &BatchStatsGpu,
    dx: Option<&mut F32Buf>,
    (dgamma, dbeta): (&mut F32Buf, &mut F32Buf),
    world: Option<&'static World>,
) -> Result<()> {
    let BatchNormArgs { n, c, hw, slope, .. } = *args;
    let k = "batchnorm_train_bwd";
    let per_ch = [
        ("gamma", gamma.len()),
        ("beta", beta.len()),
        ("mean", stats.mean.len()),
        ("invstd", stats.invstd.len()),
        ("dgamma", dgamma.len()),
        ("dbeta", dbeta.len()),
    ];
    let dx_len = dx.as_ref().map_or(usize::MAX, |d| d.len());
    let s = bn_checks(k, n, c, hw, &[("x", x.len()), ("dy", dy.len()), ("dx", dx_len)], &per_ch)?;
    let sums = SumInputs { x, dy, mean: &stats.mean, invstd: &stats.invstd, gamma, beta };
    let coef = channel_sums(gpu, &s, c, &sums, slope, (dgamma, dbeta), world)?;
    let a = slope.unwrap_or(1.0);
    if let Some(dx) = dx {
        let total = s.total as usize;
        launch!(
            gpu,
            "batchnorm_dx_bwd_f32",
            flat_cfg(total),
            x,
            dy,
            &stats.mean,
            &stats.invstd,
            gamma,
            beta,
            &coef,
            dx,
            &s.total,
            &s.c,
            &s.hw,
            &a
        )?;
    }
    Ok(())
}

/// What a backward's per-channel sums read: the forward's input, the output gradient, and the
/// statistics and affine parameters it was normalised with.
struct SumInputs<'a> {
    x: &'a F32Buf,
    dy: &'a F32Buf,
    mean: &'a F32Buf,
    invstd: &'a F32Buf,
    gamma: &'a F32Buf,
    beta: &'a F32Buf,
}

/// dgamma = sum dz xhat and dbeta = sum dz per channel (f64 partial sums in a fixed order, then
/// f32), and returns coef = (mean dz, mean dz xhat) per channel for the training-mode dx; over
/// every process of `world` for coef (dgamma and dbeta stay this process's sums).
fn channel_sums(
    gpu: &Gpu,
    s: &BnSizes,
    c: usize,
    i: &SumInputs<'_>,
    slope: Option<f32>,
    (dgamma, dbeta): (&mut F32Buf, &mut F32Buf),
    world: Option<&'static World>,
) -> Result<F32Buf> {
    let a = slope.unwrap_or(1.0);
    let mut part = gpu.zeros::<f64>(c * s.splits as usize * 2)?;
    let kr = "batchnorm_reduce_bwd_f32";
    let (sn, sc, shw, sp) = (&s.n, &s.c, &s.hw, &s.splits);
    launch!(gpu, kr, cfg(s.grid, BLOCK), i.x, i.dy, i.mean, i.invstd, i.gamma, i.beta, &mut part, sn, sc, shw, sp, &a)?;
    let mut coef = gpu.zeros::<f32>(2 * c)?;
    let kf = "batchnorm_finish_bwd_f32";
    let blocks = cfg((c.div_ceil(128) as u32, 1, 1), 128);
    launch!(gpu, kf, blocks, &part, dgamma, dbeta, &mut coef, sn, sc, shw, sp)?;
    if let Some(w) = world {
        // The means for dx over every process's rows; this launch's dgamma and dbeta (the whole
        // batch's) are not the ones the trainer averages, so they go to scratch buffers.
        collective::sum_f64(gpu, w, &mut part)?;
        let rows = int(kf, "rows of every process", s.n as usize * w.size())?;
        let (mut dg_all, mut db_all) = (gpu.zeros::<f32>(c)?, gpu.zeros::<f32>(c)?);
        launch!(gpu, kf, blocks, &part, &mut dg_all, &mut db_all, &mut coef, &rows, sc, shw, sp)?;
    }
    Ok(coef)
}

/// running = (1 - momentum) running + (momentum batch) factor on `n` channels, rounded as the
/// CPU rounds. CPU twin: `cpu::batchnorm_running_fwd`.
pub fn batchnorm_running_fwd(
    gpu: &Gpu,
    running: &mut F32Buf,
    batch: &F32Buf,
    n: usize,
    momentum: f32,
    factor: f32,
) -> Result<()> {
    let k = "batchnorm_running_fwd_f32";
    nonzero(k, &[("channels", n)])?;
    need(k, "running", running.len(), n)?;
    need(k, "batch", batch.len(), n)?;
    let ni = int(k, "channels", n)?;
    let keep = 1.0 - momentum;
    launch!(
        gpu,
        k,
        cfg((grid_dim(k, n.div_ceil(BLOCK as usize))?, 1, 1), BLOCK),
        running,
        batch,
        &ni,
        &keep,
        &momentum,
        &factor
    )
}

// ---------------------------------------------------------------------------------------------
// The ops on GPU tensors (shapes checked by the family's mod.rs), recorded on the tape.

/// Batch norm (training mode) with LeakyReLU fused when `slope` is given; also returns the batch
/// mean and biased variance as device tensors [c] for the running estimates.
pub(crate) fn batch_norm_train(
    gpu: GpuRef,
    tape: &Tape,
    (x, gamma, beta): (&Tensor, &Tensor, &Tensor),
    args: BatchNormArgs,
    world: Option<&'static World>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = args.c;
    let mut y = alloc(&gpu, x.shape())?;
    let stats = batchnorm_train_fwd_across(&gpu, &args, (buf(x)?, buf(gamma)?, buf(beta)?), &mut y, world)?;
    let mean = wrap(context::copy(&stats.mean)?, &[c])?;
    let var = wrap(context::copy(&stats.var)?, &[c])?;
    // The recipe's scale and shift (the statistics themselves move into the backward).
    let ordinal = gpu.info().ordinal;
    let affine = match tape.tracks(&[x, gamma, beta]) {
        true => Some((wrap(context::copy(&stats.scale)?, &[c])?, wrap(context::copy(&stats.shift)?, &[c])?)),
        false => None,
    };
    let (xc, gc, bc) = (x.clone(), gamma.clone(), beta.clone());
    let out = tape.record(wrap(y, x.shape())?, &[x, gamma, beta], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = if xc.requires_grad() { Some(alloc(&gpu, xc.shape())?) } else { None };
        let (mut dg, mut db) = (alloc(&gpu, &[c])?, alloc(&gpu, &[c])?);
        let inputs = (buf(&xc)?, buf(&g)?, buf(&gc)?, buf(&bc)?);
        batchnorm_train_bwd_across(&gpu, &args, inputs, &stats, dx.as_mut(), (&mut dg, &mut db), world)?;
        if let Some(dx) = dx {
            grads.add_to(&xc, wrap(dx, xc.shape())?)?;
        }
        grads.add_to(&gc, wrap(dg, &[c])?)?;
        grads.add_to(&bc, wrap(db, &[c])?)
    });
    // A recorded output carries the recipe that recomputes it (autograd::Saved), naming its
    // device by ordinal (the handle is thread-local).
    let out = if let Some((scale, shift)) = affine {
        let xr = x.clone();
        out.with_recompute(move || {
            let gpu = context::gpu(ordinal)?;
            let mut y = alloc(&gpu, xr.shape())?;
            batchnorm_apply(&gpu, &args, buf(&xr)?, (buf(&scale)?, buf(&shift)?), &mut y)?;
            wrap(y, xr.shape())
        })
    } else {
        out
    };
    Ok((out, mean, var))
}

/// Batch norm with running statistics (evaluation mode), LeakyReLU fused when `slope` is given.
/// Its backward (reached when a frozen BN is trained through) runs on the device: the training
/// backward's per-channel sums over the running statistics, and dx = dz gamma invstd.
pub(crate) fn batch_norm_eval(
    gpu: GpuRef,
    tape: &Tape,
    [x, gamma, beta, mean, var]: [&Tensor; 5],
    args: BatchNormArgs,
) -> Result<Tensor> {
    let c = args.c;
    let mut y = alloc(&gpu, x.shape())?;
    batchnorm_eval_fwd(&gpu, &args, buf(x)?, buf(gamma)?, buf(beta)?, buf(mean)?, buf(var)?, &mut y)?;
    let (xc, gc, bc, mc, vc) = (x.clone(), gamma.clone(), beta.clone(), mean.clone(), var.clone());
    Ok(tape.record(wrap(y, x.shape())?, &[x, gamma, beta], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = if xc.requires_grad() { Some(alloc(&gpu, xc.shape())?) } else { None };
        let (mut dg, mut db) = (alloc(&gpu, &[c])?, alloc(&gpu, &[c])?);
        let [x, g, gamma, beta, mean, var] = [&xc, &g, &gc, &bc, &mc, &vc].map(|t| buf(t));
        let bufs = EvalBwdBuffers { x: x?, dy: g?, gamma: gamma?, beta: beta?, mean: mean?, var: var? };
        batchnorm_eval_bwd(&gpu, &args, &bufs, dx.as_mut(), &mut dg, &mut db)?;
        if let Some(dx) = dx {
            grads.add_to(&xc, wrap(dx, xc.shape())?)?;
        }
        grads.add_to(&gc, wrap(dg, &[c])?)?;
        grads.add_to(&bc, wrap(db, &[c])?)
    }))
}

/// The inputs of the evaluation-mode backward.
pub struct EvalBwdBuffers<'a> {
    /// The forward's input.
    pub x: &'a F32Buf,
    /// The gradient of the output (of the activation, with a slope).
    pub dy: &'a F32Buf,
    /// Scale per channel.
    pub gamma: &'a F32Buf,
    /// Shift per channel.
    pub beta: &'a F32Buf,
    /// Running mean per channel.
    pub mean: &'a F32Buf,
    /// Running variance per channel.
    pub var: &'a F32Buf,
}

/// Evaluation-mode backward: `dx` (when given), `dgamma`, `dbeta` (overwritten). CPU twin:
/// `cpu::batchnorm_eval_bwd` (whose per-image f32 roundings of the channel sums differ from the
/// one f64 sum here: a relative 1e-6, not bits).
pub fn batchnorm_eval_bwd(
    gpu: &Gpu,
    args: &BatchNormArgs,
    b: &EvalBwdBuffers<'_>,
    dx: Option<&mut F32Buf>,
    dgamma: &mut F32Buf,
    dbeta: &mut F32Buf,
) -> Result<()> {
    let BatchNormArgs { n, c, hw, eps, slope } = *args;
    let k = "batchnorm_eval_bwd";
    let per_ch = [
        ("gamma", b.gamma.len()),
        ("beta", b.beta.len()),
        ("mean", b.mean.len()),
        ("var", b.var.len()),
        ("dgamma", dgamma.len()),
        ("dbeta", dbeta.len()),
    ];
    let dx_len = dx.as_ref().map_or(usize::MAX, |d| d.len());
    let s = bn_checks(k, n, c, hw, &[("x", b.x.len()), ("dy", b.dy.len()), ("dx", dx_len)], &per_ch)?;
    let mut invstd = gpu.zeros::<f32>(c)?;
    let kc = "batchnorm_invstd_bwd_f32";
    launch!(gpu, kc, cfg((grid_dim(kc, c.div_ceil(BLOCK as usize))?, 1, 1), BLOCK), b.var, &mut invstd, &s.c, &eps)?;
    let (x, dy, mean, gamma, beta) = (b.x, b.dy, b.mean, b.gamma, b.beta);
    let sums = SumInputs { x, dy, mean, invstd: &invstd, gamma, beta };
    channel_sums(gpu, &s, c, &sums, slope, (dgamma, dbeta), None)?;
    let a = slope.unwrap_or(1.0);
    if let Some(dx) = dx {
        let kd = "batchnorm_eval_dx_bwd_f32";
        let total = s.total as usize;
        launch!(gpu, kd, flat_cfg(total), x, dy, mean, &invstd, gamma, beta, dx, &s.total, &s.c, &s.hw, &a)?;
    }
    Ok(())
}

/// Batch norm's running estimate on the GPU: running = (1 - momentum) running + momentum batch
/// factor, rounded as the CPU twin (`cpu::batchnorm_running_fwd`) rounds.
pub(crate) fn running_update(running: &mut Tensor, batch: &Tensor, momentum: f32, factor: f32) -> Result<()> {
    if running.device() != batch.device() {
        *running = running.to_device(batch.device())?;
    }
    let n = batch.numel();
    let gpu = context::gpu_of(batch.cuda_slice()?)?;
    batchnorm_running_fwd(&gpu, running.cuda_slice_mut()?, batch.cuda_slice()?, n, momentum, factor)
}
