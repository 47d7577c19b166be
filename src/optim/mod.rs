//! Optimizers (SGD, Adam, AdamW), the exponential moving average of the weights, and
//! learning-rate schedules.
//!
//! Semantics follow torch.optim, so a run can be compared with PyTorch step by step; the element
//! arithmetic lives in [`cpu`] (CUDA twins in `cuda`), one fused pass per tensor. Per-parameter state is
//! keyed by the parameter's state_dict name (not its tensor id), so it survives a checkpoint.

mod adam;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod ema;
mod schedule;
mod sgd;
#[cfg(test)]
mod test_model;

pub use adam::{Adam, AdamConfig};
pub use ema::{Ema, EmaDecay};
pub use schedule::{ramp, Schedule};
pub use sgd::{Sgd, SgdConfig};

use crate::autograd::Gradients;
use crate::error::{Error, Result};
use crate::nn::{Module, Role};
use crate::tensor::{fmt_shape, Tensor};
use std::collections::HashMap;

/// An optimizer: updates a model's trainable tensors from their gradients, and exposes its
/// state as named tensors so that a run can be resumed bit-exactly.
pub trait Optimizer {
    /// One update with learning rate `lr` (the schedule's value for this step; 0 is allowed).
    /// Trainable tensors without a gradient are skipped and get no state; buffers are never
    /// touched. Gradients are not checked for finiteness (the training loop does that).
    fn step(&mut self, model: &mut dyn Module, grads: &Gradients, lr: f32) -> Result<()>;
    /// The learning rate the optimizer was configured with (the schedule's base).
    fn base_lr(&self) -> f32;
    /// The state as named tensors, per parameter in the order the state was created.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    /// Replaces the state with `state` (from [`Optimizer::state_tensors`]), checked against
    /// `model`'s trainable tensors; the error names the tensor at fault.
    fn load_state_tensors(&mut self, model: &dyn Module, state: &[(String, Tensor)]) -> Result<()>;
}

/// Which trainable tensors weight decay applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DecayScope {
    /// Every trainable tensor (PyTorch's default, and the default recipe).
    #[default]
    All,
    /// Conv and dense kernels only ([`Role::Weight`]), as MixMatch does.
    KernelsOnly,
}

impl DecayScope {
    /// Whether a tensor of `role` is decayed.
    pub fn applies(self, role: Role) -> bool {
        match self {
            DecayScope::All => role.is_trainable(),
            DecayScope::KernelsOnly => role == Role::Weight,
        }
    }
}

/// Checks a configured learning rate: finite and positive.
fn check_base_lr(lr: f32) -> Result<()> {
    if !(lr.is_finite() && lr > 0.0) {
        return Err(Error::usage(format!("--lr: must be a positive number, got {lr}")));
    }
    Ok(())
}

/// Checks a beta: in [0, 1).
fn check_beta(arg: &str, beta: f32) -> Result<()> {
    if !(0.0..1.0).contains(&beta) {
        return Err(Error::usage(format!("{arg}: must be in [0, 1), got {beta}")));
    }
    Ok(())
}

/// Checks a coefficient that may be 0: finite and not negative.
fn check_non_negative(arg: &str, v: f32) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(Error::usage(format!("{arg}: must be a non-negative number, got {v}")));
    }
    Ok(())
}

/// Checks one step before anything is written, so that a failing step leaves the model and the
/// state as they were: the learning rate, and that every gradient and every existing state
/// tensor has its parameter's shape.
fn check_step<'a>(
    model: &dyn Module,
    grads: &Gradients,
    lr: f32,
    state_shape: impl Fn(&str) -> Option<&'a [usize]>,
) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::usage(format!("learning rate of this step must be finite and non-negative, got {lr}")));
    }
    model.try_visit(&mut |name, role, p| {
        if !role.is_trainable() {
            return Ok(());
        }
        let Some(g) = grads.get(p) else { return Ok(()) };
        if g.shape() != p.shape() {
            return Err(Error::shape(format!(
                "gradient of {name} has shape {}, the parameter {}",
                fmt_shape(g.shape()),
                fmt_shape(p.shape())
            )));
        }
        match state_shape(name) {
            Some(s) if s != p.shape() => Err(Error::shape(format!(
                "optimizer state of {name} has shape {}, the parameter {}",
                fmt_shape(s),
                fmt_shape(p.shape())
            ))),
            _ => Ok(()),
        }
    })
}

/// The walk of every optimizer step: calls `update(name, parameter, gradient, weight decay)` for
/// each trainable tensor of `model` that has a gradient, in visit order, with `weight_decay` where
/// `scope` applies and 0 elsewhere. The first error stops the walk and is returned naming the tensor.
fn update_each(
    model: &mut dyn Module,
    grads: &Gradients,
    scope: DecayScope,
    weight_decay: f32,
    update: &mut dyn FnMut(&str, &mut Tensor, &Tensor, f32) -> Result<()>,
) -> Result<()> {
    model.try_visit_mut(&mut |name, role, p| {
        if !role.is_trainable() {
            return Ok(());
        }
        let Some(g) = grads.get(p) else { return Ok(()) };
        let wd = if scope.applies(role) { weight_decay } else { 0.0 };
        update(name, p, g, wd).map_err(|e| e.context(name))
    })
}

/// Per-parameter state in creation order, found by parameter name.
#[derive(Debug)]
struct ParamStates<S> {
    entries: Vec<(String, S)>,
    index: HashMap<String, usize>,
}

impl<S> Default for ParamStates<S> {
    fn default() -> Self {
        ParamStates { entries: Vec::new(), index: HashMap::new() }
    }
}

impl<S> ParamStates<S> {
    /// The state of `name`, if it has one.
    fn get(&self, name: &str) -> Option<&S> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    /// The state of `name`, created by `init` on first use.
    fn get_or_insert(&mut self, name: &str, init: impl FnOnce() -> S) -> &mut S {
        let i = match self.index.get(name) {
            Some(&i) => i,
            None => {
                self.entries.push((name.to_string(), init()));
                self.index.insert(name.to_string(), self.entries.len() - 1);
                self.entries.len() - 1
            }
        };
        &mut self.entries[i].1
    }

    /// States in creation order.
    fn iter(&self) -> impl Iterator<Item = &(String, S)> {
        self.entries.iter()
    }

    /// States built from a checkpoint, in its order.
    fn from_entries(entries: Vec<(String, S)>) -> ParamStates<S> {
        let index = entries.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        ParamStates { entries, index }
    }
}

/// Splits `state` into per-parameter groups: one tensor per prefix in `prefixes` (each like
/// `"exp_avg."`), in prefix order, with groups in the order the parameters first appear. Every
/// group must be complete, name a trainable tensor of `model`, and hold tensors of the parameter's
/// shape, except the prefix `scalar` (a step count), which must hold one element.
fn parse_state<const N: usize>(
    model: &dyn Module,
    state: &[(String, Tensor)],
    prefixes: &[&str; N],
    scalar: Option<&str>,
) -> Result<Vec<(String, [Tensor; N])>> {
    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    model.visit(&mut |name, role, t| {
        if role.is_trainable() {
            shapes.insert(name.to_string(), t.shape().to_vec());
        }
    });
    let mut groups: Vec<(String, [Option<Tensor>; N])> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (key, t) in state {
        let Some((slot, param)) =
            prefixes.iter().enumerate().find_map(|(i, p)| key.strip_prefix(p).map(|rest| (i, rest)))
        else {
            return Err(Error::format(format!(
                "optimizer state {key}: not a state tensor of this optimizer (expected {})",
                prefixes.iter().map(|p| format!("{p}<param>")).collect::<Vec<_>>().join(", ")
            )));
        };
        let Some(shape) = shapes.get(param) else {
            return Err(Error::format(format!("optimizer state {key}: the model has no trainable tensor {param}")));
        };
        if scalar == Some(prefixes[slot]) {
            if t.numel() != 1 {
                return Err(Error::format(format!(
                    "optimizer state {key}: a step count needs one element, got shape {}",
                    fmt_shape(t.shape())
                )));
            }
        } else if t.shape() != shape.as_slice() {
            return Err(Error::format(format!(
                "optimizer state {key}: shape {} but the parameter has {}",
                fmt_shape(t.shape()),
                fmt_shape(shape)
            )));
        }
        let g = *index.entry(param.to_string()).or_insert_with(|| {
            groups.push((param.to_string(), std::array::from_fn(|_| None)));
            groups.len() - 1
        });
        let cell = &mut groups[g].1[slot];
        if cell.is_some() {
            return Err(Error::format(format!("optimizer state {key}: given twice")));
        }
        *cell = Some(t.detach());
    }
    groups
        .into_iter()
        .map(|(name, slots)| {
            let tensors = slots
                .into_iter()
                .zip(prefixes)
                .map(|(t, p)| t.ok_or_else(|| Error::format(format!("optimizer state {p}{name}: missing"))))
                .collect::<Result<Vec<_>>>()?;
            let tensors = tensors.try_into().map_err(|_| Error::format("optimizer state: internal slot count"))?;
            Ok((name, tensors))
        })
        .collect()
}

/// A step count read back from its one-element tensor: a non-negative integer.
fn parse_step(key: &str, t: &Tensor) -> Result<u64> {
    let v = t.item()?;
    if !(v.is_finite() && v >= 0.0 && v.fract() == 0.0) {
        return Err(Error::format(format!(
            "optimizer state {key}: a step count must be a non-negative integer, got {v}"
        )));
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::test_model::Tiny;
    use super::*;

    #[test]
    fn decay_scope_roles() {
        for role in [Role::Weight, Role::Bias, Role::BnWeight, Role::BnBias] {
            assert!(DecayScope::All.applies(role));
            assert_eq!(DecayScope::KernelsOnly.applies(role), role == Role::Weight);
        }
        for role in [Role::RunningMean, Role::RunningVar, Role::NumBatchesTracked] {
            assert!(!DecayScope::All.applies(role) && !DecayScope::KernelsOnly.applies(role));
        }
    }

    #[test]
    fn parse_state_rejects_bad_input() {
        let m = Tiny::new();
        let p = ["a.", "b."];
        let ok = |s: &[(String, Tensor)]| parse_state(&m, s, &p, Some("a."));
        let t = |name: &str, shape: &[usize]| (name.to_string(), Tensor::zeros(shape));
        let good = [t("a.w", &[]), t("b.w", &[2, 3])];
        let groups = ok(&good).unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].0, "w");
        let msg = |s: &[(String, Tensor)]| ok(s).unwrap_err().message().to_string();
        assert!(msg(&[t("a.w", &[]), t("b.w", &[3, 2])]).contains("b.w"));
        assert!(msg(&[t("a.w", &[2]), t("b.w", &[2, 3])]).contains("a.w"));
        assert!(msg(&[t("a.w", &[])]).contains("b.w: missing"));
        assert!(msg(&[t("c.w", &[2, 3])]).contains("c.w"));
        assert!(msg(&[t("b.nope", &[2, 3])]).contains("nope"));
        assert!(msg(&[t("b.rm", &[3])]).contains("b.rm"), "buffers have no optimizer state");
        assert!(msg(&[t("b.w", &[2, 3]), t("b.w", &[2, 3])]).contains("twice"));
    }

    #[test]
    fn parse_step_values() {
        assert_eq!(parse_step("s", &Tensor::scalar(7.0)).unwrap(), 7);
        assert!(parse_step("s", &Tensor::scalar(1.5)).is_err());
        assert!(parse_step("s", &Tensor::scalar(-1.0)).is_err());
        assert!(parse_step("s", &Tensor::scalar(f32::NAN)).is_err());
    }
}
