//! Tensors: a shape and a shared storage handle, identified by an id the tape keys gradients by.
//!
//! A tensor is immutable once an op has read it; `data_mut` copies on write when the storage is
//! shared, so the optimizer updates parameters in place once the tape that captured them is gone.

use crate::device::Device;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A unique tensor identity; gradients are accumulated by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn fresh() -> TensorId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Where a tensor's elements are stored.
#[derive(Debug)]
pub enum Storage {
    /// Host memory, f32, contiguous row-major (NCHW for images).
    Cpu(Vec<f32>),
}

impl Clone for Storage {
    fn clone(&self) -> Storage {
        match self {
            Storage::Cpu(v) => {
                let mut c = crate::pool::take(v.len());
                c.copy_from_slice(v);
                Storage::Cpu(c)
            }
        }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        match self {
            Storage::Cpu(v) => crate::pool::give(std::mem::take(v)),
        }
    }
}

/// An f32 tensor, contiguous, row-major.
#[derive(Debug, Clone)]
pub struct Tensor {
    id: TensorId,
    shape: Vec<usize>,
    storage: Arc<Storage>,
    requires_grad: bool,
}

/// Formats a shape as `[a, b, c]`.
pub fn fmt_shape(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl Tensor {
    /// A CPU tensor from `data` laid out as `shape`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::shape(format!(
                "tensor of shape {} needs {n} elements, got {}",
                fmt_shape(shape),
                data.len()
            )));
        }
        Ok(Tensor::from_storage(Storage::Cpu(data), shape.to_vec(), false))
    }

    pub(crate) fn from_storage(storage: Storage, shape: Vec<usize>, requires_grad: bool) -> Tensor {
        Tensor { id: TensorId::fresh(), shape, storage: Arc::new(storage), requires_grad }
    }

    /// An output of an op on the CPU (shape already checked by the op).
    pub(crate) fn cpu(data: Vec<f32>, shape: Vec<usize>) -> Tensor {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        Tensor::from_storage(Storage::Cpu(data), shape, false)
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 0.0)
    }

    /// A tensor filled with `value`.
    pub fn full(shape: &[usize], value: f32) -> Tensor {
        let mut v = crate::pool::take(shape.iter().product());
        v.fill(value);
        Tensor::cpu(v, shape.to_vec())
    }

    /// A 0-dimensional tensor.
    pub fn scalar(value: f32) -> Tensor {
        Tensor::cpu(vec![value], vec![])
    }

    /// This tensor as a trainable leaf: same values, new identity, gradients tracked.
    pub fn into_param(self) -> Tensor {
        Tensor { id: TensorId::fresh(), requires_grad: true, ..self }
    }

    /// The same values under a new identity that the tape does not track.
    pub fn detach(&self) -> Tensor {
        Tensor { id: TensorId::fresh(), requires_grad: false, ..self.clone() }
    }

    /// The tensor's identity.
    pub fn id(&self) -> TensorId {
        self.id
    }

    /// Whether gradients flow to this tensor (a parameter, or computed from one).
    pub fn requires_grad(&self) -> bool {
        self.requires_grad
    }

    pub(crate) fn set_requires_grad(mut self, r: bool) -> Tensor {
        self.requires_grad = r;
        self
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The device the storage lives on.
    pub fn device(&self) -> Device {
        match &*self.storage {
            Storage::Cpu(_) => Device::Cpu,
        }
    }

    /// The elements, for a CPU tensor.
    pub fn data(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(v) => Ok(v),
        }
    }

    /// Mutable elements (copied first if another tensor shares the storage).
    pub fn data_mut(&mut self) -> Result<&mut [f32]> {
        match Arc::make_mut(&mut self.storage) {
            Storage::Cpu(v) => Ok(v),
        }
    }

    /// The elements copied into a Vec.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        Ok(self.data()?.to_vec())
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        let d = self.data()?;
        if d.len() != 1 {
            return Err(Error::shape(format!(
                "item() needs a one-element tensor, got shape {}",
                fmt_shape(&self.shape)
            )));
        }
        Ok(d[0])
    }

    /// Same storage, another shape of the same size; untracked (use `ops::reshape` under a tape).
    pub fn reshaped(&self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(Error::shape(format!("cannot reshape {} to {}", fmt_shape(&self.shape), fmt_shape(shape))));
        }
        Ok(Tensor {
            id: TensorId::fresh(),
            shape: shape.to_vec(),
            storage: self.storage.clone(),
            requires_grad: self.requires_grad,
        })
    }

    /// Checks the rank and returns the dims, naming `what` in the error.
    pub fn dims<const R: usize>(&self, what: &str) -> Result<[usize; R]> {
        self.shape
            .as_slice()
            .try_into()
            .map_err(|_| Error::shape(format!("{what}: expected a {R}-d tensor, got shape {}", fmt_shape(&self.shape))))
    }

    /// Checks that `other` has the same shape, naming `what` and both shapes in the error.
    pub fn same_shape(&self, other: &Tensor, what: &str) -> Result<()> {
        if self.shape != other.shape {
            return Err(Error::shape(format!(
                "{what}: shapes differ: {} vs {}",
                fmt_shape(&self.shape),
                fmt_shape(&other.shape)
            )));
        }
        Ok(())
    }

    /// Whether every element is finite.
    pub fn all_finite(&self) -> Result<bool> {
        Ok(self.data()?.iter().all(|v| v.is_finite()))
    }
}
