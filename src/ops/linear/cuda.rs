//! Dense layers on the GPU: the products through cuBLAS (`cuda::blas`), the bias through the
//! launchers of kernels/linear.cu (CPU twins in `cpu.rs` beside this file).

use super::Product;
use crate::autograd::Tape;
use crate::cuda::blas;
use crate::cuda::launch::{cfg, elems, flat_cfg, grid_dim, int, launch, long, need, nonzero, BLOCK};
use crate::cuda::{F32Buf, Gpu};
use crate::error::Result;
use crate::ops::gpu::{alloc, buf, here, wrap, GpuRef};
use crate::tensor::Tensor;

/// y[r, j] = b[j] for an rows x cols `y`: the bias a dense layer's GEMM then accumulates onto.
/// CPU twin: `cpu::bias_rows_fwd`.
pub fn bias_rows_fwd(gpu: &Gpu, b: &F32Buf, y: &mut F32Buf, rows: usize, cols: usize) -> Result<()> {
    let k = "bias_rows_fwd_f32";
    nonzero(k, &[("rows", rows), ("columns", cols)])?;
    need(k, "b", b.len(), cols)?;
    need(k, "y", y.len(), elems(k, rows, cols)?)?;
    let (rl, ci) = (long(rows), int(k, "columns", cols)?);
    launch!(gpu, k, flat_cfg(rows * cols), b, y, &rl, &ci)
}

/// db[j] = sum over the rows of g[r, j] (row order, as the CPU). CPU twin: `cpu::bias_grad_bwd`.
pub fn bias_grad_bwd(gpu: &Gpu, g: &F32Buf, db: &mut F32Buf, rows: usize, cols: usize) -> Result<()> {
    let k = "bias_grad_bwd_f32";
    nonzero(k, &[("rows", rows), ("columns", cols)])?;
    need(k, "g", g.len(), elems(k, rows, cols)?)?;
    need(k, "db", db.len(), cols)?;
    let (ri, ci) = (int(k, "rows", rows)?, int(k, "columns", cols)?);
    launch!(gpu, k, cfg((grid_dim(k, cols.div_ceil(BLOCK as usize))?, 1, 1), BLOCK), g, db, &ri, &ci)
}

// ---------------------------------------------------------------------------------------------
// The ops on GPU tensors (shapes checked by the family's mod.rs), recorded on the tape.

/// `a @ B (+ bias)` through cuBLAS (see `Product` for the layouts): the bias is written first and
/// cuBLAS accumulates onto it.
pub(crate) fn product(
    gpu: GpuRef,
    tape: &Tape,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    p: Product,
) -> Result<Tensor> {
    let Product { m, k, n, rhs_t } = p;
    let mut y = alloc(&gpu, &[m, n])?;
    if let Some(bias) = bias {
        bias_rows_fwd(&gpu, buf(bias)?, &mut y, m, n)?;
    }
    let beta = if bias.is_some() { 1.0 } else { 0.0 };
    blas::sgemm(&gpu, m, n, k, buf(a)?, false, buf(b)?, rhs_t, &mut y, 1.0, beta)?;
    let (ac, bc, biasc) = (a.clone(), b.clone(), bias.cloned());
    let mut inputs = vec![a, b];
    inputs.extend(bias);
    Ok(tape.record(wrap(y, &[m, n])?, &inputs, move |g, grads| {
        let g = here(g, &gpu)?;
        if ac.requires_grad() {
            let mut da = alloc(&gpu, &[m, k])?;
            blas::sgemm(&gpu, m, k, n, buf(&g)?, false, buf(&bc)?, !rhs_t, &mut da, 1.0, 0.0)?;
            grads.add_to(&ac, wrap(da, &[m, k])?)?;
        }
        if bc.requires_grad() {
            let mut db = alloc(&gpu, bc.shape())?;
            if rhs_t {
                blas::sgemm(&gpu, n, k, m, buf(&g)?, true, buf(&ac)?, false, &mut db, 1.0, 0.0)?;
            } else {
                blas::sgemm(&gpu, k, n, m, buf(&ac)?, true, buf(&g)?, false, &mut db, 1.0, 0.0)?;
            }
            grads.add_to(&bc, wrap(db, bc.shape())?)?;
        }
        if let Some(biasc) = biasc.filter(|b| b.requires_grad()) {
            let mut dbias = alloc(&gpu, &[n])?;
            bias_grad_bwd(&gpu, buf(&g)?, &mut dbias, m, n)?;
            grads.add_to(&biasc, wrap(dbias, &[n])?)?;
        }
        Ok(())
    }))
}
