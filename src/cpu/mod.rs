//! CPU kernels that several op families share, on plain slices: GEMM, the convolution algorithms
//! (direct AVX-512, Winograd, im2col + GEMM; `ops::conv` chooses among them), SIMD helpers,
//! machine peaks, and the worker-thread setting. Each op family's own CPU kernels live in its
//! folder (`src/ops/<family>/cpu.rs`). Nothing here knows tensors or the tape.

#[cfg(target_arch = "x86_64")]
pub mod direct_conv;
pub mod gemm;
pub mod im2col;
pub mod peak;
pub mod simd;
#[cfg(target_arch = "x86_64")]
pub mod winograd;

/// Sets the number of worker threads used by GEMM and the conv/BN kernels (once per process;
/// later calls with another count are an error because rayon's global pool is fixed).
pub fn set_threads(n: usize) -> crate::error::Result<()> {
    if n == 0 {
        return Err(crate::error::Error::usage("--threads: must be at least 1"));
    }
    match rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
        Ok(()) => Ok(()),
        Err(_) if rayon::current_num_threads() == n => Ok(()),
        Err(_) => Err(crate::error::Error::usage(format!(
            "--threads: the thread pool already runs {} threads",
            rayon::current_num_threads()
        ))),
    }
}

/// Worker threads in use.
pub fn threads() -> usize {
    rayon::current_num_threads()
}
