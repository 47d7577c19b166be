//! What a model exposes to optimizers and checkpoints: named tensors with a role.

use crate::error::Result;
use crate::tensor::Tensor;

/// What a named tensor of a model is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A conv or dense kernel (MixMatch decays only these).
    Weight,
    /// A conv or dense bias.
    Bias,
    /// Batch-norm scale (gamma).
    BnWeight,
    /// Batch-norm shift (beta).
    BnBias,
    /// Batch-norm running mean (a buffer).
    RunningMean,
    /// Batch-norm running variance (a buffer).
    RunningVar,
    /// Batch-norm update counter (a buffer, int64 in PyTorch; a one-element f32 tensor here).
    NumBatchesTracked,
}

impl Role {
    /// Whether the optimizer trains it (else it is a buffer).
    pub fn is_trainable(self) -> bool {
        matches!(self, Role::Weight | Role::Bias | Role::BnWeight | Role::BnBias)
    }
}

/// A model or layer: runs forward on a tape, and lists its named tensors in a fixed order
/// (PyTorch's `state_dict` order) for optimizers, EMA and checkpoints.
pub trait Module {
    /// Calls `f(name, role, tensor)` for every parameter and buffer, in state_dict order.
    fn visit(&self, f: &mut dyn FnMut(&str, Role, &Tensor));
    /// The same, with mutable tensors (optimizer steps, loading a checkpoint).
    fn visit_mut(&mut self, f: &mut dyn FnMut(&str, Role, &mut Tensor));

    /// `visit` with a fallible `f`: after the first error `f` is not called again, and that
    /// error is returned.
    fn try_visit(&self, f: &mut dyn FnMut(&str, Role, &Tensor) -> Result<()>) -> Result<()> {
        let mut err = None;
        self.visit(&mut |name, role, t| err = err.take().or_else(|| f(name, role, t).err()));
        err.map_or(Ok(()), Err)
    }

    /// `visit_mut` with a fallible `f`, stopping the same way.
    fn try_visit_mut(&mut self, f: &mut dyn FnMut(&str, Role, &mut Tensor) -> Result<()>) -> Result<()> {
        let mut err = None;
        self.visit_mut(&mut |name, role, t| err = err.take().or_else(|| f(name, role, t).err()));
        err.map_or(Ok(()), Err)
    }

    /// Number of trainable scalars.
    fn num_parameters(&self) -> usize {
        let mut n = 0;
        self.visit(&mut |_, role, t| {
            if role.is_trainable() {
                n += t.numel()
            }
        });
        n
    }
}
