//! MixMatch's label guess and MixUp as untracked ops on either device (no gradient flows
//! through the guess, and MixUp mixes constant inputs and targets): the GPU path keeps a
//! MixMatch step's data on the device.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::{Error, Result};
use crate::ops::Indices;
use crate::tensor::{fmt_shape, Tensor};

/// The sharpened average guess (nu x C) of `probs`, the 2nu x C probabilities of an image's two
/// views (rows i and nu + i), at temperature `temperature`.
pub fn guess(probs: &Tensor, temperature: f32) -> Result<Tensor> {
    let [rows, c] = probs.dims("mixmatch guess")?;
    if rows == 0 || rows % 2 != 0 || c == 0 {
        return Err(Error::shape(format!(
            "mixmatch guess: needs 2nu x C probabilities, got {}",
            fmt_shape(probs.shape())
        )));
    }
    let nu = rows / 2;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("mixmatch guess", &[probs])? {
        let mut q = crate::ops::gpu::alloc(&gpu, &[nu, c])?;
        cuda::guess_fwd(&gpu, crate::ops::gpu::buf(probs)?, &mut q, nu, c, 1.0 / temperature)?;
        return crate::ops::gpu::wrap(q, &[nu, c]);
    }
    Tensor::from_vec(cpu::guess(probs.data()?, nu, c, temperature), &[nu, c])
}

/// One-hot rows (n x `classes`) of `labels`, on `like`'s device.
pub fn one_hot(labels: &Indices, classes: usize, like: &Tensor) -> Result<Tensor> {
    let n = labels.len();
    if let Some(&bad) = labels.iter().find(|&&y| y >= classes) {
        return Err(Error::shape(format!("one_hot: label {bad} out of range for {classes} classes")));
    }
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("one_hot", &[like])? {
        let mut y = crate::ops::gpu::alloc(&gpu, &[n, classes])?;
        if n > 0 {
            cuda::one_hot_fwd(&gpu, &labels.on_gpu(&gpu)?, &mut y, n, classes)?;
        }
        return crate::ops::gpu::wrap(y, &[n, classes]);
    }
    let _ = like;
    Tensor::from_vec(cpu::one_hot(labels, classes), &[n, classes])
}

/// MixUp of the rows of `x`: mu x[i] + (1 - mu) x[perm[i]], same shape.
pub fn mix_rows(x: &Tensor, perm: &Indices, mu: f32) -> Result<Tensor> {
    let rows = x.shape().first().copied().unwrap_or(0);
    if perm.len() != rows || perm.iter().any(|&j| j >= rows) || rows == 0 {
        return Err(Error::shape(format!(
            "mix_rows: a permutation of {} rows for a tensor {}",
            perm.len(),
            fmt_shape(x.shape())
        )));
    }
    let row = x.numel() / rows;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("mix_rows", &[x])? {
        let mut y = crate::ops::gpu::alloc(&gpu, x.shape())?;
        cuda::mix_rows_fwd(&gpu, crate::ops::gpu::buf(x)?, &perm.on_gpu(&gpu)?, &mut y, (rows, row), mu)?;
        return crate::ops::gpu::wrap(y, x.shape());
    }
    Tensor::from_vec(cpu::mix_rows(x.data()?, row, mu, perm), x.shape())
}
