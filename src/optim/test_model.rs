//! A tiny model for the optimizer tests: one tensor of every role, in a fixed order.

use crate::autograd::Gradients;
use crate::nn::{Module, Role};
use crate::tensor::Tensor;

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

    /// Gradients for the named tensors.
    pub fn grads(&self, values: &[(&str, Vec<f32>)]) -> Gradients {
        let mut g = Gradients::default();
        for (name, v) in values {
            let t = self.get(name);
            g.accumulate(t.id(), Tensor::from_vec(v.clone(), t.shape()).unwrap()).unwrap();
        }
        g
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
