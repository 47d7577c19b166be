//! The ops on CUDA tensors. Each op in ops/ checks shapes, then comes here when its inputs live on
//! a GPU: the same semantics as the CPU path beside it, each forward and backward one or a few
//! launches of `cuda::kernels` (cuDNN for convolution, cuBLAS for products), recorded on the same
//! tape. Tensors stay on the device; the host sees only the scalars an op must return (the MI
//! statistics for the log) and the labels it is given.

use crate::autograd::Tape;
use crate::cpu::conv::ConvShape;
use crate::cuda::{context, kernels as k, CudaSlice, Gpu};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::rc::Rc;

/// A shared handle on the GPU an op runs on (kept by its backward closure).
pub(crate) type GpuRef = Rc<Gpu>;

/// The GPU that every tensor of `ts` lives on; None when all are on the host; an error naming
/// `what` when they are on different devices.
pub(crate) fn on_gpu(what: &str, ts: &[&Tensor]) -> Result<Option<GpuRef>> {
    let Some(first) = ts.first().map(|t| t.device()) else { return Ok(None) };
    if let Some(other) = ts.iter().map(|t| t.device()).find(|&d| d != first) {
        return Err(Error::device(format!("{what}: inputs on different devices ({first} and {other})")));
    }
    match first {
        Device::Cpu => Ok(None),
        Device::Cuda(i) => context::gpu(i).map(Some),
    }
}

fn buf(t: &Tensor) -> Result<&CudaSlice<f32>> {
    t.cuda_slice()
}

fn alloc(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
    context::zeros(gpu, n)
}

fn wrap(s: CudaSlice<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_cuda(s, shape.to_vec())
}

/// `g` on `gpu` (a gradient that arrives from the host, e.g. a seed, is uploaded).
fn here(g: &Tensor, gpu: &Gpu) -> Result<Tensor> {
    g.to_device(Device::Cuda(gpu.info().ordinal))
}

/// acc += g on the GPU (gradient accumulation); `g` is moved to acc's device if needed.
pub(crate) fn add_assign(acc: &mut Tensor, g: &Tensor) -> Result<()> {
    let gpu = context::gpu_of(buf(acc)?)?;
    let g = here(g, &gpu)?;
    let n = acc.numel();
    if n == 0 {
        return Ok(());
    }
    let mut y = alloc(&gpu, n)?;
    k::add_fwd(&gpu, buf(acc)?, buf(&g)?, &mut y, n)?;
    *acc = wrap(y, acc.shape())?;
    Ok(())
}

/// An elementwise map y = f(x) whose backward is dx = df(x, dy), both n-element launches.
fn unary(
    gpu: GpuRef,
    tape: &Tape,
    x: &Tensor,
    fwd: impl FnOnce(&Gpu, &CudaSlice<f32>, &mut CudaSlice<f32>, usize) -> Result<()>,
    bwd: impl FnOnce(&Gpu, &CudaSlice<f32>, &CudaSlice<f32>, &mut CudaSlice<f32>, usize) -> Result<()> + 'static,
) -> Result<Tensor> {
    let n = x.numel();
    let mut y = alloc(&gpu, n)?;
    if n > 0 {
        fwd(&gpu, buf(x)?, &mut y, n)?;
    }
    let xc = x.clone();
    Ok(tape.record(wrap(y, x.shape())?, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = alloc(&gpu, n)?;
        if n > 0 {
            bwd(&gpu, buf(&xc)?, buf(&g)?, &mut dx, n)?;
        }
        grads.add_to(&xc, wrap(dx, xc.shape())?)
    }))
}

/// LeakyReLU (slope 0: ReLU).
pub(crate) fn leaky_relu(gpu: GpuRef, tape: &Tape, x: &Tensor, slope: f32) -> Result<Tensor> {
    unary(
        gpu,
        tape,
        x,
        move |g, x, y, n| k::leaky_relu_fwd(g, x, y, n, slope),
        move |g, x, dy, dx, n| k::leaky_relu_bwd(g, x, dy, dx, n, slope),
    )
}

/// s * x.
pub(crate) fn scale(gpu: GpuRef, tape: &Tape, x: &Tensor, s: f32) -> Result<Tensor> {
    unary(
        gpu,
        tape,
        x,
        move |g, x, y, n| k::scale_fwd(g, x, y, n, s),
        move |g, _, dy, dx, n| k::scale_fwd(g, dy, dx, n, s),
    )
}

/// a + b (shapes checked by the caller).
pub(crate) fn add(gpu: GpuRef, tape: &Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = a.numel();
    let mut y = alloc(&gpu, n)?;
    if n > 0 {
        k::add_fwd(&gpu, buf(a)?, buf(b)?, &mut y, n)?;
    }
    let (ac, bc) = (a.clone(), b.clone());
    Ok(tape.record(wrap(y, a.shape())?, &[a, b], move |g, grads| {
        let g = here(g, &gpu)?;
        grads.add_to(&ac, g.detach())?;
        grads.add_to(&bc, g.detach())
    }))
}

/// Convolution through cuDNN (geometry checked by the caller).
#[cfg(feature = "cudnn")]
pub(crate) fn conv2d(gpu: GpuRef, tape: &Tape, x: &Tensor, w: &Tensor, s: ConvShape) -> Result<Tensor> {
    use crate::cuda::cudnn;
    let mut y = alloc(&gpu, s.n * s.co * s.p())?;
    cudnn::conv_forward(&gpu, &s, buf(x)?, buf(w)?, &mut y)?;
    let (xc, wc) = (x.clone(), w.clone());
    Ok(tape.record(wrap(y, &[s.n, s.co, s.ho(), s.wo()])?, &[x, w], move |g, grads| {
        let g = here(g, &gpu)?;
        if wc.requires_grad() {
            let mut dw = alloc(&gpu, wc.numel())?;
            cudnn::conv_backward_filter(&gpu, &s, buf(&xc)?, buf(&g)?, &mut dw)?;
            grads.add_to(&wc, wrap(dw, wc.shape())?)?;
        }
        if xc.requires_grad() {
            let mut dx = alloc(&gpu, xc.numel())?;
            cudnn::conv_backward_data(&gpu, &s, buf(&wc)?, buf(&g)?, &mut dx)?;
            grads.add_to(&xc, wrap(dx, xc.shape())?)?;
        }
        Ok(())
    }))
}

/// Without cuDNN there is no GPU convolution: an error that says how to get one.
#[cfg(not(feature = "cudnn"))]
pub(crate) fn conv2d(_gpu: GpuRef, _tape: &Tape, _x: &Tensor, _w: &Tensor, s: ConvShape) -> Result<Tensor> {
    Err(Error::device(format!(
        "conv2d {s:?} on the GPU needs cuDNN: this binary was built without the `cudnn` feature \
         (rebuild with --features cuda,cudnn)"
    )))
}

/// a [m, kk] @ b [kk, n] through cuBLAS.
pub(crate) fn matmul(
    gpu: GpuRef,
    tape: &Tape,
    a: &Tensor,
    b: &Tensor,
    m: usize,
    kk: usize,
    n: usize,
) -> Result<Tensor> {
    let mut y = alloc(&gpu, m * n)?;
    k::sgemm(&gpu, m, n, kk, buf(a)?, false, buf(b)?, false, &mut y, 1.0, 0.0)?;
    let (ac, bc) = (a.clone(), b.clone());
    Ok(tape.record(wrap(y, &[m, n])?, &[a, b], move |g, grads| {
        let g = here(g, &gpu)?;
        if ac.requires_grad() {
            let mut da = alloc(&gpu, m * kk)?;
            k::sgemm(&gpu, m, kk, n, buf(&g)?, false, buf(&bc)?, true, &mut da, 1.0, 0.0)?;
            grads.add_to(&ac, wrap(da, &[m, kk])?)?;
        }
        if bc.requires_grad() {
            let mut db = alloc(&gpu, kk * n)?;
            k::sgemm(&gpu, kk, n, m, buf(&ac)?, true, buf(&g)?, false, &mut db, 1.0, 0.0)?;
            grads.add_to(&bc, wrap(db, &[kk, n])?)?;
        }
        Ok(())
    }))
}

/// x [n, fin] @ w [fout, fin]^T + b: the bias is written first and cuBLAS accumulates onto it.
pub(crate) fn linear(
    gpu: GpuRef,
    tape: &Tape,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    (n, fin, fout): (usize, usize, usize),
) -> Result<Tensor> {
    let mut y = alloc(&gpu, n * fout)?;
    if let Some(b) = b {
        k::bias_rows_fwd(&gpu, buf(b)?, &mut y, n, fout)?;
    }
    let beta = if b.is_some() { 1.0 } else { 0.0 };
    k::sgemm(&gpu, n, fout, fin, buf(x)?, false, buf(w)?, true, &mut y, 1.0, beta)?;
    let (xc, wc, bc) = (x.clone(), w.clone(), b.cloned());
    let mut inputs = vec![x, w];
    inputs.extend(b);
    Ok(tape.record(wrap(y, &[n, fout])?, &inputs, move |g, grads| {
        let g = here(g, &gpu)?;
        if xc.requires_grad() {
            let mut dx = alloc(&gpu, n * fin)?;
            k::sgemm(&gpu, n, fin, fout, buf(&g)?, false, buf(&wc)?, false, &mut dx, 1.0, 0.0)?;
            grads.add_to(&xc, wrap(dx, &[n, fin])?)?;
        }
        if wc.requires_grad() {
            let mut dw = alloc(&gpu, fout * fin)?;
            k::sgemm(&gpu, fout, fin, n, buf(&g)?, true, buf(&xc)?, false, &mut dw, 1.0, 0.0)?;
            grads.add_to(&wc, wrap(dw, &[fout, fin])?)?;
        }
        if let Some(bc) = bc.filter(|b| b.requires_grad()) {
            let mut db = alloc(&gpu, fout)?;
            k::bias_grad_bwd(&gpu, buf(&g)?, &mut db, n, fout)?;
            grads.add_to(&bc, wrap(db, &[fout])?)?;
        }
        Ok(())
    }))
}

/// Rows of `parts` one after another (shapes checked by the caller), as device copies.
pub(crate) fn concat_rows(gpu: GpuRef, tape: &Tape, parts: &[&Tensor], shape: Vec<usize>) -> Result<Tensor> {
    let total: usize = parts.iter().map(|p| p.numel()).sum();
    let mut y = alloc(&gpu, total)?;
    let mut at = 0;
    for p in parts {
        context::copy_range(&gpu, buf(p)?, 0, &mut y, at, p.numel())?;
        at += p.numel();
    }
    let kept: Vec<Tensor> = parts.iter().map(|p| (*p).clone()).collect();
    Ok(tape.record(wrap(y, &shape)?, parts, move |g, grads| {
        let g = here(g, &gpu)?;
        let mut off = 0;
        for p in &kept {
            let n = p.numel();
            if p.requires_grad() {
                let mut part = alloc(&gpu, n)?;
                context::copy_range(&gpu, buf(&g)?, off, &mut part, 0, n)?;
                grads.add_to(p, wrap(part, p.shape())?)?;
            }
            off += n;
        }
        Ok(())
    }))
}

/// Elements [from, from + len) of `x` as a tensor of `shape` (a row range; checked by the caller).
pub(crate) fn narrow(
    gpu: GpuRef,
    tape: &Tape,
    x: &Tensor,
    from: usize,
    len: usize,
    shape: Vec<usize>,
) -> Result<Tensor> {
    let mut y = alloc(&gpu, len)?;
    context::copy_range(&gpu, buf(x)?, from, &mut y, 0, len)?;
    let xc = x.clone();
    Ok(tape.record(wrap(y, &shape)?, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = alloc(&gpu, xc.numel())?;
        context::copy_range(&gpu, buf(&g)?, 0, &mut dx, from, len)?;
        grads.add_to(&xc, wrap(dx, xc.shape())?)
    }))
}

/// 2 x 2 max-pool, stride 2 (the only window the GPU kernel has).
pub(crate) fn max_pool2d(
    gpu: GpuRef,
    tape: &Tape,
    x: &Tensor,
    size: usize,
    [n, c, h, w]: [usize; 4],
) -> Result<Tensor> {
    if size != 2 {
        return Err(Error::shape(format!("max_pool2d: the GPU kernel pools 2 x 2 windows, not {size} x {size}")));
    }
    let planes = n * c;
    let len = planes * (h / 2) * (w / 2);
    let mut y = alloc(&gpu, len)?;
    let mut arg = gpu.zeros::<u8>(len.max(1))?;
    k::maxpool2_fwd(&gpu, buf(x)?, planes, h, w, &mut y, &mut arg)?;
    let xc = x.clone();
    Ok(tape.record(wrap(y, &[n, c, h / 2, w / 2])?, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = alloc(&gpu, xc.numel())?;
        k::maxpool2_bwd(&gpu, buf(&g)?, &arg, planes, h, w, &mut dx)?;
        grads.add_to(&xc, wrap(dx, xc.shape())?)
    }))
}

/// Mean over H and W.
pub(crate) fn global_avg_pool(gpu: GpuRef, tape: &Tape, x: &Tensor, [n, c, h, w]: [usize; 4]) -> Result<Tensor> {
    let mut y = alloc(&gpu, n * c)?;
    k::avgpool_fwd(&gpu, buf(x)?, n * c, h * w, &mut y)?;
    let xc = x.clone();
    Ok(tape.record(wrap(y, &[n, c])?, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = alloc(&gpu, xc.numel())?;
        k::avgpool_bwd(&gpu, buf(&g)?, n * c, h * w, &mut dx)?;
        grads.add_to(&xc, wrap(dx, xc.shape())?)
    }))
}

/// Inverted dropout with the mask the CPU op draws for (seed, stream).
pub(crate) fn dropout(gpu: GpuRef, tape: &Tape, x: &Tensor, p: f32, seed: u64, stream: u64) -> Result<Tensor> {
    let n = x.numel();
    let mut y = alloc(&gpu, n)?;
    let mut mask = alloc(&gpu, n)?;
    if n > 0 {
        k::dropout_fwd(&gpu, buf(x)?, &mut y, &mut mask, n, p, seed, stream)?;
    }
    let xc = x.clone();
    Ok(tape.record(wrap(y, x.shape())?, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = alloc(&gpu, n)?;
        if n > 0 {
            k::dropout_bwd(&gpu, buf(&g)?, &mask, &mut dx, n)?;
        }
        grads.add_to(&xc, wrap(dx, xc.shape())?)
    }))
}

/// Batch norm (training mode) with LeakyReLU fused when `slope` is given; also returns the batch
/// mean and biased variance as device tensors [c] for the running estimates.
pub(crate) fn batch_norm_train(
    gpu: GpuRef,
    tape: &Tape,
    (x, gamma, beta): (&Tensor, &Tensor, &Tensor),
    (n, c, hw): (usize, usize, usize),
    eps: f32,
    slope: Option<f32>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let mut y = alloc(&gpu, x.numel())?;
    let stats = k::batchnorm_train_fwd(&gpu, buf(x)?, n, c, hw, buf(gamma)?, buf(beta)?, eps, slope, &mut y)?;
    let mean = wrap(context::copy(&stats.mean)?, &[c])?;
    let var = wrap(context::copy(&stats.var)?, &[c])?;
    let (xc, gc, bc) = (x.clone(), gamma.clone(), beta.clone());
    let out = tape.record(wrap(y, x.shape())?, &[x, gamma, beta], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = if xc.requires_grad() { Some(alloc(&gpu, xc.numel())?) } else { None };
        let (mut dg, mut db) = (alloc(&gpu, c)?, alloc(&gpu, c)?);
        k::batchnorm_train_bwd(
            &gpu,
            buf(&xc)?,
            buf(&g)?,
            n,
            c,
            hw,
            buf(&gc)?,
            buf(&bc)?,
            slope,
            &stats,
            dx.as_mut(),
            &mut dg,
            &mut db,
        )?;
        if let Some(dx) = dx {
            grads.add_to(&xc, wrap(dx, xc.shape())?)?;
        }
        grads.add_to(&gc, wrap(dg, &[c])?)?;
        grads.add_to(&bc, wrap(db, &[c])?)
    });
    Ok((out, mean, var))
}

/// Batch norm with running statistics (evaluation mode), LeakyReLU fused when `slope` is given.
/// Its backward (only reached when a frozen BN is trained through) runs the CPU twin on copies:
/// no training recipe here does that, so it has no kernel.
pub(crate) fn batch_norm_eval(
    gpu: GpuRef,
    tape: &Tape,
    [x, gamma, beta, mean, var]: [&Tensor; 5],
    (c, hw): (usize, usize),
    eps: f32,
    slope: Option<f32>,
) -> Result<Tensor> {
    let n = x.numel() / (c * hw).max(1);
    let mut y = alloc(&gpu, x.numel())?;
    k::batchnorm_eval_fwd(&gpu, buf(x)?, n, c, hw, buf(gamma)?, buf(beta)?, buf(mean)?, buf(var)?, eps, slope, &mut y)?;
    let (xc, gc, bc, mc, vc) = (x.clone(), gamma.clone(), beta.clone(), mean.clone(), var.clone());
    Ok(tape.record(wrap(y, x.shape())?, &[x, gamma, beta], move |g, grads| {
        let host = |t: &Tensor| t.to_vec();
        let mut dx = xc.requires_grad().then(|| vec![0.0; xc.numel()]);
        let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
        crate::cpu::batchnorm::backward_eval(
            &host(&xc)?,
            &host(g)?,
            c,
            hw,
            &host(&gc)?,
            &host(&bc)?,
            &host(&mc)?,
            &host(&vc)?,
            eps,
            slope,
            dx.as_deref_mut(),
            &mut dg,
            &mut db,
        );
        let dev = |v: Vec<f32>, shape: &[usize]| -> Result<Tensor> { wrap(gpu.upload(&v)?, shape) };
        if let Some(dx) = dx {
            grads.add_to(&xc, dev(dx, xc.shape())?)?;
        }
        grads.add_to(&gc, dev(dg, &[c])?)?;
        grads.add_to(&bc, dev(db, &[c])?)
    }))
}

/// A scalar loss on the GPU whose gradient wrt `x` the forward already wrote to `grad`; the
/// backward scales it by the upstream gradient read on the device.
fn fused(gpu: GpuRef, tape: &Tape, x: &Tensor, loss: CudaSlice<f32>, grad: CudaSlice<f32>) -> Result<Tensor> {
    let xc = x.clone();
    Ok(tape.record(wrap(loss, &[])?, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let n = xc.numel();
        let mut dx = alloc(&gpu, n)?;
        k::scale_dev_fwd(&gpu, &grad, &mut dx, n, buf(&g)?)?;
        grads.add_to(&xc, wrap(dx, xc.shape())?)
    }))
}

/// Mean cross-entropy against class indices (checked by the caller), fused with its gradient.
pub(crate) fn cross_entropy(gpu: GpuRef, tape: &Tape, logits: &Tensor, labels: &[usize], c: usize) -> Result<Tensor> {
    let n = labels.len();
    let ids: Vec<i32> = labels
        .iter()
        .map(|&y| i32::try_from(y).map_err(|_| Error::shape(format!("cross_entropy: label {y} beyond 32 bits"))))
        .collect::<Result<_>>()?;
    let ids = gpu.upload(&ids)?;
    let mut grad = alloc(&gpu, n * c)?;
    let loss = k::cross_entropy_hard(&gpu, buf(logits)?, &ids, &mut grad, n, c)?;
    fused(gpu, tape, logits, loss, grad)
}

/// Mean soft-target cross-entropy, fused with its gradient.
pub(crate) fn cross_entropy_soft(
    gpu: GpuRef,
    tape: &Tape,
    logits: &Tensor,
    targets: &Tensor,
    (n, c): (usize, usize),
) -> Result<Tensor> {
    let mut grad = alloc(&gpu, n * c)?;
    let loss = k::cross_entropy_soft(&gpu, buf(logits)?, buf(targets)?, &mut grad, n, c)?;
    fused(gpu, tape, logits, loss, grad)
}

/// Mean squared error against a constant target. MixMatch's L_U is its only user and its targets
/// are mixed on the host anyway (ssl::mixmatch), so it is computed there, in the CPU's f64 order.
pub(crate) fn mse(gpu: GpuRef, tape: &Tape, p: &Tensor, q: &Tensor) -> Result<Tensor> {
    let (pd, qd) = (p.to_vec()?, q.to_vec()?);
    let n = pd.len();
    let loss = pd.iter().zip(&qd).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / n as f64;
    let grad: Vec<f32> = pd.iter().zip(&qd).map(|(a, b)| 2.0 * (a - b) / n as f32).collect();
    let (loss, grad) = (gpu.upload(&[loss as f32])?, gpu.upload(&grad)?);
    fused(gpu, tape, p, loss, grad)
}

/// The IIC loss of two views' logits; its statistics are copied to the host for the log.
pub(crate) fn mutual_info(
    gpu: GpuRef,
    tape: &Tape,
    a: &Tensor,
    b: &Tensor,
    (n, c): (usize, usize),
    lambda: f32,
) -> Result<(Tensor, f64, f64)> {
    let fwd = k::mi_fwd(&gpu, buf(a)?, buf(b)?, n, c, lambda)?;
    let s = fwd.scalars(&gpu)?;
    let loss = wrap(context::copy(&fwd.loss)?, &[])?;
    let (ac, bc) = (a.clone(), b.clone());
    let out = tape.record(loss, &[a, b], move |g, grads| {
        let upstream = g.item()?;
        let (mut ga, mut gb) = (alloc(&gpu, n * c)?, alloc(&gpu, n * c)?);
        k::mi_bwd(&gpu, &fwd, upstream, &mut ga, &mut gb)?;
        grads.add_to(&ac, wrap(ga, &[n, c])?)?;
        grads.add_to(&bc, wrap(gb, &[n, c])?)
    });
    Ok((out, s.joint_entropy, s.marginal_entropy))
}

/// Row softmax (`log` false) or log-softmax (`log` true).
pub(crate) fn softmax(gpu: GpuRef, tape: &Tape, x: &Tensor, c: usize, log: bool) -> Result<Tensor> {
    let n = x.numel() / c;
    let mut y = alloc(&gpu, n * c)?;
    if log {
        k::log_softmax_fwd(&gpu, buf(x)?, &mut y, n, c)?;
    } else {
        k::softmax_fwd(&gpu, buf(x)?, &mut y, n, c)?;
    }
    let out = wrap(y, x.shape())?;
    let (xc, yc) = (x.clone(), out.clone());
    Ok(tape.record(out, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = alloc(&gpu, n * c)?;
        if log {
            k::log_softmax_bwd(&gpu, buf(&yc)?, buf(&g)?, &mut dx, n, c)?;
        } else {
            k::softmax_bwd(&gpu, buf(&yc)?, buf(&g)?, &mut dx, n, c)?;
        }
        grads.add_to(&xc, wrap(dx, xc.shape())?)
    }))
}
