//! SGD with torch.optim.SGD's semantics: L2 weight decay added to the gradient, momentum with
//! dampening 0, optional Nesterov look-ahead.

use super::cpu::sgd_step;
use super::{
    check_base_lr, check_non_negative, check_step, parse_state, update_each, DecayScope, Optimizer, ParamStates,
};
use crate::autograd::Gradients;
use crate::error::{Error, Result};
use crate::kernel_args::SgdScalars;
use crate::nn::Module;
use crate::tensor::Tensor;

/// Hyper-parameters of SGD.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Base learning rate.
    pub lr: f32,
    /// Momentum factor (0: plain SGD, no state).
    pub momentum: f32,
    /// Nesterov momentum (needs a positive momentum).
    pub nesterov: bool,
    /// L2 coefficient added to the gradient (0: none).
    pub weight_decay: f32,
    /// Which trainable tensors are decayed.
    pub decay_scope: DecayScope,
}

impl SgdConfig {
    /// Plain SGD with learning rate `lr`, as torch.optim.SGD's defaults.
    pub fn new(lr: f32) -> SgdConfig {
        SgdConfig { lr, momentum: 0.0, nesterov: false, weight_decay: 0.0, decay_scope: DecayScope::All }
    }
}

/// Stochastic gradient descent.
#[derive(Debug)]
pub struct Sgd {
    cfg: SgdConfig,
    buffers: ParamStates<Tensor>,
}

const PREFIX: &str = "momentum_buffer.";

impl Sgd {
    /// An optimizer with no state yet; errors name the offending argument.
    pub fn new(cfg: SgdConfig) -> Result<Sgd> {
        check_base_lr(cfg.lr)?;
        check_non_negative("--momentum", cfg.momentum)?;
        check_non_negative("--weight-decay", cfg.weight_decay)?;
        if cfg.nesterov && cfg.momentum == 0.0 {
            return Err(Error::usage("--nesterov: needs a positive --momentum"));
        }
        Ok(Sgd { cfg, buffers: ParamStates::default() })
    }

    /// The configuration.
    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }
}

/// One fused update of one parameter and its momentum buffer.
fn update(p: &mut Tensor, g: &Tensor, buf: Option<&mut Tensor>, s: &SgdScalars) -> Result<()> {
    #[cfg(feature = "cuda")]
    if p.device() != crate::device::Device::Cpu {
        return super::cuda::sgd(p, g, buf, s);
    }
    let buf = match buf {
        Some(b) => Some(b.data_mut()?),
        None => None,
    };
    sgd_step(p.data_mut()?, g.data()?, buf, s);
    Ok(())
}

impl Optimizer for Sgd {
    fn step(&mut self, model: &mut dyn Module, grads: &Gradients, lr: f32) -> Result<()> {
        check_step(&*model, grads, lr, |name| self.buffers.get(name).map(|b| b.shape()))?;
        let cfg = self.cfg;
        let buffers = &mut self.buffers;
        update_each(model, grads, cfg.decay_scope, cfg.weight_decay, &mut |name, p, g, wd| {
            // PyTorch keeps no buffer without momentum, so neither does a checkpoint.
            let buf =
                if cfg.momentum != 0.0 { Some(buffers.get_or_insert(name, || Tensor::zeros(p.shape()))) } else { None };
            let s = SgdScalars { lr, momentum: cfg.momentum, weight_decay: wd, nesterov: cfg.nesterov };
            update(p, g, buf, &s)
        })
    }

    fn base_lr(&self) -> f32 {
        self.cfg.lr
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.buffers.iter().map(|(name, b)| (format!("{PREFIX}{name}"), b.detach())).collect()
    }

    fn load_state_tensors(&mut self, model: &dyn Module, state: &[(String, Tensor)]) -> Result<()> {
        if self.cfg.momentum == 0.0 {
            if let Some((key, _)) = state.first() {
                return Err(Error::format(format!("optimizer state {key}: this SGD has no momentum, so no state")));
            }
        }
        let groups = parse_state(model, state, &[PREFIX], None)?;
        self.buffers = ParamStates::from_entries(groups.into_iter().map(|(name, [buf])| (name, buf)).collect());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_model::{assert_close, check_resume, step_with_reference, Tiny, TRAINABLE};
    use super::*;

    /// torch.optim.SGD (single-tensor path, dampening 0, maximize off), in f64, for one tensor.
    struct RefSgd {
        p: Vec<f64>,
        buf: Option<Vec<f64>>,
    }

    impl RefSgd {
        fn step(&mut self, g: &[f32], lr: f64, momentum: f64, wd: f64, nesterov: bool) {
            let mut d: Vec<f64> = g.iter().zip(&self.p).map(|(&g, &p)| g as f64 + wd * p).collect();
            if momentum != 0.0 {
                let buf = match self.buf.take() {
                    None => d.clone(),
                    Some(b) => b.iter().zip(&d).map(|(b, d)| momentum * b + d).collect(),
                };
                if nesterov {
                    d = d.iter().zip(&buf).map(|(d, b)| d + momentum * b).collect();
                } else {
                    d = buf.clone();
                }
                self.buf = Some(buf);
            }
            for (p, d) in self.p.iter_mut().zip(d) {
                *p -= lr * d;
            }
        }
    }

    fn check_against_reference(cfg: SgdConfig, steps: usize) {
        let mut reference: Vec<RefSgd> = TRAINABLE
            .iter()
            .map(|n| RefSgd { p: Tiny::new().values(n).iter().map(|&v| v as f64).collect(), buf: None })
            .collect();
        let mut opt = Sgd::new(cfg).unwrap();
        let model = step_with_reference(&mut opt, cfg.lr, steps, |i, g, lr, role| {
            let wd = if cfg.decay_scope.applies(role) { cfg.weight_decay as f64 } else { 0.0 };
            reference[i].step(g, lr, cfg.momentum as f64, wd, cfg.nesterov);
        });
        for (r, name) in reference.iter().zip(TRAINABLE) {
            assert_close(&format!("{cfg:?} {steps} steps: {name}"), &model.values(name), &r.p, 1e-6);
        }
    }

    #[test]
    fn sgd_matches_reference() {
        let plain = SgdConfig::new(0.1);
        let momentum = SgdConfig { momentum: 0.9, ..plain };
        let nesterov = SgdConfig { nesterov: true, ..momentum };
        let decayed = SgdConfig { weight_decay: 0.05, ..momentum };
        let decayed_nesterov = SgdConfig { weight_decay: 0.05, decay_scope: DecayScope::KernelsOnly, ..nesterov };
        let plain_decayed = SgdConfig { weight_decay: 0.2, ..plain };
        for cfg in [plain, momentum, nesterov, decayed, decayed_nesterov, plain_decayed] {
            for steps in [1, 3] {
                check_against_reference(cfg, steps);
            }
        }
    }

    #[test]
    fn momentum_state_round_trip_is_bit_identical() {
        let cfg = SgdConfig { momentum: 0.9, nesterov: true, weight_decay: 0.01, ..SgdConfig::new(0.1) };
        let saved = check_resume(|| Sgd::new(cfg).unwrap(), &["w", "g"], 0.1, 2, 3);
        let names: Vec<&str> = saved.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["momentum_buffer.w", "momentum_buffer.g"]);
        let mut wrong = saved.clone();
        wrong[0].1 = Tensor::zeros(&[3, 2]);
        let e = Sgd::new(cfg).unwrap().load_state_tensors(&Tiny::new(), &wrong).unwrap_err();
        assert!(e.message().contains("momentum_buffer.w"), "{}", e.message());
    }

    #[test]
    fn plain_sgd_keeps_no_state_and_skips_what_has_no_gradient() {
        let mut model = Tiny::new();
        let before = model.clone();
        let mut opt = Sgd::new(SgdConfig::new(0.5)).unwrap();
        let grads = model.grads(&[("b", vec![1.0, 2.0, 3.0]), ("rv", vec![1.0; 3])]);
        opt.step(&mut model, &grads, 0.5).unwrap();
        assert_eq!(model.values("b"), vec![0.1 - 0.5, -0.2 - 1.0, 0.3 - 1.5]);
        for name in ["w", "g", "beta", "rm", "rv", "nbt"] {
            assert_eq!(model.values(name), before.values(name), "{name}");
        }
        assert!(opt.state_tensors().is_empty());
        let stray = [("momentum_buffer.b".to_string(), Tensor::zeros(&[3]))];
        assert!(opt.load_state_tensors(&model, &stray).is_err());
        // With momentum, a parameter without a gradient gets no buffer.
        let mut opt = Sgd::new(SgdConfig { momentum: 0.9, ..SgdConfig::new(0.5) }).unwrap();
        opt.step(&mut model, &grads, 0.5).unwrap();
        let names: Vec<String> = opt.state_tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["momentum_buffer.b"]);
    }

    #[test]
    fn bad_hyper_parameters_name_the_argument() {
        let msg = |cfg: SgdConfig| Sgd::new(cfg).err().unwrap().message().to_string();
        assert!(msg(SgdConfig::new(0.0)).starts_with("--lr"));
        assert!(msg(SgdConfig { momentum: -0.5, ..SgdConfig::new(0.1) }).starts_with("--momentum"));
        assert!(msg(SgdConfig { weight_decay: -0.5, ..SgdConfig::new(0.1) }).starts_with("--weight-decay"));
        assert!(msg(SgdConfig { nesterov: true, ..SgdConfig::new(0.1) }).starts_with("--nesterov"));
    }
}
