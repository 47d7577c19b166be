//! Row concatenation and narrowing on the GPU: device-to-device copies, no kernel.

use crate::autograd::Tape;
use crate::error::Result;
use crate::ops::gpu::{alloc, buf, here, wrap, GpuRef};
use crate::tensor::Tensor;

/// Rows of `parts` one after another (shapes checked by the caller), as device copies.
pub(crate) fn concat_rows(gpu: GpuRef, tape: &Tape, parts: &[&Tensor], shape: Vec<usize>) -> Result<Tensor> {
    let mut y = alloc(&gpu, &shape)?;
    let mut at = 0;
    for p in parts {
        gpu.copy_range(buf(p)?, 0..p.numel(), &mut y, at)?;
        at += p.numel();
    }
    let kept: Vec<Tensor> = parts.iter().map(|p| (*p).clone()).collect();
    Ok(tape.record(wrap(y, &shape)?, parts, move |g, grads| {
        let g = here(g, &gpu)?;
        let mut off = 0;
        for p in &kept {
            let n = p.numel();
            if p.requires_grad() {
                let mut part = alloc(&gpu, p.shape())?;
                gpu.copy_range(buf(&g)?, off..off + n, &mut part, 0)?;
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
    let mut y = alloc(&gpu, &shape)?;
    gpu.copy_range(buf(x)?, from..from + len, &mut y, 0)?;
    let xc = x.clone();
    Ok(tape.record(wrap(y, &shape)?, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = alloc(&gpu, xc.shape())?;
        gpu.copy_range(buf(&g)?, 0..len, &mut dx, from)?;
        grads.add_to(&xc, wrap(dx, xc.shape())?)
    }))
}
