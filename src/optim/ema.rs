//! The exponential moving average of a model's named tensors, used for evaluation.
//!
//! Trainable tensors are averaged. Batch-norm running statistics are copied from the model by
//! default (they are already averages, and averaging them again lags the weights they belong to),
//! or averaged on request; the batch counter is always copied, since its average means nothing.

use super::cpu::ema_update;
use crate::error::{Error, Result};
use crate::nn::{Module, Role};
use crate::tensor::{fmt_shape, Tensor};

/// How the decay of the average depends on the step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EmaDecay {
    /// d_t = min(max, (1 + t) / (10 + t)): early steps forget the random initialisation fast.
    Warmup {
        /// The decay the schedule approaches (0.999 in the default recipe).
        max: f32,
    },
    /// The same decay at every step (MixMatch: 0.999).
    Constant(f32),
}

impl Default for EmaDecay {
    fn default() -> Self {
        EmaDecay::Warmup { max: 0.999 }
    }
}

impl EmaDecay {
    /// The decay applied by the update after optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f32 {
        match *self {
            EmaDecay::Warmup { max } => {
                let t = step as f64;
                (max as f64).min((1.0 + t) / (10.0 + t)) as f32
            }
            EmaDecay::Constant(d) => d,
        }
    }

    fn check(&self) -> Result<()> {
        let d = match *self {
            EmaDecay::Warmup { max } => max,
            EmaDecay::Constant(d) => d,
        };
        if !(0.0..1.0).contains(&d) {
            return Err(Error::usage(format!("--ema-decay: must be in [0, 1), got {d}")));
        }
        Ok(())
    }
}

/// One averaged tensor.
#[derive(Debug)]
struct Entry {
    name: String,
    role: Role,
    tensor: Tensor,
}

/// An exponential moving average of every named tensor of a model, in visit order.
#[derive(Debug)]
pub struct Ema {
    decay: EmaDecay,
    average_buffers: bool,
    entries: Vec<Entry>,
}

impl Ema {
    /// An average that starts as a copy of `model`; `average_buffers` averages the running
    /// statistics too instead of copying them.
    pub fn new(model: &dyn Module, decay: EmaDecay, average_buffers: bool) -> Result<Ema> {
        decay.check()?;
        let mut entries = Vec::new();
        // detach shares the storage; the first write on either side copies it.
        model.visit(&mut |name, role, t| entries.push(Entry { name: name.to_string(), role, tensor: t.detach() }));
        Ok(Ema { decay, average_buffers, entries })
    }

    /// The decay schedule.
    pub fn decay(&self) -> EmaDecay {
        self.decay
    }

    /// Whether running statistics are averaged (else copied).
    pub fn averages_buffers(&self) -> bool {
        self.average_buffers
    }

    /// Checks that `model` lists the same names, roles and shapes in the same order.
    fn check_layout(&self, model: &dyn Module) -> Result<()> {
        let mut entries = self.entries.iter().enumerate();
        model.try_visit(&mut |name, role, t| match entries.next() {
            None => Err(Error::shape(format!("EMA: the model has a tensor {name} the average lacks"))),
            Some((i, e)) if e.name != name || e.role != role => Err(Error::shape(format!(
                "EMA: tensor {i} is {name} ({role:?}) in the model but {} ({:?}) in the average",
                e.name, e.role
            ))),
            Some((_, e)) if e.tensor.shape() != t.shape() => Err(Error::shape(format!(
                "EMA: {name} has shape {} in the model but {} in the average",
                fmt_shape(t.shape()),
                fmt_shape(e.tensor.shape())
            ))),
            Some(_) => Ok(()),
        })?;
        if let Some((_, e)) = entries.next() {
            return Err(Error::shape(format!("EMA: the model lacks the tensor {}", e.name)));
        }
        Ok(())
    }

    /// Folds `model` into the average after optimizer step `step` (0-based).
    pub fn update(&mut self, model: &dyn Module, step: u64) -> Result<()> {
        self.check_layout(model)?;
        let d = self.decay.at(step);
        let average_buffers = self.average_buffers;
        let mut entries = self.entries.iter_mut();
        model.try_visit(&mut |name, role, t| {
            let Some(e) = entries.next() else { return Ok(()) };
            let average = role.is_trainable() || (average_buffers && role != Role::NumBatchesTracked);
            let run = |avg: &mut Tensor| -> Result<()> {
                if avg.device() != t.device() {
                    *avg = avg.to_device(t.device())?;
                }
                if !average {
                    return avg.assign(t);
                }
                #[cfg(feature = "cuda")]
                if t.device() != crate::device::Device::Cpu {
                    return super::cuda::ema(avg, t, d);
                }
                ema_update(avg.data_mut()?, t.data()?, d);
                Ok(())
            };
            run(&mut e.tensor).map_err(|x| x.context(format!("EMA of {name}")))
        })
    }

    /// Writes the averaged values into `model` (same architecture), buffers included.
    pub fn apply_to(&self, model: &mut dyn Module) -> Result<()> {
        self.check_layout(&*model)?;
        let mut entries = self.entries.iter();
        model.try_visit_mut(&mut |name, _, t| {
            let Some(e) = entries.next() else { return Ok(()) };
            t.assign(&e.tensor).map_err(|x| x.context(format!("EMA into {name}")))
        })
    }

    /// The averaged tensors with the model's names, in visit order (for checkpoints).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.entries.iter().map(|e| (e.name.clone(), e.tensor.detach())).collect()
    }

    /// Replaces the averages with `state` (from [`Ema::tensors`]), matched by name; every tensor
    /// must be given once, with its shape.
    pub fn load_tensors(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let mut loaded: Vec<Option<Tensor>> = vec![None; self.entries.len()];
        for (name, t) in state {
            let Some(i) = self.entries.iter().position(|e| &e.name == name) else {
                return Err(Error::format(format!("EMA state {name}: the model has no such tensor")));
            };
            let want = self.entries[i].tensor.shape();
            if t.shape() != want {
                return Err(Error::format(format!(
                    "EMA state {name}: shape {} but the model has {}",
                    fmt_shape(t.shape()),
                    fmt_shape(want)
                )));
            }
            if loaded[i].is_some() {
                return Err(Error::format(format!("EMA state {name}: given twice")));
            }
            loaded[i] = Some(t.detach());
        }
        if let Some(i) = loaded.iter().position(Option::is_none) {
            return Err(Error::format(format!("EMA state {}: missing", self.entries[i].name)));
        }
        for (e, t) in self.entries.iter_mut().zip(loaded.into_iter().flatten()) {
            e.tensor = t;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_model::Tiny;
    use super::*;

    #[test]
    fn decay_schedule_values() {
        let d = EmaDecay::Warmup { max: 0.999 };
        assert_eq!(d.at(0), 0.1);
        assert_eq!(d.at(1), (2.0f64 / 11.0) as f32);
        assert_eq!(d.at(100), (101.0f64 / 110.0) as f32);
        assert_eq!(d.at(100_000), 0.999);
        assert_eq!(EmaDecay::default(), d);
        assert_eq!(EmaDecay::Constant(0.999).at(0), 0.999);
        assert_eq!(EmaDecay::Constant(0.999).at(7), 0.999);
    }

    /// Sets every value of `model` from f(name, index).
    fn fill(model: &mut Tiny, f: impl Fn(&str, usize) -> f32) {
        for (name, _, t) in &mut model.tensors {
            for (i, v) in t.data_mut().unwrap().iter_mut().enumerate() {
                *v = f(name, i);
            }
        }
    }

    #[test]
    fn averages_trainables_and_copies_buffers() {
        for average_buffers in [false, true] {
            let mut model = Tiny::new();
            let start = model.clone();
            let mut ema = Ema::new(&model, EmaDecay::Warmup { max: 0.999 }, average_buffers).unwrap();
            let mut expect: Vec<Vec<f64>> =
                start.tensors.iter().map(|(_, _, t)| t.to_vec().unwrap().iter().map(|&v| v as f64).collect()).collect();
            for step in 0..3u64 {
                fill(&mut model, |n, i| (n.len() * 3 + i) as f32 * 0.25 - step as f32);
                ema.update(&model, step).unwrap();
                let d = (1.0 + step as f64) / (10.0 + step as f64);
                for ((_, role, t), e) in model.tensors.iter().zip(&mut expect) {
                    let averaged = role.is_trainable() || (average_buffers && *role != Role::NumBatchesTracked);
                    for (x, &v) in e.iter_mut().zip(t.to_vec().unwrap().iter()) {
                        *x = if averaged { d * *x + (1.0 - d) * v as f64 } else { v as f64 };
                    }
                }
            }
            for ((name, t), e) in ema.tensors().iter().zip(&expect) {
                for (&a, &b) in t.to_vec().unwrap().iter().zip(e) {
                    assert!((a as f64 - b).abs() < 1e-5, "{name} (buffers averaged: {average_buffers}): {a} vs {b}");
                }
            }
            // Buffers copied by default are exactly the model's.
            let got = ema.tensors();
            let rm = &got.iter().find(|(n, _)| n == "rm").unwrap().1;
            assert_eq!(rm.to_vec().unwrap() == model.values("rm"), !average_buffers);
            let nbt = &got.iter().find(|(n, _)| n == "nbt").unwrap().1;
            assert_eq!(nbt.to_vec().unwrap(), model.values("nbt"));
            // The averaged weights differ from the model's, or the check above proves nothing.
            let w = &got.iter().find(|(n, _)| n == "w").unwrap().1;
            assert_ne!(w.to_vec().unwrap(), model.values("w"));
        }
    }

    #[test]
    fn constant_decay_by_hand() {
        let mut model = Tiny::new();
        let mut ema = Ema::new(&model, EmaDecay::Constant(0.5), false).unwrap();
        let w0 = model.values("w");
        fill(&mut model, |_, i| i as f32);
        ema.update(&model, 1000).unwrap();
        let want: Vec<f32> = w0.iter().enumerate().map(|(i, &v)| 0.5 * v + 0.5 * i as f32).collect();
        assert_eq!(ema.tensors()[0].1.to_vec().unwrap(), want);
    }

    #[test]
    fn apply_to_writes_every_value() {
        let mut model = Tiny::new();
        let mut ema = Ema::new(&model, EmaDecay::Constant(0.9), true).unwrap();
        fill(&mut model, |_, i| 10.0 + i as f32);
        ema.update(&model, 0).unwrap();
        let mut target = Tiny::new();
        fill(&mut target, |_, _| -7.0);
        let ids: Vec<_> = target.tensors.iter().map(|(_, _, t)| t.id()).collect();
        ema.apply_to(&mut target).unwrap();
        for ((name, t), (_, _, x)) in ema.tensors().iter().zip(&target.tensors) {
            assert_eq!(&t.to_vec().unwrap(), &x.to_vec().unwrap(), "{name}");
        }
        // Written in place: the model's tensors keep their identity.
        assert_eq!(ids, target.tensors.iter().map(|(_, _, t)| t.id()).collect::<Vec<_>>());
        assert_ne!(target.values("w"), Tiny::new().values("w"));
    }

    #[test]
    fn mismatched_models_and_states_are_errors() {
        let model = Tiny::new();
        let mut ema = Ema::new(&model, EmaDecay::default(), false).unwrap();
        let mut other = Tiny::new();
        *other.get_mut("b") = Tensor::zeros(&[4]);
        assert!(ema.update(&other, 0).unwrap_err().message().contains("b has shape"));
        assert!(ema.apply_to(&mut other).is_err());
        let mut shorter = Tiny::new();
        shorter.tensors.pop();
        assert!(ema.update(&shorter, 0).unwrap_err().message().contains("nbt"));
        let mut renamed = Tiny::new();
        renamed.tensors[1].0 = "bias".into();
        assert!(ema.apply_to(&mut renamed).is_err());

        let saved = ema.tensors();
        ema.load_tensors(&saved).unwrap();
        let mut wrong = saved.clone();
        wrong[2].1 = Tensor::zeros(&[2]);
        assert!(ema.load_tensors(&wrong).unwrap_err().message().contains("EMA state g"));
        assert!(ema.load_tensors(&saved[1..]).unwrap_err().message().contains("EMA state w: missing"));
        assert!(Ema::new(&model, EmaDecay::Constant(1.0), false).is_err());
        assert!(Ema::new(&model, EmaDecay::Warmup { max: -0.1 }, false)
            .unwrap_err()
            .message()
            .starts_with("--ema-decay"));
    }

    #[test]
    fn load_tensors_round_trip() {
        let mut model = Tiny::new();
        let mut a = Ema::new(&model, EmaDecay::default(), false).unwrap();
        fill(&mut model, |_, i| i as f32);
        a.update(&model, 0).unwrap();
        let mut b = Ema::new(&Tiny::new(), EmaDecay::default(), false).unwrap();
        b.load_tensors(&a.tensors()).unwrap();
        fill(&mut model, |_, i| 2.0 * i as f32);
        a.update(&model, 1).unwrap();
        b.update(&model, 1).unwrap();
        let bits = |e: &Ema| -> Vec<u32> {
            e.tensors().iter().flat_map(|(_, t)| t.to_vec().unwrap()).map(f32::to_bits).collect()
        };
        assert_eq!(bits(&a), bits(&b));
    }
}
