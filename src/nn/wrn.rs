//! WRN-28-2 as MixMatch's PyTorch ports define it (convs without bias, BN momentum 0.001,
//! LeakyReLU 0.1), with their parameter names.

use super::init::Init;
use super::layers::{BatchNorm2d, Conv2d, ForwardCtx, Linear};
use super::param::{Module, Role};
use crate::autograd::Tape;
use crate::error::Result;
use crate::ops;
use crate::rng::Rng;
use crate::tensor::Tensor;

const SLOPE: f32 = 0.1;
const BN_MOMENTUM: f32 = 0.001;

/// Writes `visit` (`block_visits!(visit)`) and `visit_mut` (`block_visits!(visit_mut, mut)`) of a
/// block from one listing: checkpoints are written through one and read through the other.
macro_rules! block_visits {
    ($visit:ident $(, $mut:tt)?) => {
        fn $visit(&$($mut)? self, p: &str, f: &mut dyn FnMut(&str, Role, &$($mut)? Tensor)) {
            self.bn1.$visit(&format!("{p}.bn1"), f);
            self.conv1.$visit(&format!("{p}.conv1"), f);
            self.bn2.$visit(&format!("{p}.bn2"), f);
            self.conv2.$visit(&format!("{p}.conv2"), f);
            if let Some(s) = &$($mut)? self.shortcut {
                s.$visit(&format!("{p}.convShortcut"), f);
            }
        }
    };
}

/// The same for the whole network, blocks named `block{stage}.layer.{i}` (stages from 1).
macro_rules! visits {
    ($visit:ident $(, $mut:tt)?) => {
        fn $visit(&$($mut)? self, f: &mut dyn FnMut(&str, Role, &$($mut)? Tensor)) {
            self.conv1.$visit("conv1", f);
            for (s, stage) in (1..).zip(&$($mut)? self.blocks) {
                for (i, b) in (0..).zip(stage) {
                    b.$visit(&format!("block{s}.layer.{i}"), f);
                }
            }
            self.bn1.$visit("bn1", f);
            self.fc.$visit("fc", f);
        }
    };
}

/// A pre-activation residual block.
#[derive(Clone, Debug)]
pub struct BasicBlock {
    bn1: BatchNorm2d,
    conv1: Conv2d,
    bn2: BatchNorm2d,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    activate_before_residual: bool,
}

fn conv(ci: usize, co: usize, k: usize, stride: usize, rng: &mut Rng) -> Conv2d {
    Conv2d::new(ci, co, k, stride, k / 2, Init::kaiming_normal_fan_out(co * k * k), rng)
}

impl BasicBlock {
    fn new(cin: usize, cout: usize, stride: usize, activate_before_residual: bool, rng: &mut Rng) -> BasicBlock {
        BasicBlock {
            bn1: BatchNorm2d::new(cin, BN_MOMENTUM),
            conv1: conv(cin, cout, 3, stride, rng),
            bn2: BatchNorm2d::new(cout, BN_MOMENTUM),
            conv2: conv(cout, cout, 3, 1, rng),
            shortcut: (cin != cout).then(|| conv(cin, cout, 1, stride, rng)),
            activate_before_residual,
        }
    }

    fn forward(&mut self, tape: &Tape, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let (residual_in, conv_in) = match &self.shortcut {
            None => {
                let a = self.bn1.forward_act(tape, x, ctx, Some(SLOPE))?;
                (x.clone(), a)
            }
            Some(_) if self.activate_before_residual => {
                let a = self.bn1.forward_act(tape, x, ctx, Some(SLOPE))?;
                (a.clone(), a)
            }
            // The ports compute bn1 here and never use it: skip the dead work, keep the weights.
            Some(_) => (x.clone(), x.clone()),
        };
        let h = self.conv1.forward(tape, &conv_in, ctx)?;
        let h = self.bn2.forward_act(tape, &h, ctx, Some(SLOPE))?;
        let h = self.conv2.forward(tape, &h, ctx)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(tape, &residual_in, ctx)?,
            None => residual_in,
        };
        ops::add(tape, &skip, &h)
    }

    block_visits!(visit);
    block_visits!(visit_mut, mut);
}

/// WRN-depth-widen: conv3x3 16, three stages of (depth - 4) / 6 blocks, BN, LReLU, pool, dense.
#[derive(Clone, Debug)]
pub struct WideResNet {
    conv1: Conv2d,
    blocks: [Vec<BasicBlock>; 3],
    bn1: BatchNorm2d,
    fc: Linear,
}

impl WideResNet {
    /// WRN-28-2 for `in_channels`-channel input and `classes` outputs.
    pub fn new(in_channels: usize, classes: usize, depth: usize, widen: usize, rng: &mut Rng) -> WideResNet {
        let n = (depth - 4) / 6;
        let widths = [16, 16 * widen, 32 * widen, 64 * widen];
        let stage = |s: usize, rng: &mut Rng| -> Vec<BasicBlock> {
            (0..n)
                .map(|i| {
                    let cin = if i == 0 { widths[s] } else { widths[s + 1] };
                    let stride = if i == 0 && s > 0 { 2 } else { 1 };
                    BasicBlock::new(cin, widths[s + 1], stride, s == 0, rng)
                })
                .collect()
        };
        let conv1 = conv(in_channels, widths[0], 3, 1, rng);
        let blocks = [stage(0, rng), stage(1, rng), stage(2, rng)];
        let c = widths[3];
        let fc = Linear::new(c, classes, Init::xavier_normal(c, classes), Init::Const(0.0), rng);
        WideResNet { conv1, blocks, bn1: BatchNorm2d::new(c, BN_MOMENTUM), fc }
    }

    /// Forward to logits.
    pub fn forward(&mut self, tape: &Tape, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut h = self.conv1.forward(tape, x, ctx)?;
        for stage in self.blocks.iter_mut() {
            for b in stage.iter_mut() {
                h = b.forward(tape, &h, ctx)?;
            }
        }
        let h = self.bn1.forward_act(tape, &h, ctx, Some(SLOPE))?;
        let h = ops::global_avg_pool(tape, &h)?;
        self.fc.forward(tape, &h)
    }
}

impl Module for WideResNet {
    visits!(visit);
    visits!(visit_mut, mut);
}
