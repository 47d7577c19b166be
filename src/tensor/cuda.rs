//! The tensor layer's kernels on the GPU: the launchers of kernels/tensor.cu (in-place gradient
//! accumulation, CPU twin: the host branch of `Tensor::add_assign`; fill, CPU twin:
//! `Tensor::full`).

use crate::cuda::launch::{flat_cfg, flat_checks, flat_launcher, launch};
use crate::cuda::{F32Buf, Gpu};
use crate::error::Result;

/// acc += g on the first `n` elements (nothing to do for n = 0).
pub(crate) fn add_assign(gpu: &Gpu, acc: &mut F32Buf, g: &F32Buf, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let k = "add_assign_fwd_f32";
    let nl = flat_checks(k, n, &[("acc", acc.len()), ("g", g.len())])?;
    launch!(gpu, k, flat_cfg(n), acc, g, &nl)
}

flat_launcher! {
    /// y[..n] = value. CPU twin: `Tensor::full`.
    fill => "fill_fwd_f32"(y: &mut F32Buf; value: f32)
}
