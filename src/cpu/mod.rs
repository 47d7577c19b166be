//! CPU kernels on plain slices: the reference twin of every CUDA kernel and a fast path of its
//! own. They know nothing of tensors or the tape; shapes are checked by the ops that call them.

pub mod activation;
pub mod batchnorm;
pub mod bias;
pub mod conv;
#[cfg(target_arch = "x86_64")]
pub mod direct_conv;
pub mod gemm;
pub mod mutual_info;
pub mod optim;
pub mod peak;
pub mod pool;
pub mod simd;
pub mod softmax;
#[cfg(target_arch = "x86_64")]
pub mod winograd;

/// Sets the number of worker threads used by GEMM and the conv/BN kernels (once per process;
/// later calls with another count are an error because rayon's global pool is fixed).
pub fn set_threads(n: usize) -> crate::Result<()> {
    if n == 0 {
        return Err(crate::Error::usage("--threads: must be at least 1"));
    }
    match rayon::ThreadPoolBuilder::new().num_threads(n).build_global() {
        Ok(()) => Ok(()),
        Err(_) if rayon::current_num_threads() == n => Ok(()),
        Err(_) => Err(crate::Error::usage(format!(
            "--threads: the thread pool already runs {} threads",
            rayon::current_num_threads()
        ))),
    }
}

/// Worker threads in use.
pub fn threads() -> usize {
    rayon::current_num_threads()
}
