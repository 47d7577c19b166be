//! The CUDA runtime (feature `cuda`): a context with the hand-written kernels of `kernels/*.cu`
//! loaded ([`Gpu`]), per-thread contexts, what every launcher shares ([`launch`]: the launch
//! macro and the size checks), cuBLAS SGEMM ([`blas`]) and the data-parallel sums over NCCL
//! ([`collective`], with its kernels/collective.cu). The launchers themselves live with
//! their op family (`src/ops/<family>/cuda.rs`, beside the CPU twins they are tested against).
//!
//! Like `cpu/`, this module knows nothing of tensors or the tape: it works on [`CudaSlice`]s and
//! sizes. cudarc loads libcuda, libnvrtc and libcublas at run time (`dynamic-loading`), so this
//! compiles and links everywhere; [`probe`] tells whether a GPU is usable without panicking.
//!
//! The PTX comes from build.rs (nvcc at build time, `-arch=compute_80`) or, when nvcc was
//! missing, from NVRTC compiling the embedded sources when a [`Gpu`] is created.

pub mod blas;
pub mod buffer;
pub mod collective;
pub mod context;
pub mod device;
pub mod elem;
#[cfg(muscle_cuda_emu)]
pub mod emu;
pub mod launch;

pub use buffer::{CudaSlice, DeviceElem, F32Buf};
pub use device::{emulation_requested, probe, Gpu, GpuInfo, PtxOrigin, Transfers};

/// The kernel files as build.rs embedded them (source always, PTX when nvcc was found).
pub mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}
