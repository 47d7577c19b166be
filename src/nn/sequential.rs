//! Plain conv stacks (`convnet`, `cnn13`): a `features` Sequential whose indices count every
//! layer, as PyTorch names them, then a dense `fc`.

use super::init::Init;
use super::layers::{BatchNorm2d, Conv2d, ForwardCtx, Linear};
use super::param::{Module, Role};
use crate::autograd::Tape;
use crate::error::Result;
use crate::ops;
use crate::rng::{mix, Rng};
use crate::tensor::Tensor;

/// One entry of the `features` Sequential.
#[derive(Clone, Debug)]
pub enum Layer {
    /// Convolution.
    Conv(Conv2d),
    /// Batch norm (boxed: five tensors outweigh every other variant).
    Bn(Box<BatchNorm2d>),
    /// LeakyReLU with this slope.
    LeakyRelu(f32),
    /// k x k max-pool, stride k.
    MaxPool(usize),
    /// Dropout with this probability.
    Dropout(f32),
    /// Global average pool (flattens to [n, c]).
    GlobalAvgPool,
    /// Flatten (a no-op after the global pool, kept for PyTorch's indices).
    Flatten,
}

/// A `features` stack and a classifier.
#[derive(Clone, Debug)]
pub struct Sequential {
    /// The feature layers.
    pub features: Vec<Layer>,
    /// The classifier.
    pub fc: Linear,
}

/// Dropout stream key purpose.
const DROPOUT: u64 = 0xD0;

impl Sequential {
    /// Builds conv-BN-LReLU blocks from a compact description.
    pub fn build(in_channels: usize, classes: usize, plan: &[Block], rng: &mut Rng) -> Sequential {
        let mut features = Vec::new();
        let mut c = in_channels;
        for b in plan {
            match *b {
                Block::Conv { out, k, pad } => {
                    let init = Init::torch_default(c * k * k);
                    features.push(Layer::Conv(Conv2d::new(c, out, k, 1, pad, init, rng)));
                    features.push(Layer::Bn(Box::new(BatchNorm2d::new(out, 0.1))));
                    features.push(Layer::LeakyRelu(0.1));
                    c = out;
                }
                Block::MaxPool => features.push(Layer::MaxPool(2)),
                Block::Dropout(p) => features.push(Layer::Dropout(p)),
            }
        }
        features.push(Layer::GlobalAvgPool);
        features.push(Layer::Flatten);
        let fc = Linear::new(c, classes, Init::torch_default(c), Init::torch_default(c), rng);
        Sequential { features, fc }
    }

    /// Forward to logits [n, classes].
    pub fn forward(&mut self, tape: &Tape, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut h = x.clone();
        let mut fused_next = false;
        for i in 0..self.features.len() {
            if std::mem::take(&mut fused_next) {
                continue;
            }
            let next_slope = match self.features.get(i + 1) {
                Some(Layer::LeakyRelu(s)) => Some(*s),
                _ => None,
            };
            h = match &mut self.features[i] {
                Layer::Conv(c) => c.forward(tape, &h, ctx)?,
                // BN followed by LeakyReLU runs as one fused pass.
                Layer::Bn(b) => {
                    fused_next = next_slope.is_some();
                    b.forward_act(tape, &h, ctx, next_slope)?
                }
                Layer::LeakyRelu(s) => ops::leaky_relu(tape, &h, *s)?,
                Layer::MaxPool(k) => ops::max_pool2d(tape, &h, *k)?,
                Layer::Dropout(p) if ctx.train => {
                    // Each process of a data-parallel run draws its own masks (its rows are others).
                    let world = crate::dist::world();
                    let mut key = vec![DROPOUT, ctx.step, ctx.pass, i as u64];
                    if world.size() > 1 {
                        key.push(world.rank() as u64);
                    }
                    ops::dropout(tape, &h, *p, ctx.seed, mix(&key))?
                }
                Layer::Dropout(_) => h,
                Layer::GlobalAvgPool => ops::global_avg_pool(tape, &h)?,
                Layer::Flatten => ops::flatten(tape, &h)?,
            };
        }
        self.fc.forward(tape, &h)
    }
}

/// A compact description of a conv stack.
#[derive(Clone, Copy, Debug)]
pub enum Block {
    /// conv k x k (no bias) + BN + LeakyReLU(0.1).
    Conv {
        /// Output channels.
        out: usize,
        /// Kernel size.
        k: usize,
        /// Zero padding.
        pad: usize,
    },
    /// 2x2 max-pool.
    MaxPool,
    /// Dropout.
    Dropout(f32),
}

/// Writes `visit` (`visits!(visit)`) and `visit_mut` (`visits!(visit_mut, mut)`) from one listing:
/// checkpoints are written through one and read through the other, so the two must never disagree.
macro_rules! visits {
    ($visit:ident $(, $mut:tt)?) => {
        fn $visit(&$($mut)? self, f: &mut dyn FnMut(&str, Role, &$($mut)? Tensor)) {
            for (i, l) in (0..).zip(&$($mut)? self.features) {
                match l {
                    Layer::Conv(c) => c.$visit(&format!("features.{i}"), f),
                    Layer::Bn(b) => b.$visit(&format!("features.{i}"), f),
                    _ => {}
                }
            }
            self.fc.$visit("fc", f);
        }
    };
}

impl Module for Sequential {
    visits!(visit);
    visits!(visit_mut, mut);
}

/// The CPU-sized `convnet` of METHOD.md with base width `w`.
pub fn convnet_plan(w: usize) -> Vec<Block> {
    let c = |out| Block::Conv { out, k: 3, pad: 1 };
    vec![c(w), c(w), Block::MaxPool, c(2 * w), c(2 * w), Block::MaxPool, c(4 * w)]
}

/// Mean Teacher's "conv-large" (CNN-13), without weight normalisation.
pub fn cnn13_plan() -> Vec<Block> {
    let c = |out| Block::Conv { out, k: 3, pad: 1 };
    vec![
        c(128),
        c(128),
        c(128),
        Block::MaxPool,
        Block::Dropout(0.5),
        c(256),
        c(256),
        c(256),
        Block::MaxPool,
        Block::Dropout(0.5),
        Block::Conv { out: 512, k: 3, pad: 0 },
        Block::Conv { out: 256, k: 1, pad: 0 },
        Block::Conv { out: 128, k: 1, pad: 0 },
    ]
}
