//! cuBLAS SGEMM on row-major operands: the products of the dense layers (and the peak that
//! `muscle bench --device cuda` measures). CPU twin: `cpu::gemm::sgemm`.

use super::buffer::F32Buf;
use super::device::{Backend, Gpu};
use super::launch::{elems, int, need, nonzero};
use crate::error::{Error, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};

/// C = alpha op(A) op(B) + beta C for ROW-MAJOR matrices: op(A) is m x k (A is stored m x k, or
/// k x m when `trans_a`), op(B) is k x n (stored k x n, or n x k when `trans_b`), C is m x n.
/// CPU twin: `cpu::gemm::sgemm`.
///
/// cuBLAS is column-major. A row-major r x c matrix is, byte for byte, the column-major c x r
/// matrix of its transpose, so the row-major product C = op(A) op(B) is computed as the
/// column-major C^T = op(B)^T op(A)^T: the operands are swapped (B first), m and n are swapped,
/// and each leading dimension is the row length of the stored row-major matrix. No data moves.
/// Plain FP32 math (no TF32 unless NVIDIA_TF32_OVERRIDE says so), so it matches the CPU GEMM to
/// f32 rounding.
pub fn sgemm(
    gpu: &Gpu,
    m: usize,
    n: usize,
    k: usize,
    a: &F32Buf,
    trans_a: bool,
    b: &F32Buf,
    trans_b: bool,
    c: &mut F32Buf,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let kn = "sgemm";
    nonzero(kn, &[("m", m), ("n", n), ("k", k)])?;
    need(kn, "A", a.len(), elems(kn, m, k)?)?;
    need(kn, "B", b.len(), elems(kn, k, n)?)?;
    need(kn, "C", c.len(), elems(kn, m, n)?)?;
    let (mi, ni, ki) = (int(kn, "m", m)?, int(kn, "n", n)?, int(kn, "k", k)?);
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let config = GemmConfig {
        transa: op(trans_b),
        transb: op(trans_a),
        m: ni,
        n: mi,
        k: ki,
        alpha,
        lda: if trans_b { ki } else { ni },
        ldb: if trans_a { mi } else { ki },
        beta,
        ldc: ni,
    };
    match gpu.backend() {
        Backend::Driver(d) => {
            let blas = d.blas()?;
            // SAFETY: the three buffers hold at least m k, k n and m n elements (checked above),
            // which is what these dimensions and leading dimensions address.
            unsafe { blas.gemm(config, b.driver()?, a.driver()?, c.driver_mut()?) }
                .map_err(|e| Error::device(format!("{kn}: {e}")))
        }
        #[cfg(muscle_cuda_emu)]
        Backend::Emulated => super::emu::blas::sgemm(&config, b.emulated()?, a.emulated()?, c.emulated_mut()?),
    }
}
