//! Dense layers on the GPU: the products through cuBLAS (`cuda::blas`), the bias through the
//! launchers of kernels/linear.cu (CPU twins in `cpu.rs` beside this file).

use crate::autograd::Tape;
use crate::cuda::blas;
use crate::cuda::launch::{cfg, elems, flat_cfg, grid_dim, int, launch, long, need, nonzero, BLOCK};
use crate::cuda::{CudaSlice, Gpu};
use crate::error::Result;
use crate::ops::gpu::{alloc, buf, here, wrap, GpuRef};
use crate::tensor::Tensor;

/// y[r, j] = b[j] for an rows x cols `y`: the bias a dense layer's GEMM then accumulates onto.
/// CPU twin: `cpu::bias_rows_fwd`.
pub fn bias_rows_fwd(gpu: &Gpu, b: &CudaSlice<f32>, y: &mut CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
    let k = "bias_rows_fwd_f32";
    nonzero(k, &[("rows", rows), ("columns", cols)])?;
    need(k, "b", b.len(), cols)?;
    need(k, "y", y.len(), elems(k, rows, cols)?)?;
    let (rl, ci) = (long(rows), int(k, "columns", cols)?);
    launch!(gpu, k, flat_cfg(rows * cols), b, y, &rl, &ci)
}

/// db[j] = sum over the rows of g[r, j] (row order, as the CPU). CPU twin: `cpu::bias_grad_bwd`.
pub fn bias_grad_bwd(gpu: &Gpu, g: &CudaSlice<f32>, db: &mut CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
    let k = "bias_grad_bwd_f32";
    nonzero(k, &[("rows", rows), ("columns", cols)])?;
    need(k, "g", g.len(), elems(k, rows, cols)?)?;
    need(k, "db", db.len(), cols)?;
    let (ri, ci) = (int(k, "rows", rows)?, int(k, "columns", cols)?);
    launch!(gpu, k, cfg((grid_dim(k, cols.div_ceil(BLOCK as usize))?, 1, 1), BLOCK), g, db, &ri, &ci)
}

// ---------------------------------------------------------------------------------------------
// The ops on GPU tensors (shapes checked by the family's mod.rs), recorded on the tape.

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
    blas::sgemm(&gpu, m, n, kk, buf(a)?, false, buf(b)?, false, &mut y, 1.0, 0.0)?;
    let (ac, bc) = (a.clone(), b.clone());
    Ok(tape.record(wrap(y, &[m, n])?, &[a, b], move |g, grads| {
        let g = here(g, &gpu)?;
        if ac.requires_grad() {
            let mut da = alloc(&gpu, m * kk)?;
            blas::sgemm(&gpu, m, kk, n, buf(&g)?, false, buf(&bc)?, true, &mut da, 1.0, 0.0)?;
            grads.add_to(&ac, wrap(da, &[m, kk])?)?;
        }
        if bc.requires_grad() {
            let mut db = alloc(&gpu, kk * n)?;
            blas::sgemm(&gpu, kk, n, m, buf(&ac)?, true, buf(&g)?, false, &mut db, 1.0, 0.0)?;
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
        bias_rows_fwd(&gpu, buf(b)?, &mut y, n, fout)?;
    }
    let beta = if b.is_some() { 1.0 } else { 0.0 };
    blas::sgemm(&gpu, n, fout, fin, buf(x)?, false, buf(w)?, true, &mut y, 1.0, beta)?;
    let (xc, wc, bc) = (x.clone(), w.clone(), b.cloned());
    let mut inputs = vec![x, w];
    inputs.extend(b);
    Ok(tape.record(wrap(y, &[n, fout])?, &inputs, move |g, grads| {
        let g = here(g, &gpu)?;
        if xc.requires_grad() {
            let mut dx = alloc(&gpu, n * fin)?;
            blas::sgemm(&gpu, n, fin, fout, buf(&g)?, false, buf(&wc)?, false, &mut dx, 1.0, 0.0)?;
            grads.add_to(&xc, wrap(dx, &[n, fin])?)?;
        }
        if wc.requires_grad() {
            let mut dw = alloc(&gpu, fout * fin)?;
            blas::sgemm(&gpu, fout, fin, n, buf(&g)?, true, buf(&xc)?, false, &mut dw, 1.0, 0.0)?;
            grads.add_to(&wc, wrap(dw, &[fout, fin])?)?;
        }
        if let Some(bc) = bc.filter(|b| b.requires_grad()) {
            let mut db = alloc(&gpu, fout)?;
            bias_grad_bwd(&gpu, buf(&g)?, &mut db, n, fout)?;
            grads.add_to(&bc, wrap(db, &[fout])?)?;
        }
        Ok(())
    }))
}
