//! Adam and AdamW with torch.optim's semantics: bias-corrected moments, a step count per
//! parameter, and weight decay either added to the gradient (Adam) or applied to the parameter
//! before the update (AdamW).

use super::cpu::adam_step;
use super::{
    check_base_lr, check_beta, check_non_negative, check_step, parse_state, parse_step, update_each, DecayScope,
    Optimizer, ParamStates,
};
use crate::autograd::Gradients;
use crate::error::Result;
use crate::kernel_args::AdamScalars;
use crate::nn::Module;
use crate::tensor::Tensor;

/// Hyper-parameters of Adam/AdamW.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// Base learning rate.
    pub lr: f32,
    /// Decay of the first moment.
    pub beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// Weight decay coefficient (0: none).
    pub weight_decay: f32,
    /// AdamW's decoupled decay (p *= 1 - lr * wd) instead of Adam's L2 term in the gradient.
    pub decoupled: bool,
    /// Which trainable tensors are decayed.
    pub decay_scope: DecayScope,
}

impl AdamConfig {
    /// torch.optim.Adam's defaults with learning rate `lr`: betas (0.9, 0.999), eps 1e-8, no decay.
    pub fn adam(lr: f32) -> AdamConfig {
        AdamConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
            decay_scope: DecayScope::All,
        }
    }

    /// AdamW with learning rate `lr` and decoupled weight decay `weight_decay`, other settings
    /// as torch.optim.AdamW.
    pub fn adamw(lr: f32, weight_decay: f32) -> AdamConfig {
        AdamConfig { weight_decay, decoupled: true, ..AdamConfig::adam(lr) }
    }
}

/// Per-parameter state, as torch.optim.Adam keeps it.
#[derive(Debug)]
struct AdamState {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Adam or AdamW.
#[derive(Debug)]
pub struct Adam {
    cfg: AdamConfig,
    states: ParamStates<AdamState>,
}

const PREFIXES: [&str; 3] = ["step.", "exp_avg.", "exp_avg_sq."];

impl Adam {
    /// An optimizer with no state yet; errors name the offending argument.
    pub fn new(cfg: AdamConfig) -> Result<Adam> {
        check_base_lr(cfg.lr)?;
        check_beta("--beta1", cfg.beta1)?;
        check_beta("--beta2", cfg.beta2)?;
        check_non_negative("--eps", cfg.eps)?;
        check_non_negative("--weight-decay", cfg.weight_decay)?;
        Ok(Adam { cfg, states: ParamStates::default() })
    }

    /// The configuration.
    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }
}

/// One fused update of one parameter and its moments.
fn update(p: &mut Tensor, g: &Tensor, st: &mut AdamState, s: &AdamScalars) -> Result<()> {
    #[cfg(feature = "cuda")]
    if p.device() != crate::device::Device::Cpu {
        return super::cuda::adam(p, g, &mut st.exp_avg, &mut st.exp_avg_sq, s);
    }
    adam_step(p.data_mut()?, g.data()?, st.exp_avg.data_mut()?, st.exp_avg_sq.data_mut()?, s);
    Ok(())
}

impl Optimizer for Adam {
    fn step(&mut self, model: &mut dyn Module, grads: &Gradients, lr: f32) -> Result<()> {
        check_step(&*model, grads, lr, |name| self.states.get(name).map(|s| s.exp_avg.shape()))?;
        let cfg = self.cfg;
        let states = &mut self.states;
        update_each(model, grads, cfg.decay_scope, cfg.weight_decay, &mut |name, p, g, wd| {
            let st = states.get_or_insert(name, || AdamState {
                step: 0,
                exp_avg: Tensor::zeros(p.shape()),
                exp_avg_sq: Tensor::zeros(p.shape()),
            });
            st.step += 1;
            let s = AdamScalars::new(lr, cfg.beta1, cfg.beta2, cfg.eps, wd, cfg.decoupled, st.step);
            update(p, g, st, &s)
        })
    }

    fn base_lr(&self) -> f32 {
        self.cfg.lr
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(3 * self.states.entries.len());
        for (name, st) in self.states.iter() {
            // A 0-d float step, as PyTorch stores it; exact while it stays below 2^24.
            out.push((format!("{}{name}", PREFIXES[0]), Tensor::scalar(st.step as f32)));
            out.push((format!("{}{name}", PREFIXES[1]), st.exp_avg.detach()));
            out.push((format!("{}{name}", PREFIXES[2]), st.exp_avg_sq.detach()));
        }
        out
    }

    fn load_state_tensors(&mut self, model: &dyn Module, state: &[(String, Tensor)]) -> Result<()> {
        let groups = parse_state(model, state, &PREFIXES, Some(PREFIXES[0]))?;
        let mut entries = Vec::with_capacity(groups.len());
        for (name, [step, exp_avg, exp_avg_sq]) in groups {
            let step = parse_step(&format!("{}{name}", PREFIXES[0]), &step)?;
            entries.push((name, AdamState { step, exp_avg, exp_avg_sq }));
        }
        self.states = ParamStates::from_entries(entries);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_model::{assert_close, check_resume, fake_grad, step_with_reference, Tiny, TRAINABLE};
    use super::*;

    /// torch.optim.Adam / AdamW (single-tensor path, amsgrad off), in f64, for one tensor.
    struct RefAdam {
        p: Vec<f64>,
        m: Vec<f64>,
        v: Vec<f64>,
        t: i32,
    }

    impl RefAdam {
        fn new(p: &[f32]) -> RefAdam {
            let p: Vec<f64> = p.iter().map(|&x| x as f64).collect();
            let n = p.len();
            RefAdam { p, m: vec![0.0; n], v: vec![0.0; n], t: 0 }
        }

        #[allow(clippy::too_many_arguments)]
        fn step(&mut self, g: &[f32], lr: f64, b1: f64, b2: f64, eps: f64, wd: f64, decoupled: bool) {
            self.t += 1;
            for (i, &gi) in g.iter().enumerate() {
                let mut grad = gi as f64;
                if decoupled {
                    self.p[i] *= 1.0 - lr * wd;
                } else {
                    grad += wd * self.p[i];
                }
                self.m[i] = b1 * self.m[i] + (1.0 - b1) * grad;
                self.v[i] = b2 * self.v[i] + (1.0 - b2) * grad * grad;
                let m_hat = self.m[i] / (1.0 - b1.powi(self.t));
                let denom = self.v[i].sqrt() / (1.0 - b2.powi(self.t)).sqrt() + eps;
                self.p[i] -= lr * m_hat / denom;
            }
        }
    }

    /// Runs `steps` steps of `cfg` on Tiny with a changing learning rate, and compares every
    /// trainable tensor with the f64 reference.
    fn check_against_reference(cfg: AdamConfig, steps: usize) {
        let mut reference: Vec<RefAdam> = TRAINABLE.iter().map(|n| RefAdam::new(&Tiny::new().values(n))).collect();
        let mut opt = Adam::new(cfg).unwrap();
        let model = step_with_reference(&mut opt, cfg.lr, steps, |i, g, lr, role| {
            let wd = if cfg.decay_scope.applies(role) { cfg.weight_decay as f64 } else { 0.0 };
            reference[i].step(g, lr, cfg.beta1 as f64, cfg.beta2 as f64, cfg.eps as f64, wd, cfg.decoupled);
        });
        for (r, name) in reference.iter().zip(TRAINABLE) {
            assert_close(&format!("{name} after {steps} steps"), &model.values(name), &r.p, 2e-6);
        }
    }

    #[test]
    fn adam_matches_reference() {
        for steps in [1, 3] {
            check_against_reference(AdamConfig::adam(0.01), steps);
            let cfg = AdamConfig { beta1: 0.8, beta2: 0.95, eps: 1e-3, weight_decay: 0.3, ..AdamConfig::adam(0.05) };
            check_against_reference(cfg, steps);
        }
    }

    #[test]
    fn adamw_matches_reference() {
        for steps in [1, 3] {
            check_against_reference(AdamConfig::adamw(0.01, 0.5), steps);
            check_against_reference(
                AdamConfig { decay_scope: DecayScope::KernelsOnly, ..AdamConfig::adamw(0.02, 2.0) },
                steps,
            );
        }
    }

    #[test]
    fn adamw_kernels_only_decays_weights_only() {
        // Zero gradients: the Adam part of the update is exactly 0, so only the decay moves.
        let (lr, wd) = (0.1f32, 0.5f32);
        let zero = |m: &Tiny| -> Gradients {
            let gv: Vec<(&str, Vec<f32>)> = TRAINABLE.iter().map(|&n| (n, vec![0.0; m.get(n).numel()])).collect();
            m.grads(&gv)
        };
        let scale = (1.0 - lr as f64 * wd as f64) as f32;
        for (scope, decayed) in [(DecayScope::KernelsOnly, &["w"][..]), (DecayScope::All, &TRAINABLE[..])] {
            let mut model = Tiny::new();
            let before = model.clone();
            let mut opt = Adam::new(AdamConfig { decay_scope: scope, ..AdamConfig::adamw(lr, wd) }).unwrap();
            let grads = zero(&model);
            opt.step(&mut model, &grads, lr).unwrap();
            for (name, _, _) in &before.tensors {
                let want: Vec<f32> = if decayed.contains(&name.as_str()) {
                    before.values(name).iter().map(|v| v * scale).collect()
                } else {
                    before.values(name)
                };
                assert_eq!(model.values(name), want, "{name} with {scope:?}");
            }
        }
    }

    #[test]
    fn no_gradient_no_update_no_state_and_buffers_untouched() {
        let mut model = Tiny::new();
        let before = model.clone();
        let mut opt = Adam::new(AdamConfig::adamw(0.01, 0.1)).unwrap();
        // A gradient for a buffer must be ignored too.
        let grads = model.grads(&[("w", fake_grad("w", 6, 0)), ("rm", vec![1.0; 3]), ("nbt", vec![1.0])]);
        opt.step(&mut model, &grads, 0.01).unwrap();
        assert_ne!(model.values("w"), before.values("w"));
        for name in ["b", "g", "beta", "rm", "rv", "nbt"] {
            assert_eq!(model.values(name), before.values(name), "{name}");
        }
        let names: Vec<String> = opt.state_tensors().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["step.w", "exp_avg.w", "exp_avg_sq.w"]);
    }

    #[test]
    fn state_is_created_in_visit_order_and_steps_per_parameter() {
        let mut model = Tiny::new();
        let mut opt = Adam::new(AdamConfig::adam(0.01)).unwrap();
        let grads = model.grads(&[("g", fake_grad("g", 3, 0))]);
        opt.step(&mut model, &grads, 0.01).unwrap();
        let grads = model.grads(&[("w", fake_grad("w", 6, 1)), ("g", fake_grad("g", 3, 1))]);
        opt.step(&mut model, &grads, 0.01).unwrap();
        let state = opt.state_tensors();
        let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["step.g", "exp_avg.g", "exp_avg_sq.g", "step.w", "exp_avg.w", "exp_avg_sq.w"]);
        assert_eq!(state[0].1.item().unwrap(), 2.0);
        assert_eq!(state[3].1.item().unwrap(), 1.0);
    }

    #[test]
    fn adam_minimises_a_quadratic() {
        // loss = 1/2 sum a_i (x_i - c_i)^2 over w, badly conditioned (a spans 0.1..10).
        let mut model = Tiny::new();
        let c = [1.0f32, -2.0, 0.5, 3.0, -1.0, 0.25];
        let a = [0.1f32, 0.5, 1.0, 2.0, 5.0, 10.0];
        let loss = |x: &[f32]| -> f64 {
            x.iter().zip(c).zip(a).map(|((&x, c), a)| 0.5 * a as f64 * ((x - c) as f64).powi(2)).sum()
        };
        let mut opt = Adam::new(AdamConfig::adam(0.05)).unwrap();
        let start = loss(&model.values("w"));
        for _ in 0..200 {
            let x = model.values("w");
            let g: Vec<f32> = x.iter().zip(c).zip(a).map(|((&x, c), a)| a * (x - c)).collect();
            let grads = model.grads(&[("w", g)]);
            opt.step(&mut model, &grads, 0.05).unwrap();
        }
        let end = loss(&model.values("w"));
        assert!(end < start * 1e-3, "loss {start} -> {end}");
    }

    #[test]
    fn state_round_trip_continues_bit_identically() {
        let cfg = AdamConfig { decay_scope: DecayScope::KernelsOnly, ..AdamConfig::adamw(0.01, 0.3) };
        let saved = check_resume(|| Adam::new(cfg).unwrap(), &TRAINABLE, 0.01, 3, 3);
        // The snapshot taken mid-way was not changed by the later steps.
        assert_eq!(saved[0].1.item().unwrap(), 3.0);
    }

    #[test]
    fn loading_bad_state_fails_naming_the_tensor() {
        let model = Tiny::new();
        let mut opt = Adam::new(AdamConfig::adam(0.01)).unwrap();
        let good = vec![
            ("step.b".to_string(), Tensor::scalar(2.0)),
            ("exp_avg.b".to_string(), Tensor::zeros(&[3])),
            ("exp_avg_sq.b".to_string(), Tensor::zeros(&[3])),
        ];
        opt.load_state_tensors(&model, &good).unwrap();
        let mut wrong = good.clone();
        wrong[2].1 = Tensor::zeros(&[4]);
        let e = opt.load_state_tensors(&model, &wrong).unwrap_err();
        assert!(e.message().contains("exp_avg_sq.b"), "{}", e.message());
        let e = opt.load_state_tensors(&model, &good[..2]).unwrap_err();
        assert!(e.message().contains("exp_avg_sq.b"), "{}", e.message());
        let mut renamed = good.clone();
        renamed[1].0 = "momentum_buffer.b".into();
        let e = opt.load_state_tensors(&model, &renamed).unwrap_err();
        assert!(e.message().contains("momentum_buffer.b"), "{}", e.message());
        let mut frac = good;
        frac[0].1 = Tensor::scalar(0.5);
        assert!(opt.load_state_tensors(&model, &frac).unwrap_err().message().contains("step.b"));
    }

    #[test]
    fn wrong_gradient_shape_fails_before_any_write() {
        let mut model = Tiny::new();
        let before = model.bits();
        let mut opt = Adam::new(AdamConfig::adam(0.01)).unwrap();
        let mut grads = model.grads(&[("w", fake_grad("w", 6, 0))]);
        grads.accumulate(model.get("g").id(), Tensor::zeros(&[4])).unwrap();
        let e = opt.step(&mut model, &grads, 0.01).unwrap_err();
        assert!(e.message().contains("gradient of g"), "{}", e.message());
        assert_eq!(model.bits(), before);
        assert!(opt.state_tensors().is_empty());
        assert!(opt.step(&mut model, &Gradients::default(), -1.0).is_err());
    }

    #[test]
    fn bad_hyper_parameters_name_the_argument() {
        let msg = |cfg: AdamConfig| Adam::new(cfg).err().unwrap().message().to_string();
        assert!(msg(AdamConfig::adam(0.0)).starts_with("--lr"));
        assert!(msg(AdamConfig::adam(-1.0)).starts_with("--lr"));
        assert!(msg(AdamConfig::adam(f32::NAN)).starts_with("--lr"));
        assert!(msg(AdamConfig { beta1: 1.0, ..AdamConfig::adam(0.1) }).starts_with("--beta1"));
        assert!(msg(AdamConfig { beta2: -0.1, ..AdamConfig::adam(0.1) }).starts_with("--beta2"));
        assert!(msg(AdamConfig::adamw(0.1, -0.01)).starts_with("--weight-decay"));
        assert!(msg(AdamConfig { eps: -1.0, ..AdamConfig::adam(0.1) }).starts_with("--eps"));
        let e = Adam::new(AdamConfig::adam(0.0)).err().unwrap();
        assert_eq!(e.kind(), crate::error::ErrorKind::Usage);
        assert!(Adam::new(AdamConfig { beta1: 0.0, ..AdamConfig::adam(0.1) }).is_ok());
    }
}
