//! The CUDA backend (feature `cuda`): a context with the hand-written kernels of `kernels/*.cu`
//! loaded ([`Gpu`]), one safe launch function per kernel ([`kernels`]) and a cuBLAS SGEMM.
//!
//! Like `cpu/`, this module knows nothing of tensors or the tape: it works on [`CudaSlice`]s and
//! sizes, and every kernel has a CPU twin in `cpu/` that its parity test (tests/gpu.rs) compares
//! against. cudarc loads libcuda, libnvrtc and libcublas at run time (`dynamic-loading`), so this
//! compiles and links everywhere; [`probe`] tells whether a GPU is usable without panicking.
//!
//! The PTX comes from build.rs (nvcc at build time, `-arch=compute_80`) or, when nvcc was
//! missing, from NVRTC compiling the embedded sources when a [`Gpu`] is created.

pub mod context;
#[cfg(feature = "cudnn")]
pub mod cudnn;
pub mod device;
pub mod kernels;

pub use cudarc::driver::{CudaSlice, DeviceRepr};
pub use device::{probe, Gpu, GpuInfo, PtxOrigin};

/// The kernel files as build.rs embedded them (source always, PTX when nvcc was found).
pub mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
