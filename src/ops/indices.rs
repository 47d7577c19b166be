//! Index vectors that live on the host and, for a GPU batch, on the device too.

#[cfg(feature = "cuda")]
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// An index vector (a batch's class labels, MixUp's row permutation): always on the host (range
/// checks need no copy), and also on the batch's GPU when it was uploaded with the images
/// (`StepBatch::to_device`), as i32 bit patterns in an f32 tensor, so the op that reads it needs
/// no upload of its own.
#[derive(Debug, Clone, Default)]
pub struct Indices {
    /// The indices.
    pub host: Vec<usize>,
    /// The same indices as i32 bits, on a GPU (None on the host).
    pub device: Option<Tensor>,
}

impl std::ops::Deref for Indices {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        &self.host
    }
}

impl FromIterator<usize> for Indices {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Indices {
        Indices { host: iter.into_iter().collect(), device: None }
    }
}

impl From<Vec<usize>> for Indices {
    fn from(host: Vec<usize>) -> Indices {
        Indices { host, device: None }
    }
}

impl Indices {
    /// The indices as an i32 device buffer on `gpu`: a device copy of the uploaded bits when
    /// there are some on that GPU, else an upload of the host values.
    #[cfg(feature = "cuda")]
    pub(crate) fn on_gpu(&self, gpu: &crate::cuda::Gpu) -> Result<crate::cuda::CudaSlice<i32>> {
        let n = self.host.len();
        match &self.device {
            Some(t) if t.device() == crate::device::Device::Cuda(gpu.info().ordinal) => {
                let mut bits = gpu.zeros::<i32>(n.max(1))?;
                gpu.copy_bits(t.cuda_slice()?, 0..n, &mut bits)?;
                Ok(bits)
            }
            _ => {
                let ids = self
                    .host
                    .iter()
                    .map(|&y| i32::try_from(y).map_err(|_| Error::shape(format!("index {y} beyond 32 bits"))))
                    .collect::<Result<Vec<i32>>>()?;
                gpu.upload(if ids.is_empty() { &[0] } else { &ids })
            }
        }
    }
}
