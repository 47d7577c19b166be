//! `muscle`: semi-supervised image classification with MUSCLE (mutual-information maximisation
//! between two augmented views, added to a supervised or MixMatch objective).
//!
//! Layers, bottom up: [`tensor`] and [`device`]; CPU kernels in [`cpu`]; [`ops`] (forward and
//! backward of each op family, dispatching to a device's kernels); the [`autograd`] tape;
//! [`nn`] layers and models; [`optim`] optimizers and schedules.

pub mod alloc_count;
pub mod app;
pub mod autograd;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod device;
pub mod error;
#[cfg(test)]
mod fuzz;
pub mod kernel_args;
pub mod nn;
pub mod npy;
pub mod ops;
pub mod optim;
pub mod pool;
pub mod profile;
pub mod rng;
pub mod ssl;
pub mod tensor;
pub mod testing;
pub mod train;

pub use autograd::{Gradients, Tape};
pub use device::Device;
pub use error::{Error, ErrorKind, Result};
pub use tensor::Tensor;
