//! Pooling on the GPU: launchers of kernels/pool.cu (sizes checked before each unsafe launch;
//! CPU twins in `cpu.rs` beside this file) and the ops on GPU tensors.

use crate::autograd::Tape;
use crate::cuda::launch::{elems, flat_cfg, int, launch, long, need, nonzero, rows_cfg};
use crate::cuda::{CudaSlice, F32Buf, Gpu};
use crate::error::{Error, Result};
use crate::ops::gpu::{alloc, buf, here, wrap, GpuRef};
use crate::tensor::Tensor;

/// A 2 x 2 max-pool's checked sizes: the buffer lengths and the kernel's arguments.
struct MaxPoolSizes {
    /// planes x h x w.
    full: usize,
    /// planes x h/2 x w/2.
    pooled: usize,
    planes: i64,
    h: i32,
    w: i32,
}

/// What both max-pool launchers check before the unsafe launch: nonzero sizes, the full-size
/// buffer (planes x h x w), then the pooled ones (planes x h/2 x w/2).
fn maxpool_checks(
    k: &str,
    (planes, h, w): (usize, usize, usize),
    full: (&str, usize),
    pooled: &[(&str, usize)],
) -> Result<MaxPoolSizes> {
    nonzero(k, &[("planes", planes), ("height / 2", h / 2), ("width / 2", w / 2)])?;
    let total = elems(k, planes, elems(k, h, w)?)?;
    need(k, full.0, full.1, total)?;
    let out = planes * (h / 2) * (w / 2);
    for &(what, len) in pooled {
        need(k, what, len, out)?;
    }
    let (hi, wi, pl) = (int(k, "h", h)?, int(k, "w", w)?, long(planes));
    int(k, "plane size", h * w)?;
    Ok(MaxPoolSizes { full: total, pooled: out, planes: pl, h: hi, w: wi })
}

/// 2 x 2 max-pool (stride 2) of `planes` planes of h x w: `y` and the winner's offset `arg`
/// (planes x h/2 x w/2). CPU twin: `cpu::maxpool_fwd` with k = 2.
pub fn maxpool_fwd(
    gpu: &Gpu,
    x: &F32Buf,
    planes: usize,
    h: usize,
    w: usize,
    y: &mut F32Buf,
    arg: &mut CudaSlice<u8>,
) -> Result<()> {
    let k = "maxpool_fwd_f32";
    let m = maxpool_checks(k, (planes, h, w), ("x", x.len()), &[("y", y.len()), ("arg", arg.len())])?;
    launch!(gpu, k, flat_cfg(m.pooled), x, y, arg, &m.planes, &m.h, &m.w)
}

/// Routes each output gradient to its window's winner; `dx` (planes x h x w) is overwritten,
/// zeros included. CPU twin: `cpu::maxpool_bwd` with k = 2.
pub fn maxpool_bwd(
    gpu: &Gpu,
    dy: &F32Buf,
    arg: &CudaSlice<u8>,
    planes: usize,
    h: usize,
    w: usize,
    dx: &mut F32Buf,
) -> Result<()> {
    let k = "maxpool_bwd_f32";
    let m = maxpool_checks(k, (planes, h, w), ("dx", dx.len()), &[("dy", dy.len()), ("arg", arg.len())])?;
    launch!(gpu, k, flat_cfg(m.full), dy, arg, dx, &m.planes, &m.h, &m.w)
}

/// Mean of each plane of `hw` elements. CPU twin: `cpu::avgpool_fwd`.
pub fn avgpool_fwd(gpu: &Gpu, x: &F32Buf, planes: usize, hw: usize, y: &mut F32Buf) -> Result<()> {
    let k = "avgpool_fwd_f32";
    nonzero(k, &[("planes", planes), ("plane size", hw)])?;
    need(k, "x", x.len(), elems(k, planes, hw)?)?;
    need(k, "y", y.len(), planes)?;
    let (pl, hwi) = (long(planes), int(k, "plane size", hw)?);
    launch!(gpu, k, rows_cfg(k, planes)?, x, y, &pl, &hwi)
}

/// Spreads each plane's gradient evenly over its `hw` elements. CPU twin:
/// `cpu::avgpool_bwd`.
pub fn avgpool_bwd(gpu: &Gpu, dy: &F32Buf, planes: usize, hw: usize, dx: &mut F32Buf) -> Result<()> {
    let k = "avgpool_bwd_f32";
    nonzero(k, &[("planes", planes), ("plane size", hw)])?;
    let total = elems(k, planes, hw)?;
    need(k, "dx", dx.len(), total)?;
    need(k, "dy", dy.len(), planes)?;
    let (pl, hwi) = (long(planes), int(k, "plane size", hw)?);
    launch!(gpu, k, flat_cfg(total), dy, dx, &pl, &hwi)
}

// ---------------------------------------------------------------------------------------------
// The ops on GPU tensors (shapes checked by the family's mod.rs), recorded on the tape.

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
    let mut y = alloc(&gpu, &[n, c, h / 2, w / 2])?;
    let mut arg = gpu.zeros::<u8>(len.max(1))?;
    maxpool_fwd(&gpu, buf(x)?, planes, h, w, &mut y, &mut arg)?;
    // The winners' offsets are all the backward reads (as on the CPU).
    let xr = x.identity();
    Ok(tape.record(wrap(y, &[n, c, h / 2, w / 2])?, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = alloc(&gpu, xr.shape())?;
        maxpool_bwd(&gpu, buf(&g)?, &arg, planes, h, w, &mut dx)?;
        grads.add_to_ref(&xr, wrap(dx, xr.shape())?)
    }))
}

/// Mean over H and W.
pub(crate) fn global_avg_pool(gpu: GpuRef, tape: &Tape, x: &Tensor, [n, c, h, w]: [usize; 4]) -> Result<Tensor> {
    let mut y = alloc(&gpu, &[n, c])?;
    avgpool_fwd(&gpu, buf(x)?, n * c, h * w, &mut y)?;
    let xr = x.identity();
    Ok(tape.record(wrap(y, &[n, c])?, &[x], move |g, grads| {
        let g = here(g, &gpu)?;
        let mut dx = alloc(&gpu, xr.shape())?;
        avgpool_bwd(&gpu, buf(&g)?, n * c, h * w, &mut dx)?;
        grads.add_to_ref(&xr, wrap(dx, xr.shape())?)
    }))
}
