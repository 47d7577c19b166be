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

pub(crate) fn alloc(gpu: &Gpu, n: usize) -> Result<CudaSlice<f32>> {
    context::zeros(gpu, n)
}

pub(crate) fn wrap(s: CudaSlice<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_cuda(s, shape.to_vec())
}

/// `g` on `gpu` (a gradient that arrives from the host, e.g. a seed, is uploaded).
pub(crate) fn here(g: &Tensor, gpu: &Gpu) -> Result<Tensor> {
    g.to_device(Device::Cuda(gpu.info().ordinal))
}
