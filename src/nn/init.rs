//! Weight initialisers with PyTorch's definitions, drawn from a keyed counter-based stream.

use crate::rng::Rng;
use crate::tensor::Tensor;

/// How to fill a new weight tensor.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// U(-bound, bound).
    Uniform(f32),
    /// N(0, std^2).
    Normal(f32),
    /// A constant.
    Const(f32),
}

impl Init {
    /// PyTorch's default for Conv2d/Linear weights and biases: kaiming_uniform(a = sqrt(5)),
    /// which reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    pub fn torch_default(fan_in: usize) -> Init {
        Init::Uniform(1.0 / (fan_in as f32).sqrt())
    }

    /// kaiming_normal_(mode='fan_out', nonlinearity='leaky_relu', a = 0): std = sqrt(2 / fan_out).
    pub fn kaiming_normal_fan_out(fan_out: usize) -> Init {
        Init::Normal((2.0 / fan_out as f32).sqrt())
    }

    /// xavier_normal_: std = sqrt(2 / (fan_in + fan_out)).
    pub fn xavier_normal(fan_in: usize, fan_out: usize) -> Init {
        Init::Normal((2.0 / (fan_in + fan_out) as f32).sqrt())
    }

    /// A trainable tensor of `shape` drawn from stream `rng`.
    pub fn param(self, shape: &[usize], rng: &mut Rng) -> Tensor {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match self {
            Init::Uniform(b) => (0..n).map(|_| rng.range(-b, b)).collect(),
            Init::Normal(s) => (0..n).map(|_| s * rng.normal()).collect(),
            Init::Const(c) => vec![c; n],
        };
        Tensor::cpu(data, shape.to_vec()).into_param()
    }
}
