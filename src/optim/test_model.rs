//! A tiny model for the optimizer tests: one tensor of every role, in a fixed order.

use super::Optimizer;
use crate::autograd::Gradients;
use crate::nn::{Module, Role};
use crate::tensor::Tensor;

/// The trainable tensors of [`Tiny`], in visit order.
pub(crate) const TRAINABLE: [&str; 4] = ["w", "b", "g", "beta"];

/// Named tensors with roles; `visit` lists them in construction order.
#[derive(Clone)]
pub(crate) struct Tiny {
    pub tensors: Vec<(String, Role, Tensor)>,
}

impl Tiny {
    /// w: kernel [2, 3]; b: bias [3]; g, beta: BN scale and shift [3]; rm, rv, nbt: BN buffers.
    pub fn new() -> Tiny {
        let t = |v: Vec<f32>, shape: &[usize]| Tensor::from_vec(v, shape).unwrap().into_param();
        Tiny {
            tensors: vec![
                ("w".into(), Role::Weight, t(vec![0.5, -1.25, 2.0, 0.75, -0.3, 1.1], &[2, 3])),
                ("b".into(), Role::Bias, t(vec![0.1, -0.2, 0.3], &[3])),
                ("g".into(), Role::BnWeight, t(vec![1.0, 0.9, 1.2], &[3])),
                ("beta".into(), Role::BnBias, t(vec![0.05, -0.4, 0.0], &[3])),
                ("rm".into(), Role::RunningMean, t(vec![0.2, 0.1, -0.3], &[3])),
                ("rv".into(), Role::RunningVar, t(vec![1.5, 0.8, 1.1], &[3])),
                ("nbt".into(), Role::NumBatchesTracked, t(vec![4.0], &[])),
            ],
        }
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> &Tensor {
        &self.tensors.iter().find(|(n, _, _)| n == name).unwrap().2
    }

    /// The tensor called `name`, mutable.
    pub fn get_mut(&mut self, name: &str) -> &mut Tensor {
        &mut self.tensors.iter_mut().find(|(n, _, _)| n == name).unwrap().2
    }

    /// The values of `name`.
    pub fn values(&self, name: &str) -> Vec<f32> {
        self.get(name).to_vec().unwrap()
    }

    /// The role of `name`.
    pub fn role(&self, name: &str) -> Role {
        self.tensors.iter().find(|(n, _, _)| n == name).unwrap().1
    }

    /// Gradients for the named tensors.
    pub fn grads(&self, values: &[(&str, Vec<f32>)]) -> Gradients {
        let mut g = Gradients::default();
        for (name, v) in values {
            let t = self.get(name);
            g.accumulate(t.id(), Tensor::from_vec(v.clone(), t.shape()).unwrap()).unwrap();
        }
        g
    }

    /// The pseudo-gradients of step `k` ([`fake_grad`]) for the tensors `names`.
    pub fn fake_grads(&self, names: &[&str], k: usize) -> Gradients {
        let gv: Vec<(&str, Vec<f32>)> = names.iter().map(|&n| (n, fake_grad(n, self.get(n).numel(), k))).collect();
        self.grads(&gv)
    }

    /// Every value of the model, bit patterns, for exact comparisons.
    pub fn bits(&self) -> Vec<u32> {
        self.tensors.iter().flat_map(|(_, _, t)| t.to_vec().unwrap()).map(f32::to_bits).collect()
    }
}

impl Module for Tiny {
    fn visit(&self, f: &mut dyn FnMut(&str, Role, &Tensor)) {
        for (n, r, t) in &self.tensors {
            f(n, *r, t);
        }
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&str, Role, &mut Tensor)) {
        for (n, r, t) in &mut self.tensors {
            f(n, *r, t);
        }
    }
}

/// Deterministic pseudo-gradients for step `k` of the tensor `name` with `n` elements.
pub(crate) fn fake_grad(name: &str, n: usize, k: usize) -> Vec<f32> {
    let salt = name.bytes().map(|b| b as usize).sum::<usize>();
    (0..n).map(|i| (((i * 7 + k * 13 + salt) % 17) as f32 - 8.0) * 0.11 + 0.013 * k as f32).collect()
}

/// Steps `opt` `steps` times on a fresh [`Tiny`], with pseudo-gradients for every trainable tensor
/// and a learning rate falling from `base_lr` by a fifth of it per step; after each step calls
/// `reference(i, gradient, lr, role)` for each `TRAINABLE[i]`, so that an f64 model of the
/// optimizer can take the same step. Returns the model.
pub(crate) fn step_with_reference(
    opt: &mut dyn Optimizer,
    base_lr: f32,
    steps: usize,
    mut reference: impl FnMut(usize, &[f32], f64, Role),
) -> Tiny {
    let mut model = Tiny::new();
    for k in 0..steps {
        let lr = base_lr * (1.0 - 0.2 * k as f32);
        let gv: Vec<(&str, Vec<f32>)> = TRAINABLE.iter().map(|&n| (n, fake_grad(n, model.get(n).numel(), k))).collect();
        let grads = model.grads(&gv);
        opt.step(&mut model, &grads, lr).unwrap();
        for (i, (name, g)) in gv.iter().enumerate() {
            reference(i, g, lr as f64, model.role(name));
        }
    }
    model
}

/// Asserts that `got` is within `rel_tol` (relative, plus the same absolute) of the f64 `want`.
pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f64], rel_tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        assert!((a as f64 - b).abs() <= rel_tol * (1.0 + b.abs()), "{what}[{i}]: got {a}, want {b}");
    }
}

/// Checks that an optimizer restored from another's `state_tensors` continues bit-identically:
/// one from `make` takes `before` steps with gradients for `names`, a second is restored from its
/// state, and both take `after` more steps; models and states must match to the bit, while a
/// third started afresh must diverge (or the comparison proves nothing). Returns the state saved
/// after `before` steps.
pub(crate) fn check_resume<O: Optimizer>(
    make: impl Fn() -> O,
    names: &[&str],
    lr: f32,
    before: usize,
    after: usize,
) -> Vec<(String, Tensor)> {
    let mut a = Tiny::new();
    let mut opt_a = make();
    for k in 0..before {
        let g = a.fake_grads(names, k);
        opt_a.step(&mut a, &g, lr).unwrap();
    }
    let saved = opt_a.state_tensors();
    let mut b = a.clone();
    let mut opt_b = make();
    opt_b.load_state_tensors(&b, &saved).unwrap();
    let mut c = a.clone();
    let mut opt_c = make();
    for k in before..before + after {
        for (m, opt) in [(&mut a, &mut opt_a), (&mut b, &mut opt_b), (&mut c, &mut opt_c)] {
            let g = m.fake_grads(names, k);
            opt.step(m, &g, lr).unwrap();
        }
    }
    assert_eq!(a.bits(), b.bits());
    assert_ne!(a.bits(), c.bits());
    let bits = |s: Vec<(String, Tensor)>| -> Vec<(String, Vec<u32>)> {
        s.into_iter().map(|(n, t)| (n, t.to_vec().unwrap().into_iter().map(f32::to_bits).collect())).collect()
    };
    assert_eq!(bits(opt_a.state_tensors()), bits(opt_b.state_tensors()));
    saved
}
