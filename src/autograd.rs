//! The tape: reverse-mode autodiff. Ops push a backward closure keyed by their output's id; the
//! backward pass runs them in reverse order and sums gradients by tensor id.

use crate::error::{Error, Result};
use crate::tensor::{fmt_shape, Recompute, Tensor, TensorId, TensorRef};
use std::cell::RefCell;
use std::collections::HashMap;

/// A backward closure: given the gradient of the op's output, accumulate its inputs' gradients.
pub type BackwardFn = Box<dyn FnOnce(&Tensor, &mut Gradients) -> Result<()>>;

/// A backward closure that takes the output's gradient by value: it may write its input's
/// gradient into the same buffer (an elementwise backward), saving one activation-sized buffer.
pub type ConsumingBackwardFn = Box<dyn FnOnce(Tensor, &mut Gradients) -> Result<()>>;

enum Backward {
    Borrowing(BackwardFn),
    Consuming(ConsumingBackwardFn),
}

struct Node {
    output: TensorId,
    backward: Backward,
}

/// Records the backward closures of a forward pass. A no-grad tape records nothing.
pub struct Tape {
    nodes: RefCell<Vec<Node>>,
    enabled: bool,
}

impl Default for Tape {
    fn default() -> Self {
        Tape::new()
    }
}

impl Tape {
    /// A tape that records.
    pub fn new() -> Tape {
        Tape { nodes: RefCell::new(Vec::new()), enabled: true }
    }

    /// A tape for evaluation: records nothing, so no activation is kept alive.
    pub fn no_grad() -> Tape {
        Tape { nodes: RefCell::new(Vec::new()), enabled: false }
    }

    /// Whether this tape records.
    pub fn is_recording(&self) -> bool {
        self.enabled
    }

    /// Whether an op with these inputs must record: recording, and some input needs a gradient.
    pub fn tracks(&self, inputs: &[&Tensor]) -> bool {
        self.enabled && inputs.iter().any(|t| t.requires_grad())
    }

    /// Records `backward` for `output` when any of `inputs` needs a gradient; returns the output
    /// marked accordingly.
    pub fn record(
        &self,
        output: Tensor,
        inputs: &[&Tensor],
        backward: impl FnOnce(&Tensor, &mut Gradients) -> Result<()> + 'static,
    ) -> Tensor {
        if !self.tracks(inputs) {
            return output;
        }
        self.push(output, Backward::Borrowing(Box::new(backward)))
    }

    /// [`Tape::record`] for a backward that takes its output's gradient by value.
    pub fn record_consuming(
        &self,
        output: Tensor,
        inputs: &[&Tensor],
        backward: impl FnOnce(Tensor, &mut Gradients) -> Result<()> + 'static,
    ) -> Tensor {
        if !self.tracks(inputs) {
            return output;
        }
        self.push(output, Backward::Consuming(Box::new(backward)))
    }

    fn push(&self, output: Tensor, backward: Backward) -> Tensor {
        let output = output.set_requires_grad(true);
        self.nodes.borrow_mut().push(Node { output: output.id(), backward });
        output
    }

    /// Number of recorded ops.
    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs the backward pass from a scalar `loss` (seeded with 1), consuming the tape.
    pub fn backward(self, loss: &Tensor) -> Result<Gradients> {
        if loss.numel() != 1 {
            return Err(Error::shape(format!("backward needs a scalar loss, got shape {}", fmt_shape(loss.shape()))));
        }
        let seed = Tensor::full_on(loss.device(), loss.shape(), 1.0)?;
        self.backward_with(loss, seed)
    }

    /// Runs the backward pass seeded with `grad` as the gradient of `output`.
    pub fn backward_with(self, output: &Tensor, grad: Tensor) -> Result<Gradients> {
        output.same_shape(&grad, "backward seed")?;
        let mut grads = Gradients::default();
        grads.accumulate(output.id(), grad)?;
        let nodes = self.nodes.into_inner();
        for node in nodes.into_iter().rev() {
            // An output nobody used (or whose users took no gradient) passes nothing back.
            if let Some(g) = grads.map.remove(&node.output) {
                match node.backward {
                    Backward::Borrowing(f) => f(&g, &mut grads)?,
                    Backward::Consuming(f) => f(g, &mut grads)?,
                }
            }
        }
        Ok(grads)
    }
}

/// Gradients by tensor id.
#[derive(Default, Debug)]
pub struct Gradients {
    map: HashMap<TensorId, Tensor>,
}

impl Gradients {
    /// Adds `grad` into the gradient of tensor `id`.
    pub fn accumulate(&mut self, id: TensorId, grad: Tensor) -> Result<()> {
        match self.map.get_mut(&id) {
            None => {
                self.map.insert(id, grad.detach());
            }
            Some(acc) => acc.add_assign(&grad)?,
        }
        Ok(())
    }

    /// Adds `grad` to `t`'s gradient if `t` needs one.
    pub fn add_to(&mut self, t: &Tensor, grad: Tensor) -> Result<()> {
        if t.requires_grad() {
            self.accumulate(t.id(), grad)?;
        }
        Ok(())
    }

    /// Adds `grad` to the gradient of the tensor `r` refers to, if it needs one.
    pub fn add_to_ref(&mut self, r: &TensorRef, grad: Tensor) -> Result<()> {
        if r.requires_grad() {
            self.accumulate(r.id(), grad)?;
        }
        Ok(())
    }

    /// The gradient of `t`, if any reached it.
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.map.get(&t.id())
    }

    /// Removes and returns the gradient of `t`.
    pub fn take(&mut self, t: &Tensor) -> Option<Tensor> {
        self.map.remove(&t.id())
    }
}

/// An op's input as its backward will read it: the tensor itself, or, when its producer left a
/// recipe (a training batch-norm output, with or without its LeakyReLU, on either device), only
/// the recipe. The recipe's inputs are kept by the producer's own backward anyway, so a
/// convolution after batch norm holds no copy of its input between the passes: the activation
/// is recomputed bit for bit in the backward and freed after it (the convnet's step keeps one
/// activation per layer instead of two).
pub enum Saved {
    /// The elements, kept.
    Kept(Tensor),
    /// Identity and recipe; the elements are recomputed on use.
    Recomputed(TensorRef, Recompute),
}

impl Saved {
    /// Saves `t` for a backward: its recipe when it has one.
    pub fn of(t: &Tensor) -> Saved {
        match t.recompute() {
            Some(r) => Saved::Recomputed(t.identity(), r.clone()),
            None => Saved::Kept(t.clone()),
        }
    }

    /// The saved tensor (recomputed when only its recipe was kept), under its own identity.
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            Saved::Kept(t) => Ok(t.clone()),
            Saved::Recomputed(r, f) => Tensor::restore(f.run()?, r),
        }
    }

    /// The affine recipe, when only a recipe that is one was kept (a kernel may then read its
    /// input instead of recomputing the tensor).
    pub fn affine(&self) -> Option<&crate::tensor::AffineRecipe> {
        match self {
            Saved::Kept(_) => None,
            Saved::Recomputed(_, f) => f.affine(),
        }
    }

    /// The saved tensor's identity, shape and gradient tracking.
    pub fn identity(&self) -> TensorRef {
        match self {
            Saved::Kept(t) => t.identity(),
            Saved::Recomputed(r, _) => r.clone(),
        }
    }
}
