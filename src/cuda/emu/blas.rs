//! The emulated device's cuBLAS stand-in: SGEMM as a reference loop that takes cuBLAS's own
//! argument conventions (column-major operands, `transa`/`transb`, leading dimensions, alpha and
//! beta, C not read when beta is 0) and checks them as cuBLAS would, plus every operand's extent
//! against its buffer. What it tests is the project's mapping of row-major products onto cuBLAS
//! (`cuda::blas`), not cuBLAS itself.

use super::EmuBuffer;
use crate::error::{Error, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::GemmConfig;

/// The elements a column-major `rows` x `cols` operand with leading dimension `ld` spans, after
/// checking `ld >= rows` as cuBLAS does (CUBLAS_STATUS_INVALID_VALUE otherwise).
fn extent(what: &str, rows: i32, cols: i32, ld: i32) -> Result<usize> {
    if ld < rows.max(1) {
        return Err(Error::device(format!(
            "emulated cuBLAS sgemm: CUBLAS_STATUS_INVALID_VALUE: ld{what} = {ld} < {} rows of {what}",
            rows.max(1)
        )));
    }
    Ok(if rows == 0 || cols == 0 { 0 } else { ld as usize * (cols as usize - 1) + rows as usize })
}

/// cublasSgemm: C = alpha op(A) op(B) + beta C, column-major, C m x n, op(A) m x k, op(B) k x n.
pub fn sgemm(cfg: &GemmConfig<f32>, a: &EmuBuffer<f32>, b: &EmuBuffer<f32>, c: &mut EmuBuffer<f32>) -> Result<()> {
    let (m, n, k) = (cfg.m, cfg.n, cfg.k);
    if m < 0 || n < 0 || k < 0 {
        return Err(Error::device(format!("emulated cuBLAS sgemm: CUBLAS_STATUS_INVALID_VALUE: m {m}, n {n}, k {k}")));
    }
    let ta = cfg.transa != cublasOperation_t::CUBLAS_OP_N;
    let tb = cfg.transb != cublasOperation_t::CUBLAS_OP_N;
    // Stored shapes: A is m x k (k x m when transposed), B is k x n (n x k when transposed).
    let (ar, ac) = if ta { (k, m) } else { (m, k) };
    let (br, bc) = if tb { (n, k) } else { (k, n) };
    for (what, need, have) in [
        ("A", extent("a", ar, ac, cfg.lda)?, a.len()),
        ("B", extent("b", br, bc, cfg.ldb)?, b.len()),
        ("C", extent("c", m, n, cfg.ldc)?, c.len()),
    ] {
        if need > have {
            return Err(Error::device(format!(
                "emulated cuBLAS sgemm: {what} spans {need} elements (m {m}, n {n}, k {k}, lda {}, ldb {}, ldc {}), its buffer holds {have}",
                cfg.lda, cfg.ldb, cfg.ldc
            )));
        }
    }
    let (av, bv, mut cv) = (a.to_host()?, b.to_host()?, c.to_host()?);
    let (lda, ldb, ldc) = (cfg.lda as usize, cfg.ldb as usize, cfg.ldc as usize);
    let op_a = |i: usize, l: usize| if ta { av[l + i * lda] } else { av[i + l * lda] };
    let op_b = |l: usize, j: usize| if tb { bv[j + l * ldb] } else { bv[l + j * ldb] };
    for j in 0..n as usize {
        for i in 0..m as usize {
            let dot = (0..k as usize).fold(0.0f32, |acc, l| acc + op_a(i, l) * op_b(l, j));
            let out = &mut cv[i + j * ldc];
            // beta == 0: C is not read (it may hold NaN), as in cuBLAS.
            *out = if cfg.beta == 0.0 { cfg.alpha * dot } else { cfg.alpha * dot + cfg.beta * *out };
        }
    }
    c.write_host(&cv)
}
