//! The mutual-information (IIC) loss on the GPU: launchers of kernels/mutual_info.cu (sizes
//! checked before each unsafe launch; CPU twin in `cpu.rs` beside this file) and the op.

use crate::autograd::Tape;
use crate::cuda::launch::{cfg, grid_dim, int, launch, need, row_checks, rows_cfg, BLOCK};
use crate::cuda::{context, CudaSlice, F32Buf, Gpu};
use crate::error::{Error, Result};
use crate::ops::gpu::{alloc, buf, here, wrap, GpuRef};
use crate::tensor::Tensor;

/// Largest C handled by the fused mutual-information kernels (one class per lane).
pub const MI_FUSED_MAX_C: usize = 32;
/// Largest C the mutual-information kernels accept (64 x 64 tiles: the tile grid's y extent).
pub const MI_MAX_C: usize = 64 * 255;
/// Fewest rows in one partial C x C sum of the MI forward.
const MI_MIN_ROWS_PER_PART: usize = 256;
/// Upper bound on the f32 elements of all partial C x C sums together (32 MiB).
const MI_MAX_PARTIAL_ELEMS: usize = 1 << 23;

/// Rows per partial C x C sum of the MI forward: a function of (n, c) only, never of the GPU, so
/// the f64 reduction order (and the result) is the same on every device. At least 256 rows;
/// more when the partials of all parts would exceed 2^23 floats (C >= 182 at large n).
pub fn mi_rows_per_part(n: usize, c: usize) -> usize {
    let max_parts = (MI_MAX_PARTIAL_ELEMS / (c * c).max(1)).max(1);
    MI_MIN_ROWS_PER_PART.max(n.div_ceil(max_parts))
}

/// What the MI forward leaves on the device for the backward and for logging.
/// Mirrors `cpu::MiForward`.
pub struct MiForwardGpu {
    /// Rows.
    pub n: usize,
    /// Classes.
    pub c: usize,
    /// softmax(logits_a), n x c.
    pub z: F32Buf,
    /// softmax(logits_b), n x c.
    pub w: F32Buf,
    /// The joint P = S / s before the clamp, c x c, f64.
    pub p: CudaSlice<f64>,
    /// G - (2 lambda - 1), c x c.
    pub g0: F32Buf,
    /// G^ = G - <P, G>, c x c.
    pub g_hat: F32Buf,
    /// [loss, H(P'), marginal entropy, s, #clamped P, #clamped m, <P, G>] in f64.
    pub stats: CudaSlice<f64>,
    /// The loss as a one-element f32 buffer.
    pub loss: F32Buf,
}

/// The scalars of an MI forward, copied to the host (for logging and tests).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MiScalars {
    /// L_mi(lambda).
    pub loss: f64,
    /// H(P') over the clamped joint.
    pub joint_entropy: f64,
    /// -sum_c r_c ln m'_c.
    pub marginal_entropy: f64,
    /// Sum of the symmetrised joint counts (= n up to rounding).
    pub s: f64,
    /// Entries of P below EPS.
    pub clamped: usize,
    /// Marginals below EPS.
    pub clamped_marginals: usize,
}

impl MiForwardGpu {
    /// Copies the forward's scalars to the host (waits for the GPU).
    pub fn scalars(&self, gpu: &Gpu) -> Result<MiScalars> {
        let s = gpu.download(&self.stats)?;
        Ok(MiScalars {
            loss: s[0],
            joint_entropy: s[1],
            marginal_entropy: s[2],
            s: s[3],
            clamped: s[4] as usize,
            clamped_marginals: s[5] as usize,
        })
    }
}

/// The IIC loss L_mi(lambda) of two views' logits (n x c each) and everything its backward needs.
/// CPU twin: `cpu::forward` (same clamp semantics; the loss is a sum, not a mean).
pub fn mi_fwd(
    gpu: &Gpu,
    logits_a: &F32Buf,
    logits_b: &F32Buf,
    n: usize,
    c: usize,
    lambda: f32,
) -> Result<MiForwardGpu> {
    mi_fwd_across(gpu, (logits_a, logits_b), n, c, lambda, None)
}

/// [`mi_fwd`] of a data-parallel run's rows on this process: the f64 joint is summed over the
/// processes of `world` (on the device, in rank order) before the entropies. CPU twin:
/// `cpu::mi_fwd_reduced`.
pub fn mi_fwd_across(
    gpu: &Gpu,
    (logits_a, logits_b): (&F32Buf, &F32Buf),
    n: usize,
    c: usize,
    lambda: f32,
    world: Option<&'static crate::dist::World>,
) -> Result<MiForwardGpu> {
    let k = "mi_fwd";
    let (ni, ci) = row_checks(k, n, c, &[("logits_a", logits_a.len()), ("logits_b", logits_b.len())])?;
    if c > MI_MAX_C {
        return Err(Error::shape(format!("{k}: {c} classes, at most {MI_MAX_C} supported")));
    }
    let cc = c * c;
    let rows_per_part = mi_rows_per_part(n, c);
    let parts = n.div_ceil(rows_per_part);
    let rpp = int(k, "rows per part", rows_per_part)?;
    let mut z = gpu.zeros::<f32>(n * c)?;
    let mut w = gpu.zeros::<f32>(n * c)?;
    let mut partials = gpu.zeros::<f32>(parts * cc)?;
    if c <= MI_FUSED_MAX_C {
        let kf = "mi_softmax_joint_fwd_f32";
        let grid = (grid_dim(kf, parts)?, 1, 1);
        launch!(gpu, kf, cfg(grid, BLOCK), logits_a, logits_b, &mut z, &mut w, &mut partials, &ni, &ci, &rpp)?;
    } else {
        let ks = "mi_softmax_fwd_f32";
        launch!(gpu, ks, rows_cfg(ks, n)?, logits_a, logits_b, &mut z, &mut w, &ni, &ci)?;
        let kj = "mi_joint_fwd_f32";
        let tiles = c.div_ceil(64);
        let grid = (grid_dim(kj, parts)?, (tiles * tiles) as u32, 1);
        launch!(gpu, kj, cfg(grid, BLOCK), &z, &w, &mut partials, &ni, &ci, &rpp)?;
    }
    let kr = "mi_reduce_fwd_f32";
    let mut j = gpu.zeros::<f64>(cc)?;
    let (parts_i, cc_i) = (int(kr, "parts", parts)?, int(kr, "C^2", cc)?);
    launch!(
        gpu,
        kr,
        cfg((grid_dim(kr, cc.div_ceil(BLOCK as usize))?, 1, 1), BLOCK),
        &partials,
        &mut j,
        &parts_i,
        &cc_i
    )?;
    if let Some(world) = world {
        crate::cuda::collective::sum_f64(gpu, world, &mut j)?;
    }
    let kf = "mi_finish_fwd_f32";
    let mut p = gpu.zeros::<f64>(cc)?;
    let mut vec = gpu.zeros::<f64>(3 * c)?;
    let mut g0 = gpu.zeros::<f32>(cc)?;
    let mut g_hat = gpu.zeros::<f32>(cc)?;
    let mut stats = gpu.zeros::<f64>(8)?;
    let mut loss = gpu.zeros::<f32>(1)?;
    launch!(
        gpu,
        kf,
        cfg((1, 1, 1), 1024),
        &mut j,
        &mut p,
        &mut vec,
        &mut g0,
        &mut g_hat,
        &mut stats,
        &mut loss,
        &ci,
        &lambda
    )?;
    Ok(MiForwardGpu { n, c, z, w, p, g0, g_hat, stats, loss })
}

/// Gradients of `upstream[0] * L_mi` with respect to both views' logits (n x c each,
/// overwritten); the upstream scalar stays on the device. CPU twin: `cpu::backward`.
pub fn mi_bwd(
    gpu: &Gpu,
    fwd: &MiForwardGpu,
    upstream: &F32Buf,
    grad_a: &mut F32Buf,
    grad_b: &mut F32Buf,
) -> Result<()> {
    let k = "mi_bwd";
    let (n, c) = (fwd.n, fwd.c);
    let (ni, ci) = row_checks(k, n, c, &[("grad_a", grad_a.len()), ("grad_b", grad_b.len())])?;
    need(k, "upstream", upstream.len(), 1)?;
    if c <= MI_FUSED_MAX_C {
        let kb = "mi_bwd_f32";
        launch!(gpu, kb, rows_cfg(kb, n)?, &fwd.z, &fwd.w, &fwd.g_hat, &fwd.stats, upstream, grad_a, grad_b, &ni, &ci)
    } else {
        let kp = "mi_project_bwd_f32";
        let grid = (grid_dim(kp, n.div_ceil(64))?, c.div_ceil(64) as u32, 2);
        launch!(gpu, kp, cfg(grid, BLOCK), &fwd.z, &fwd.w, &fwd.g_hat, &mut *grad_a, &mut *grad_b, &ni, &ci)?;
        let ks = "mi_softmax_bwd_f32";
        launch!(gpu, ks, rows_cfg(ks, n)?, &fwd.z, &fwd.w, &fwd.stats, upstream, grad_a, grad_b, &ni, &ci)
    }
}

// ---------------------------------------------------------------------------------------------
// The ops on GPU tensors (shapes checked by the family's mod.rs), recorded on the tape.

/// The IIC loss of two views' logits, and its statistics copied to the host when `with_stats`
/// (a diagnostic: a training step asks for none, so nothing leaves the device).
pub(crate) fn mutual_info(
    gpu: GpuRef,
    tape: &Tape,
    a: &Tensor,
    b: &Tensor,
    (n, c): (usize, usize),
    lambda: f32,
    with_stats: bool,
    world: Option<&'static crate::dist::World>,
) -> Result<(Tensor, Option<MiScalars>)> {
    let fwd = mi_fwd_across(&gpu, (buf(a)?, buf(b)?), n, c, lambda, world)?;
    // As on the host: this process's rows' part of the whole batch's gradient, times the number
    // of processes (the trainer averages the processes' gradients).
    let ranks = world.map_or(1.0, |w| w.size() as f32);
    let stats = if with_stats { Some(fwd.scalars(&gpu)?) } else { None };
    let loss = wrap(context::copy(&fwd.loss)?, &[])?;
    let (ac, bc) = (a.clone(), b.clone());
    let out = tape.record(loss, &[a, b], move |g, grads| {
        let mut g = here(g, &gpu)?;
        if ranks != 1.0 {
            // The host's `g * ranks`: one f32 product.
            g = crate::ops::scale(&Tape::no_grad(), &g, ranks)?;
        }
        let (mut ga, mut gb) = (alloc(&gpu, &[n, c])?, alloc(&gpu, &[n, c])?);
        mi_bwd(&gpu, &fwd, buf(&g)?, &mut ga, &mut gb)?;
        grads.add_to(&ac, wrap(ga, &[n, c])?)?;
        grads.add_to(&bc, wrap(gb, &[n, c])?)
    });
    Ok((out, stats))
}
