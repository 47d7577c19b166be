//! Layers holding their parameters: Conv2d, BatchNorm2d, Linear.

use super::init::Init;
use super::param::Role;
use crate::autograd::Tape;
use crate::error::Result;
use crate::ops;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Writes a layer's `visit` and `visit_mut` from one list of `field: Role`, in state_dict order,
/// each tensor named `{prefix}.{field}` as in PyTorch: checkpoints are written through one and
/// read through the other, so the two must never disagree.
macro_rules! visit_fields {
    ($($field:ident: $role:ident),+) => {
        /// Lists the parameters and buffers in state_dict order.
        pub fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Role, &Tensor)) {
            $(f(&format!("{prefix}.{}", stringify!($field)), Role::$role, &self.$field);)+
        }
        /// The same, mutably.
        pub fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, Role, &mut Tensor)) {
            $(f(&format!("{prefix}.{}", stringify!($field)), Role::$role, &mut self.$field);)+
        }
    };
}

/// Whether a forward pass trains (batch statistics, dropout) or evaluates.
#[derive(Clone, Copy, Debug)]
pub struct ForwardCtx {
    /// Training mode: BN uses and updates batch statistics, dropout is active.
    pub train: bool,
    /// Run seed (keys dropout masks).
    pub seed: u64,
    /// Training step (keys dropout masks).
    pub step: u64,
    /// Which forward pass of the step (a step may run several; each gets its own masks).
    pub pass: u64,
    /// Batch norm's statistics over the whole batch of these processes (`--sync-bn`; None: this
    /// process's rows).
    pub sync_bn: Option<&'static crate::dist::World>,
    /// What the convolutions' products multiply (`--precision`; evaluation: f32).
    pub precision: crate::kernel_args::Precision,
}

impl ForwardCtx {
    /// Evaluation: running statistics, no dropout.
    pub fn eval() -> ForwardCtx {
        ForwardCtx { train: false, seed: 0, step: 0, pass: 0, sync_bn: None, precision: Default::default() }
    }
    /// Training at `step` of a run seeded `seed`.
    pub fn train(seed: u64, step: u64) -> ForwardCtx {
        ForwardCtx { train: true, seed, step, pass: 0, sync_bn: None, precision: Default::default() }
    }
}

/// A 3x3 or 1x1 convolution without bias (BN follows every conv here).
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// [out, in, k, k].
    pub weight: Tensor,
    /// Convolution stride and padding.
    pub params: ops::Conv2dParams,
}

impl Conv2d {
    /// A k x k conv from `ci` to `co` channels.
    pub fn new(ci: usize, co: usize, k: usize, stride: usize, pad: usize, init: Init, rng: &mut Rng) -> Conv2d {
        Conv2d { weight: init.param(&[co, ci, k, k], rng), params: ops::Conv2dParams { stride, pad } }
    }
    /// Applies the convolution, its products in `ctx.precision`.
    pub fn forward(&self, tape: &Tape, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        ops::conv2d(tape, x, &self.weight, self.params, ctx.precision)
    }
    visit_fields!(weight: Weight);
}

/// Batch normalisation with running statistics (PyTorch semantics: biased variance normalises,
/// the unbiased one enters the running estimate; momentum weights the new batch).
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    /// Scale (gamma).
    pub weight: Tensor,
    /// Shift (beta).
    pub bias: Tensor,
    /// Running mean.
    pub running_mean: Tensor,
    /// Running variance.
    pub running_var: Tensor,
    /// Number of training batches seen (a one-element tensor).
    pub num_batches_tracked: Tensor,
    /// PyTorch momentum (0.1 default; 0.001 in the WRN).
    pub momentum: f32,
    /// Added to the variance.
    pub eps: f32,
}

impl BatchNorm2d {
    /// A BN over `c` channels.
    pub fn new(c: usize, momentum: f32) -> BatchNorm2d {
        BatchNorm2d {
            weight: Tensor::full(&[c], 1.0).into_param(),
            bias: Tensor::zeros(&[c]).into_param(),
            running_mean: Tensor::zeros(&[c]),
            running_var: Tensor::full(&[c], 1.0),
            num_batches_tracked: Tensor::zeros(&[]),
            momentum,
            eps: 1e-5,
        }
    }

    /// Normalises; in training mode also updates the running statistics.
    pub fn forward(&mut self, tape: &Tape, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        self.forward_act(tape, x, ctx, None)
    }

    /// Normalises, then applies LeakyReLU(`slope`) in the same pass when given.
    pub fn forward_act(&mut self, tape: &Tape, x: &Tensor, ctx: &ForwardCtx, slope: Option<f32>) -> Result<Tensor> {
        if !ctx.train {
            return ops::batch_norm_eval(
                tape,
                x,
                &self.weight,
                &self.bias,
                &self.running_mean,
                &self.running_var,
                self.eps,
                slope,
            );
        }
        let (y, stats) = match ctx.sync_bn {
            Some(world) => {
                ops::batchnorm::batch_norm_train_across(tape, (x, &self.weight, &self.bias), self.eps, slope, world)?
            }
            None => ops::batch_norm_train(tape, x, &self.weight, &self.bias, self.eps, slope)?,
        };
        // Values per channel behind the statistics (every process's with --sync-bn).
        let ranks = ctx.sync_bn.map_or(1, |w| w.size());
        let m = (x.numel() / stats.mean.numel().max(1) * ranks) as f32;
        let unbias = m / (m - 1.0);
        let mom = self.momentum;
        ops::batchnorm::running_update(&mut self.running_mean, &stats.mean, mom, 1.0)?;
        ops::batchnorm::running_update(&mut self.running_var, &stats.var, mom, unbias)?;
        // The counter stays on the host (Model::to_device leaves it there).
        if let Some(t) = self.num_batches_tracked.data_mut()?.first_mut() {
            *t += 1.0;
        }
        Ok(y)
    }

    visit_fields!(
        weight: BnWeight,
        bias: BnBias,
        running_mean: RunningMean,
        running_var: RunningVar,
        num_batches_tracked: NumBatchesTracked
    );
}

/// A dense layer, PyTorch layout: weight [out, in], bias [out].
#[derive(Clone, Debug)]
pub struct Linear {
    /// [out, in].
    pub weight: Tensor,
    /// [out].
    pub bias: Tensor,
}

impl Linear {
    /// A dense layer from `fin` to `fout` features with the given initialisers.
    pub fn new(fin: usize, fout: usize, weight: Init, bias: Init, rng: &mut Rng) -> Linear {
        Linear { weight: weight.param(&[fout, fin], rng), bias: bias.param(&[fout], rng) }
    }
    /// x W^T + b.
    pub fn forward(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        ops::linear(tape, x, &self.weight, Some(&self.bias))
    }
    visit_fields!(weight: Weight, bias: Bias);
}
