//! The launchers of kernels/mixmatch.cu (CPU twins: `cpu.rs` beside this file).

use crate::cuda::launch::{elems, flat_cfg, int, launch, long, need, nonzero, rows_cfg};
use crate::cuda::{CudaSlice, F32Buf, Gpu};
use crate::error::Result;

/// q (nu x c) = the sharpened average of the two views' rows of p (2nu x c), with 1/T =
/// `inv_t`. CPU twin: `cpu::guess`.
pub fn guess_fwd(gpu: &Gpu, p: &F32Buf, q: &mut F32Buf, nu: usize, c: usize, inv_t: f32) -> Result<()> {
    let k = "mixmatch_guess_fwd_f32";
    nonzero(k, &[("rows", nu), ("columns", c)])?;
    let nc = elems(k, nu, c)?;
    need(k, "p", p.len(), elems(k, 2, nc)?)?;
    need(k, "q", q.len(), nc)?;
    // The kernel addresses row nu + i: 2nu rows must fit its int.
    int(k, "2 x rows", elems(k, 2, nu)?)?;
    let (nui, ci) = (int(k, "rows", nu)?, int(k, "columns", c)?);
    launch!(gpu, k, rows_cfg(k, nu)?, p, q, &nui, &ci, &inv_t)
}

/// y (n x c) = one-hot rows of `labels`. CPU twin: `cpu::one_hot`.
pub fn one_hot_fwd(gpu: &Gpu, labels: &CudaSlice<i32>, y: &mut F32Buf, n: usize, c: usize) -> Result<()> {
    let k = "one_hot_fwd_f32";
    nonzero(k, &[("rows", n), ("columns", c)])?;
    need(k, "labels", labels.len(), n)?;
    need(k, "y", y.len(), elems(k, n, c)?)?;
    let ci = int(k, "columns", c)?;
    launch!(gpu, k, flat_cfg(n * c), labels, y, &long(n), &ci)
}

/// y = mu x + (1 - mu) x[perm] over `rows` rows of `row` elements. CPU twin: `cpu::mix_rows`.
pub fn mix_rows_fwd(
    gpu: &Gpu,
    x: &F32Buf,
    perm: &CudaSlice<i32>,
    y: &mut F32Buf,
    (rows, row): (usize, usize),
    mu: f32,
) -> Result<()> {
    let k = "mix_rows_fwd_f32";
    nonzero(k, &[("rows", rows), ("row length", row)])?;
    let total = elems(k, rows, row)?;
    need(k, "x", x.len(), total)?;
    need(k, "y", y.len(), total)?;
    need(k, "perm", perm.len(), rows)?;
    launch!(gpu, k, flat_cfg(total), x, perm, y, &long(rows), &long(row), &mu)
}
