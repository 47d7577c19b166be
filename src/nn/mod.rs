//! Layers and models, with PyTorch's parameter and buffer names and initialisation.

mod param;

pub use param::{Module, Role};
