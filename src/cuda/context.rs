//! The GPU contexts the tensor ops run on: one [`Gpu`] per device ordinal and thread, created on
//! first use and kept for the thread's life (loading the kernel modules takes a moment; a training
//! loop asks for the context at every op).
//!
//! Per thread because the cuDNN handle is not `Send` (ops::conv::cuda keeps its own per-thread cache
//! the same way). Every context of one ordinal shares the device's primary CUDA context, so a
//! buffer made on one thread is valid on another.

use super::buffer::CudaSlice;
use super::device::Gpu;
use crate::error::{Error, ErrorKind, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

thread_local! {
    static GPUS: RefCell<HashMap<usize, Rc<Gpu>>> = RefCell::new(HashMap::new());
}

/// The context of GPU `ordinal` on this thread (created, with every kernel loaded, on first use).
pub fn gpu(ordinal: usize) -> Result<Rc<Gpu>> {
    if let Some(g) = GPUS.with(|m| m.borrow().get(&ordinal).cloned()) {
        return Ok(g);
    }
    let g = Rc::new(Gpu::new(ordinal).map_err(|e| e.context(format!("cuda:{ordinal}")))?);
    GPUS.with(|m| m.borrow_mut().insert(ordinal, g.clone()));
    Ok(g)
}

/// The context that owns `s`.
pub fn gpu_of(s: &CudaSlice<f32>) -> Result<Rc<Gpu>> {
    gpu(s.ordinal())
}

/// A new zeroed buffer for an f32 tensor of `shape` on `gpu` (at least one element: CUDA does not
/// allocate 0); out of memory, the error names the shape and its size.
pub fn zeros(gpu: &Gpu, shape: &[usize]) -> Result<CudaSlice<f32>> {
    let len = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::shape(format!("a {shape:?} f32 tensor has more elements than memory can address")))?;
    gpu.zeros::<f32>(len.max(1)).map_err(|e| match e.kind() {
        // The device's message says how much was free; this one says what did not fit.
        ErrorKind::OutOfMemory => {
            e.context(format!("a {shape:?} f32 tensor ({})", crate::memory::human(len as f64 * 4.0)))
        }
        _ => e,
    })
}

/// A device-to-device copy of `s` (same length).
pub fn copy(s: &CudaSlice<f32>) -> Result<CudaSlice<f32>> {
    gpu_of(s)?.copy(s)
}
