//! `muscle`: semi-supervised image classification with MUSCLE (mutual-information maximisation
//! between two augmented views, added to a supervised or MixMatch objective).
//!
//! Layers, bottom up (docs/ARCHITECTURE.md; tests/architecture.rs enforces them): errors and
//! leaves ([`error`], [`rng`], [`pool`], [`kernel_args`]); shared CPU kernels ([`cpu`]) and the
//! CUDA runtime; [`device`] and [`tensor`]; the [`autograd`] tape; [`ops`], one folder per op
//! family; [`nn`] layers and models; [`optim`]; [`data`]; [`ssl`] objectives; [`train`]; and
//! [`app`], what the subcommands do.

pub mod alloc_count;
pub mod app;
pub mod autograd;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod device;
pub mod dist;
pub mod error;
pub mod fault;
#[cfg(test)]
mod fuzz;
pub mod kernel_args;
pub mod memory;
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
