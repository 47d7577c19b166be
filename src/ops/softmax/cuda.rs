//! The softmax family on the GPU: launchers of kernels/softmax.cu (sizes checked before each
//! unsafe launch; CPU twins in `cpu.rs` beside this file) and the ops on GPU tensors.

use crate::autograd::Tape;
use crate::cuda::launch::{
    cfg, flat_cfg, flat_checks, flat_launcher, int, launch, need, row_checks, rows_cfg, rows_launcher,
};
use crate::cuda::{CudaSlice, F32Buf, Gpu};
use crate::error::{Error, Result};
use crate::ops::gpu::{alloc, buf, here, wrap, GpuRef};
use crate::tensor::Tensor;

rows_launcher! {
    /// Row softmax of `x` (n x c) into `y`. CPU twin: `cpu::softmax_fwd`.
    softmax_fwd => "softmax_fwd_f32" (x: &F32Buf, y: &mut F32Buf)
}

rows_launcher! {
    /// dx = y * (dy - <y, dy>) per row. CPU twin: `cpu::softmax_bwd`.
    softmax_bwd => "softmax_bwd_f32" (y: &F32Buf, dy: &F32Buf, dx: &mut F32Buf)
}

rows_launcher! {
    /// Row log-softmax. CPU twin: `cpu::log_softmax_fwd`.
    log_softmax_fwd => "log_softmax_fwd_f32" (x: &F32Buf, y: &mut F32Buf)
}

rows_launcher! {
    /// dx = dy - exp(y) * sum(dy) per row, y the log-softmax output. CPU twin:
    /// `cpu::log_softmax_bwd`.
    log_softmax_bwd => "log_softmax_bwd_f32" (y: &F32Buf, dy: &F32Buf, dx: &mut F32Buf)
}

/// Deterministic f64 mean of `v[..n]` into a new one-element buffer.
fn reduce_mean(gpu: &Gpu, v: &F32Buf, n: usize) -> Result<F32Buf> {
    let k = "reduce_mean_fwd_f32";
    need(k, "v", v.len(), n)?;
    let ni = int(k, "n", n)?;
    let mut out = gpu.zeros::<f32>(1)?;
    launch!(gpu, k, cfg((1, 1, 1), 1024), v, &mut out, &ni)?;
    Ok(out)
}

/// Mean cross-entropy of logits `x` (n x c) against class indices `labels` (n, as i32), and in
/// the same pass `grad` = d(mean loss)/d logits (the backward is a scale by the upstream
/// gradient: [`scale_fwd`]). Returns the mean loss as a one-element device buffer; a label
/// outside [0, c) makes it NaN. CPU twin: `cpu::cross_entropy_hard`.
pub fn cross_entropy_hard_fwd(
    gpu: &Gpu,
    x: &F32Buf,
    labels: &CudaSlice<i32>,
    grad: &mut F32Buf,
    n: usize,
    c: usize,
) -> Result<F32Buf> {
    let k = "cross_entropy_hard_fwd_f32";
    let (ni, ci) = row_checks(k, n, c, &[("x", x.len()), ("grad", grad.len())])?;
    need(k, "labels", labels.len(), n)?;
    let mut rows = gpu.zeros::<f32>(n)?;
    launch!(gpu, k, rows_cfg(k, n)?, x, labels, &mut rows, grad, &ni, &ci)?;
    reduce_mean(gpu, &rows, n)
}

/// Mean over rows of -sum_c q_c log softmax(x)_c for target rows `q` (n x c), and `grad` as in
/// [`cross_entropy_hard_fwd`]. CPU twin: `cpu::cross_entropy_soft`.
pub fn cross_entropy_soft_fwd(
    gpu: &Gpu,
    x: &F32Buf,
    q: &F32Buf,
    grad: &mut F32Buf,
    n: usize,
    c: usize,
) -> Result<F32Buf> {
    let k = "cross_entropy_soft_fwd_f32";
    let (ni, ci) = row_checks(k, n, c, &[("x", x.len()), ("q", q.len()), ("grad", grad.len())])?;
    let mut rows = gpu.zeros::<f32>(n)?;
    launch!(gpu, k, rows_cfg(k, n)?, x, q, &mut rows, grad, &ni, &ci)?;
    reduce_mean(gpu, &rows, n)
}

/// FixMatch's pseudo-labelled cross-entropy of the strong logits `s` (n x c) against the confident
/// argmax of the weak logits `w`, with `grad` = d(mean loss)/d s; returns one-element buffers
/// (mean loss, fraction kept, fraction kept and right against `truth`). CPU twin:
/// `cpu::cross_entropy_pseudo_fwd`.
#[allow(clippy::too_many_arguments)] // the kernel's buffers, each checked here
pub fn cross_entropy_pseudo_fwd(
    gpu: &Gpu,
    w: &F32Buf,
    s: &F32Buf,
    truth: &CudaSlice<i32>,
    grad: &mut F32Buf,
    n: usize,
    c: usize,
    tau: f32,
) -> Result<[F32Buf; 3]> {
    let k = "cross_entropy_pseudo_fwd_f32";
    let (ni, ci) = row_checks(k, n, c, &[("w", w.len()), ("s", s.len()), ("grad", grad.len())])?;
    need(k, "truth", truth.len(), n)?;
    let (mut rows, mut mask, mut hit) = (gpu.zeros::<f32>(n)?, gpu.zeros::<f32>(n)?, gpu.zeros::<f32>(n)?);
    launch!(gpu, k, rows_cfg(k, n)?, w, s, truth, &mut rows, &mut mask, &mut hit, grad, &ni, &ci, &tau)?;
    Ok([reduce_mean(gpu, &rows, n)?, reduce_mean(gpu, &mask, n)?, reduce_mean(gpu, &hit, n)?])
}

/// dx = s[0] grad, the factor read on the device: a fused loss's backward. CPU twin: the
/// host closure of `fused` in mod.rs.
pub fn loss_grad_bwd(gpu: &Gpu, grad: &F32Buf, dx: &mut F32Buf, n: usize, s: &F32Buf) -> Result<()> {
    let k = "loss_grad_bwd_f32";
    let nl = flat_checks(k, n, &[("grad", grad.len()), ("dx", dx.len())])?;
    need(k, "s", s.len(), 1)?;
    launch!(gpu, k, flat_cfg(n), grad, dx, &nl, s)
}

// ---------------------------------------------------------------------------------------------
// The ops on GPU tensors (shapes checked by the family's mod.rs), recorded on the tape.

/// A scalar loss on the GPU whose gradient wrt `x` the forward already wrote to `grad`; the
/// backward scales it by the upstream gradient read on the device.
fn fused(gpu: GpuRef, tape: &Tape, x: &Tensor, loss: F32Buf, grad: F32Buf) -> Result<Tensor> {
    let xc = x.clone();
    Ok(tape.record(wrap(loss, &[])?, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let n = xc.numel();
        let mut dx = alloc(&gpu, xc.shape())?;
        loss_grad_bwd(&gpu, &grad, &mut dx, n, buf(&g)?)?;
        grads.add_to(&xc, wrap(dx, xc.shape())?)
    }))
}

/// Mean cross-entropy against class indices (checked by the caller), fused with its gradient.
pub(crate) fn cross_entropy(gpu: GpuRef, tape: &Tape, logits: &Tensor, labels: &[usize], c: usize) -> Result<Tensor> {
    let ids: Vec<i32> = labels
        .iter()
        .map(|&y| i32::try_from(y).map_err(|_| Error::shape(format!("cross_entropy: label {y} beyond 32 bits"))))
        .collect::<Result<_>>()?;
    let ids = gpu.upload(&ids)?;
    cross_entropy_ids(gpu, tape, logits, &ids, c)
}

/// Mean cross-entropy against class indices already on the device (range-checked by the caller).
pub(crate) fn cross_entropy_ids(
    gpu: GpuRef,
    tape: &Tape,
    logits: &Tensor,
    ids: &CudaSlice<i32>,
    c: usize,
) -> Result<Tensor> {
    let n = logits.numel() / c;
    let mut grad = alloc(&gpu, logits.shape())?;
    let loss = cross_entropy_hard_fwd(&gpu, buf(logits)?, ids, &mut grad, n, c)?;
    fused(gpu, tape, logits, loss, grad)
}

/// FixMatch's pseudo-labelled cross-entropy, fused with its gradient wrt the strong logits;
/// the weak logits are only read. Returns the loss and the two fractions (kept, kept and right).
pub(crate) fn cross_entropy_pseudo(
    gpu: GpuRef,
    tape: &Tape,
    (weak, strong): (&Tensor, &Tensor),
    truth: &CudaSlice<i32>,
    (n, c): (usize, usize),
    tau: f32,
) -> Result<[Tensor; 3]> {
    let mut grad = alloc(&gpu, strong.shape())?;
    let [loss, kept, right] = cross_entropy_pseudo_fwd(&gpu, buf(weak)?, buf(strong)?, truth, &mut grad, n, c, tau)?;
    Ok([fused(gpu, tape, strong, loss, grad)?, wrap(kept, &[])?, wrap(right, &[])?])
}

/// Mean soft-target cross-entropy, fused with its gradient.
pub(crate) fn cross_entropy_soft(
    gpu: GpuRef,
    tape: &Tape,
    logits: &Tensor,
    targets: &Tensor,
    (n, c): (usize, usize),
) -> Result<Tensor> {
    let mut grad = alloc(&gpu, logits.shape())?;
    let loss = cross_entropy_soft_fwd(&gpu, buf(logits)?, buf(targets)?, &mut grad, n, c)?;
    fused(gpu, tape, logits, loss, grad)
}

/// Mean squared error against a constant target. MixMatch's L_U is its only user and its targets
/// are mixed on the host anyway (ssl::mixmatch), so it is computed there, in the CPU's f64 order.
pub(crate) fn mse(gpu: GpuRef, tape: &Tape, p: &Tensor, q: &Tensor) -> Result<Tensor> {
    let n = p.numel();
    let (mut grad, mut sq) = (alloc(&gpu, p.shape())?, alloc(&gpu, p.shape())?);
    mse_fwd(&gpu, buf(p)?, buf(q)?, &mut grad, &mut sq, n)?;
    let loss = reduce_mean(&gpu, &sq, n)?;
    fused(gpu, tape, p, loss, grad)
}

/// Row softmax (`log` false) or log-softmax (`log` true).
pub(crate) fn softmax(gpu: GpuRef, tape: &Tape, x: &Tensor, c: usize, log: bool) -> Result<Tensor> {
    let n = x.numel() / c;
    let mut y = alloc(&gpu, x.shape())?;
    if log {
        log_softmax_fwd(&gpu, buf(x)?, &mut y, n, c)?;
    } else {
        softmax_fwd(&gpu, buf(x)?, &mut y, n, c)?;
    }
    let out = wrap(y, x.shape())?;
    let (xc, yc) = (x.clone(), out.clone());
    Ok(tape.record(out, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = alloc(&gpu, xc.shape())?;
        if log {
            log_softmax_bwd(&gpu, buf(&yc)?, buf(&g)?, &mut dx, n, c)?;
        } else {
            softmax_bwd(&gpu, buf(&yc)?, buf(&g)?, &mut dx, n, c)?;
        }
        grads.add_to(&xc, wrap(dx, xc.shape())?)
    }))
}

flat_launcher! {
    /// The mean squared error's element-wise parts: sq = (p - q)^2 and grad = 2 (p - q) / n
    /// (the gradient of the mean). CPU twin: the host branch of `mse` in mod.rs.
    mse_fwd => "mse_fwd_f32"(p: &F32Buf, q: &F32Buf, grad: &mut F32Buf, sq: &mut F32Buf;)
}
