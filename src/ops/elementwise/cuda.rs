//! Elementwise ops on the GPU: launchers of kernels/elementwise.cu (sizes checked before each
//! unsafe launch; CPU twins in `cpu.rs` beside this file) and the ops on GPU tensors.

use crate::autograd::Tape;
use crate::cuda::launch::{flat_cfg, flat_checks, flat_launcher, launch};
use crate::cuda::{F32Buf, Gpu};
use crate::error::{Error, Result};
use crate::ops::gpu::{alloc, buf, here, wrap, GpuRef};
use crate::tensor::Tensor;

flat_launcher! {
    /// y = x > 0 ? x : slope x on the first `n` elements. CPU twin:
    /// `cpu::leaky_relu_fwd`.
    leaky_relu_fwd => "leaky_relu_fwd_f32" (x: &F32Buf, y: &mut F32Buf; slope: f32)
}

flat_launcher! {
    /// dx = x > 0 ? dy : slope dy. CPU twin: `cpu::leaky_relu_bwd`.
    leaky_relu_bwd => "leaky_relu_bwd_f32" (x: &F32Buf, dy: &F32Buf, dx: &mut F32Buf; slope: f32)
}

flat_launcher! {
    /// y = a + b. CPU twin: `cpu::add`.
    add_fwd => "add_fwd_f32" (a: &F32Buf, b: &F32Buf, y: &mut F32Buf;)
}

flat_launcher! {
    /// y = s x. CPU twin: `cpu::scale`.
    scale_fwd => "scale_fwd_f32" (x: &F32Buf, y: &mut F32Buf; s: f32)
}

/// Inverted dropout: `mask` = 0 with probability `p`, else 1 / (1 - p); y = x * mask. The mask
/// is the one `ops::elementwise::dropout` draws for the same (`seed`, `stream`), bit for bit
/// ([`dropout_mask_host`] is the kernel's indexing in Rust).
pub fn dropout_fwd(
    gpu: &Gpu,
    x: &F32Buf,
    y: &mut F32Buf,
    mask: &mut F32Buf,
    n: usize,
    p: f32,
    seed: u64,
    stream: u64,
) -> Result<()> {
    let k = "dropout_fwd_f32";
    if !(0.0..1.0).contains(&p) {
        return Err(Error::usage(format!("dropout: probability {p} is not in [0, 1)")));
    }
    let nl = flat_checks(k, n, &[("x", x.len()), ("y", y.len()), ("mask", mask.len())])?;
    let keep = 1.0f32 / (1.0 - p);
    let (seed_lo, seed_hi, stream_lo, stream_hi) =
        (seed as u32, (seed >> 32) as u32, stream as u32, (stream >> 32) as u32);
    launch!(gpu, k, flat_cfg(n.div_ceil(4)), x, y, mask, &nl, &p, &keep, &seed_lo, &seed_hi, &stream_lo, &stream_hi)
}

flat_launcher! {
    /// dx = dy * mask (the mask of [`dropout_fwd`]).
    dropout_bwd => "dropout_bwd_f32" (dy: &F32Buf, mask: &F32Buf, dx: &mut F32Buf;)
}

/// The dropout kernel's mask computed on the host with the kernel's indexing: element i takes
/// word i % 4 of Philox block i / 4 of stream (`seed`, `stream`), as `(u32 >> 8) * 2^-24`.
/// Because `Rng::uniform` consumes one u32 per call and numbers its blocks by a counter, this is
/// exactly the sequence `ops::elementwise::dropout` draws (a CPU-only test checks it).
pub fn dropout_mask_host(n: usize, p: f32, seed: u64, stream: u64) -> Vec<f32> {
    let keep = 1.0f32 / (1.0 - p);
    let key = [seed as u32, (seed >> 32) as u32];
    (0..n.div_ceil(4))
        .flat_map(|blk| {
            let b = blk as u64;
            crate::rng::philox4x32([b as u32, (b >> 32) as u32, stream as u32, (stream >> 32) as u32], key)
        })
        .take(n)
        .map(|word| {
            let u = (word >> 8) as f32 * (1.0 / 16_777_216.0);
            if u < p {
                0.0
            } else {
                keep
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The ops on GPU tensors (shapes checked by the family's mod.rs), recorded on the tape.

/// An elementwise map y = f(x) whose backward is dx = df(x, dy), both n-element launches.
fn unary(
    gpu: GpuRef,
    tape: &Tape,
    x: &Tensor,
    fwd: impl FnOnce(&Gpu, &F32Buf, &mut F32Buf, usize) -> Result<()>,
    bwd: impl FnOnce(&Gpu, &F32Buf, &F32Buf, &mut F32Buf, usize) -> Result<()> + 'static,
) -> Result<Tensor> {
    let n = x.numel();
    let mut y = alloc(&gpu, x.shape())?;
    if n > 0 {
        fwd(&gpu, buf(x)?, &mut y, n)?;
    }
    let xc = x.clone();
    Ok(tape.record(wrap(y, x.shape())?, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = alloc(&gpu, xc.shape())?;
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
        move |g, x, y, n| leaky_relu_fwd(g, x, y, n, slope),
        move |g, x, dy, dx, n| leaky_relu_bwd(g, x, dy, dx, n, slope),
    )
}

/// s * x.
pub(crate) fn scale(gpu: GpuRef, tape: &Tape, x: &Tensor, s: f32) -> Result<Tensor> {
    unary(gpu, tape, x, move |g, x, y, n| scale_fwd(g, x, y, n, s), move |g, _, dy, dx, n| scale_fwd(g, dy, dx, n, s))
}

/// a + b (shapes checked by the caller).
pub(crate) fn add(gpu: GpuRef, tape: &Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let n = a.numel();
    let mut y = alloc(&gpu, a.shape())?;
    if n > 0 {
        add_fwd(&gpu, buf(a)?, buf(b)?, &mut y, n)?;
    }
    let (ac, bc) = (a.clone(), b.clone());
    Ok(tape.record(wrap(y, a.shape())?, &[a, b], move |g, grads| {
        let g = here(g, &gpu)?;
        grads.add_to(&ac, g.detach())?;
        grads.add_to(&bc, g.detach())
    }))
}

/// Inverted dropout with the mask the CPU op draws for (seed, stream).
pub(crate) fn dropout(gpu: GpuRef, tape: &Tape, x: &Tensor, p: f32, seed: u64, stream: u64) -> Result<Tensor> {
    let n = x.numel();
    let mut y = alloc(&gpu, x.shape())?;
    let mut mask = alloc(&gpu, x.shape())?;
    if n > 0 {
        dropout_fwd(&gpu, buf(x)?, &mut y, &mut mask, n, p, seed, stream)?;
    }
    let xc = x.clone();
    Ok(tape.record(wrap(y, x.shape())?, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = alloc(&gpu, xc.shape())?;
        if n > 0 {
            dropout_bwd(&gpu, buf(&g)?, &mask, &mut dx, n)?;
        }
        grads.add_to(&xc, wrap(dx, xc.shape())?)
    }))
}
