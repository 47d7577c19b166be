//! What every family's GPU path shares: the GPU a set of input tensors lives on (the one device
//! check of each op), and the buffer <-> tensor glue.

use crate::cuda::{context, CudaSlice, Gpu};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::rc::Rc;

/// A shared handle on the GPU an op runs on (kept by its backward closure).
pub(crate) type GpuRef = Rc<Gpu>;

/// The GPU that every tensor of `ts` lives on; None when all are on the host; an error naming
/// `what` when they are on different devices.
pub(crate) fn on_gpu(what: &str, ts: &[&Tensor]) -> Result<Option<GpuRef>> {
    let Some(first) = ts.first().map(|t| t.device()) else { return Ok(None) };
    if let Some(other) = ts.iter().map(|t| t.device()).find(|&d| d != first) {
        return Err(Error::device(format!("{what}: inputs on different devices ({first} and {other})")));
    }
    match first {
        Device::Cpu => Ok(None),
        Device::Cuda(i) => context::gpu(i).map(Some),
    }
}

pub(crate) fn buf(t: &Tensor) -> Result<&CudaSlice<f32>> {
    t.cuda_slice()
}

/// A zeroed device buffer for an op's f32 tensor of `shape` (at least one element); out of
/// memory, the error names the shape.
pub(crate) fn alloc(gpu: &Gpu, shape: &[usize]) -> Result<CudaSlice<f32>> {
    context::zeros(gpu, shape)
}

pub(crate) fn wrap(s: CudaSlice<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_cuda(s, shape.to_vec())
}

/// `g` on `gpu` (a gradient that arrives from the host, e.g. a seed, is uploaded).
pub(crate) fn here(g: &Tensor, gpu: &Gpu) -> Result<Tensor> {
    g.to_device(Device::Cuda(gpu.info().ordinal))
}

#[cfg(all(test, muscle_cuda_emu))]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    /// An op's buffer that does not fit is one line naming the tensor's shape, its size and the
    /// device's free memory (4 TiB fits no emulated memory, whatever MUSCLE_CUDA_EMU_MEMORY says).
    #[test]
    fn out_of_memory_names_the_shape() {
        if !crate::cuda::emulation_requested() {
            eprintln!("skipped: ops::gpu: set MUSCLE_CUDA_EMU=1 for the emulated device");
            return;
        }
        let gpu = context::gpu(0).expect("the emulated device");
        let e = alloc(&gpu, &[1 << 20, 1 << 20]).expect_err("a 4 TiB buffer");
        let text = e.to_string();
        assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{text}");
        assert!(text.starts_with("a [1048576, 1048576] f32 tensor (4.0 TiB): out of memory on cuda:0"), "{text}");
        assert!(text.contains("free") && !text.contains('\n'), "{text}");
    }
}
