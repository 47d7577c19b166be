//! Tensors: a shape and a shared storage handle, identified by an id the tape keys gradients by.
//!
//! A tensor is immutable once an op has read it; `data_mut` copies on write when the storage is
//! shared, so the optimizer updates parameters in place once the tape that captured them is gone.

#[cfg(feature = "cuda")]
mod cuda;

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
    /// GPU memory, same layout; the buffer may be longer than the tensor (never shorter).
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaSlice<f32>),
}

impl Storage {
    /// A copy on the same device (GPU copies can fail, so this is not `Clone`).
    fn try_clone(&self) -> Result<Storage> {
        match self {
            Storage::Cpu(v) => {
                let mut c = crate::pool::take(v.len());
                c.copy_from_slice(v);
                Ok(Storage::Cpu(c))
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => crate::cuda::context::copy(s).map(Storage::Cuda),
        }
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        match self {
            Storage::Cpu(v) => crate::pool::give(std::mem::take(v)),
            // The slice frees itself (stream-ordered) when dropped.
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {}
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
    recompute: Option<Recompute>,
}

/// Regenerates a tensor's elements bit for bit, on its device, from what its producer's backward
/// keeps anyway (batch norm's input and per-channel affine), so that an op saving this tensor for
/// its backward can keep the recipe instead of the elements (`autograd::Saved`).
#[derive(Clone)]
pub struct Recompute {
    run: Arc<dyn Fn() -> Result<Tensor> + Send + Sync>,
    affine: Option<Arc<AffineRecipe>>,
}

/// What a recipe computes when it is a per-channel affine and activation of one tensor (a
/// training batch norm's output): for a kernel that applies it as it reads `x`
/// (`kernel_args::InputAffine`), so that not even the backward writes the output out.
#[derive(Debug)]
pub struct AffineRecipe {
    /// The input, NCHW (on the CPU).
    pub x: Tensor,
    /// Per channel factor.
    pub scale: Vec<f32>,
    /// Per channel offset.
    pub shift: Vec<f32>,
    /// LeakyReLU slope, when fused.
    pub slope: Option<f32>,
}

impl Recompute {
    /// The elements, computed again (a tensor of its own identity: see `Tensor::restore`).
    pub fn run(&self) -> Result<Tensor> {
        (self.run)()
    }

    /// The affine the recipe applies, when it is one.
    pub fn affine(&self) -> Option<&AffineRecipe> {
        self.affine.as_deref()
    }
}

impl std::fmt::Debug for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recompute")
    }
}

/// A tensor's identity, shape and gradient tracking without its elements: what a backward
/// needs to hand a gradient back to an input whose values it does not read.
#[derive(Clone, Debug)]
pub struct TensorRef {
    id: TensorId,
    shape: Vec<usize>,
    requires_grad: bool,
}

impl TensorRef {
    /// The tensor's identity.
    pub fn id(&self) -> TensorId {
        self.id
    }
    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Whether gradients flow to the tensor.
    pub fn requires_grad(&self) -> bool {
        self.requires_grad
    }
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
        Tensor { id: TensorId::fresh(), shape, storage: Arc::new(storage), requires_grad, recompute: None }
    }

    /// `t`'s elements under `r`'s identity: a saved input whose elements were recomputed for the
    /// backward.
    pub(crate) fn restore(mut t: Tensor, r: &TensorRef) -> Result<Tensor> {
        if t.shape != r.shape {
            return Err(Error::shape(format!(
                "a recomputed tensor of shape {} stands for one of shape {}",
                fmt_shape(&t.shape),
                fmt_shape(&r.shape)
            )));
        }
        (t.id, t.requires_grad, t.recompute) = (r.id, r.requires_grad, None);
        Ok(t)
    }

    /// The same tensor, carrying a recipe that recomputes its elements bit for bit.
    #[cfg(feature = "cuda")]
    pub(crate) fn with_recompute(mut self, f: impl Fn() -> Result<Tensor> + Send + Sync + 'static) -> Tensor {
        self.recompute = Some(Recompute { run: Arc::new(f), affine: None });
        self
    }

    /// The same tensor, carrying a recipe that recomputes its elements bit for bit and is
    /// `affine` (which `f` computes as `kernel_args::InputAffine` documents).
    pub(crate) fn with_affine_recompute(
        mut self,
        f: impl Fn() -> Result<Tensor> + Send + Sync + 'static,
        affine: AffineRecipe,
    ) -> Tensor {
        self.recompute = Some(Recompute { run: Arc::new(f), affine: Some(Arc::new(affine)) });
        self
    }

    /// The recipe that recomputes this tensor's elements, if its producer left one.
    pub fn recompute(&self) -> Option<&Recompute> {
        self.recompute.as_ref()
    }

    /// A handle that tells a test whether this tensor's elements are still held by anyone.
    #[cfg(test)]
    pub(crate) fn storage_probe(&self) -> std::sync::Weak<Storage> {
        Arc::downgrade(&self.storage)
    }

    /// Identity, shape and gradient tracking, without the elements.
    pub fn identity(&self) -> TensorRef {
        TensorRef { id: self.id, shape: self.shape.clone(), requires_grad: self.requires_grad }
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

    /// A tensor filled with `value`, made on `device` (no upload on a GPU).
    pub fn full_on(device: Device, shape: &[usize], value: f32) -> Result<Tensor> {
        match device {
            Device::Cpu => Ok(Tensor::full(shape, value)),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let n: usize = shape.iter().product();
                let gpu = crate::cuda::context::gpu(i)?;
                let mut buf = crate::cuda::context::zeros(&gpu, shape)?;
                if n > 0 {
                    cuda::fill(&gpu, &mut buf, n, value)?;
                }
                Tensor::from_cuda(buf, shape.to_vec())
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::device("a CUDA tensor in a build without the `cuda` feature")),
        }
    }

    /// The values of one-element tensors `ts` (all on one device), copied to the host together:
    /// on a GPU they are gathered into one buffer on the device and downloaded once (a step's
    /// loss terms cost one transfer, not one per term).
    pub fn scalars_to_host(ts: &[&Tensor]) -> Result<Vec<f32>> {
        if let Some(t) = ts.iter().find(|t| t.numel() != 1) {
            return Err(Error::shape(format!("scalars_to_host: a tensor of shape {}", fmt_shape(&t.shape))));
        }
        let Some(first) = ts.first() else { return Ok(Vec::new()) };
        match first.device() {
            Device::Cpu => ts.iter().map(|t| t.item()).collect(),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let gpu = crate::cuda::context::gpu(i)?;
                let mut packed = crate::cuda::context::zeros(&gpu, &[ts.len()])?;
                for (at, t) in ts.iter().enumerate() {
                    let t = t.to_device(Device::Cuda(i))?;
                    gpu.copy_range(t.cuda_slice()?, 0..1, &mut packed, at)?;
                }
                gpu.download(&packed)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::device("a CUDA tensor in a build without the `cuda` feature")),
        }
    }

    /// A new tensor of `shape` holding elements `from` of this one's storage, on its device
    /// (untracked; a device-to-device copy on a GPU).
    pub fn copy_range(&self, from: std::ops::Range<usize>, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != from.len() || from.end > self.numel() {
            return Err(Error::shape(format!(
                "copy of elements {from:?} of a tensor {} into shape {}",
                fmt_shape(&self.shape),
                fmt_shape(shape)
            )));
        }
        match &*self.storage {
            Storage::Cpu(v) => Ok(Tensor::cpu(v[from].to_vec(), shape.to_vec())),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => {
                let gpu = crate::cuda::context::gpu(s.ordinal())?;
                let mut out = crate::cuda::context::zeros(&gpu, shape)?;
                gpu.copy_range(s, from, &mut out, 0)?;
                Tensor::from_cuda(out, shape.to_vec())
            }
        }
    }

    /// A 0-dimensional tensor.
    pub fn scalar(value: f32) -> Tensor {
        Tensor::cpu(vec![value], vec![])
    }

    /// This tensor as a trainable leaf: same values, new identity, gradients tracked.
    pub fn into_param(self) -> Tensor {
        Tensor { id: TensorId::fresh(), requires_grad: true, recompute: None, ..self }
    }

    /// The same values under a new identity that the tape does not track.
    pub fn detach(&self) -> Tensor {
        Tensor { id: TensorId::fresh(), requires_grad: false, recompute: None, ..self.clone() }
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
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Device::Cuda(s.ordinal()),
        }
    }

    /// The elements, for a CPU tensor (a GPU tensor is an error: use `to_vec`).
    pub fn data(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Err(self.not_on_host(s)),
        }
    }

    /// Mutable elements of a CPU tensor (copied first if another tensor shares the storage).
    pub fn data_mut(&mut self) -> Result<&mut [f32]> {
        #[cfg(feature = "cuda")]
        if let Storage::Cuda(s) = &*self.storage {
            return Err(self.not_on_host(s));
        }
        // The recipe would recompute the values before this write.
        self.recompute = None;
        self.unshare()?;
        let shape = fmt_shape(&self.shape);
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Cpu(v)) => Ok(v),
            #[cfg(feature = "cuda")]
            Some(Storage::Cuda(s)) => {
                Err(Error::device(format!("tensor {shape} is on cuda:{}, not on the host", s.ordinal())))
            }
            None => Err(Error::device(format!("tensor {shape}: storage still shared after a copy"))),
        }
    }

    /// Gives this tensor its own storage if another tensor shares it (copy on write).
    fn unshare(&mut self) -> Result<()> {
        if Arc::get_mut(&mut self.storage).is_none() {
            self.storage = Arc::new(self.storage.try_clone()?);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn not_on_host(&self, s: &crate::cuda::CudaSlice<f32>) -> Error {
        Error::device(format!(
            "tensor {} is on cuda:{}; copy it to the host first (to_vec / to_device)",
            fmt_shape(&self.shape),
            s.ordinal()
        ))
    }

    /// The GPU buffer of a CUDA tensor (at least `numel` elements).
    #[cfg(feature = "cuda")]
    pub fn cuda_slice(&self) -> Result<&crate::cuda::CudaSlice<f32>> {
        match &*self.storage {
            Storage::Cuda(s) => Ok(s),
            Storage::Cpu(_) => {
                Err(Error::device(format!("tensor {} is on the host, not on a GPU", fmt_shape(&self.shape))))
            }
        }
    }

    /// The GPU buffer of a CUDA tensor, mutably (copied first if shared).
    #[cfg(feature = "cuda")]
    pub fn cuda_slice_mut(&mut self) -> Result<&mut crate::cuda::CudaSlice<f32>> {
        self.recompute = None;
        self.unshare()?;
        let shape = fmt_shape(&self.shape);
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Cuda(s)) => Ok(s),
            Some(Storage::Cpu(_)) => Err(Error::device(format!("tensor {shape} is on the host, not on a GPU"))),
            None => Err(Error::device(format!("tensor {shape}: storage still shared after a copy"))),
        }
    }

    /// A CUDA tensor over `slice` (at least as long as `shape` needs).
    #[cfg(feature = "cuda")]
    pub fn from_cuda(slice: crate::cuda::CudaSlice<f32>, shape: Vec<usize>) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if slice.len() < n {
            return Err(Error::shape(format!(
                "tensor of shape {} needs {n} elements, the GPU buffer has {}",
                fmt_shape(&shape),
                slice.len()
            )));
        }
        Ok(Tensor::from_storage(Storage::Cuda(slice), shape, false))
    }

    /// The same tensor (identity, shape, gradient tracking) with its elements on `device`; a
    /// tensor already there is returned as is (sharing storage).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if self.device() == device {
            return Ok(self.clone());
        }
        let storage = match device {
            Device::Cpu => Storage::Cpu(self.to_vec()?),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                // CUDA allocates no zero-byte buffers: an empty tensor keeps one padding element.
                let host = self.to_vec()?;
                let host = if host.is_empty() { vec![0.0] } else { host };
                let gpu = crate::cuda::context::gpu(i)?;
                let what = || format!("moving a tensor {} to cuda:{i}", fmt_shape(&self.shape));
                Storage::Cuda(gpu.upload(&host).map_err(|e| e.context(what()))?)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(Error::device(
                "--device cuda: this binary was built without the `cuda` feature (rebuild with --features cuda,cudnn)",
            )),
        };
        Ok(Tensor { storage: Arc::new(storage), recompute: None, ..self.clone() })
    }

    /// Copies `src`'s values into this tensor's own storage, on this tensor's device (identity and
    /// gradient tracking stay): loading weights, applying an average.
    pub fn assign(&mut self, src: &Tensor) -> Result<()> {
        self.same_shape(src, "assign")?;
        let src = src.to_device(self.device())?;
        match self.device() {
            Device::Cpu => {
                self.data_mut()?.copy_from_slice(src.data()?);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let n = self.numel();
                let gpu = crate::cuda::context::gpu(i)?;
                gpu.copy_range(src.cuda_slice()?, 0..n, self.cuda_slice_mut()?, 0)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::device("a CUDA tensor in a build without the `cuda` feature")),
        }
    }

    /// The elements copied into a Vec (downloaded from a GPU, which waits for its queued work).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &*self.storage {
            Storage::Cpu(v) => Ok(v.to_vec()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => {
                let gpu = crate::cuda::context::gpu(s.ordinal())?;
                let mut v = gpu.download(s)?;
                v.truncate(self.numel());
                Ok(v)
            }
        }
    }

    /// The single value of a one-element tensor.
    pub fn item(&self) -> Result<f32> {
        if self.numel() != 1 {
            return Err(Error::shape(format!(
                "item() needs a one-element tensor, got shape {}",
                fmt_shape(&self.shape)
            )));
        }
        match &*self.storage {
            Storage::Cpu(v) => Ok(v[0]),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Ok(self.to_vec()?[0]),
        }
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
            recompute: None,
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
        match &*self.storage {
            Storage::Cpu(v) => Ok(v.iter().all(|v| v.is_finite())),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Ok(self.to_vec()?.iter().all(|v| v.is_finite())),
        }
    }

    /// self += g elementwise, in this tensor's own storage (copied first if shared); `g` moves to
    /// this tensor's device first. The tape's gradient accumulation.
    pub fn add_assign(&mut self, g: &Tensor) -> Result<()> {
        self.same_shape(g, "gradient accumulation")?;
        let g = g.to_device(self.device())?;
        match self.device() {
            Device::Cpu => {
                let g = g.data()?;
                // Residual blocks add whole activation gradients here: both cores, in chunks
                // long enough to pay for the fork.
                use rayon::prelude::*;
                self.data_mut()?.par_chunks_mut(1 << 14).zip(g.par_chunks(1 << 14)).for_each(|(a, b)| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                });
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let n = self.numel();
                let gpu = crate::cuda::context::gpu(i)?;
                cuda::add_assign(&gpu, self.cuda_slice_mut()?, g.cuda_slice()?, n)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(Error::device("a CUDA tensor in a build without the `cuda` feature")),
        }
    }
}
