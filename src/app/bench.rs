//! `muscle bench`: the median time of real training steps (fresh augmented batches each step,
//! the same `Trainer` as `muscle train`), on the embedded data or, for shapes it lacks, generated
//! images marked synthetic.

use crate::data::{self, Augment, Dataset, DatasetKind, Loader};
use crate::error::Result;
use crate::nn::{Model, ModelKind, ModelSpec, Module};
use crate::rng::Rng;
use crate::train::{TrainConfig, Trainer};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// One benchmark case's result (`--json` prints it as one object).
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    /// Architecture.
    pub model: String,
    /// Objective.
    pub method: String,
    /// Labeled images per step.
    pub batch: usize,
    /// Unlabeled images per step (two views each for MUSCLE).
    pub unlabeled_batch: usize,
    /// Device.
    pub device: String,
    /// Threads.
    pub threads: usize,
    /// Whether the images were generated rather than real.
    pub synthetic: bool,
    /// Median milliseconds per step.
    pub ms_per_step: f64,
    /// Trainable parameters of the model (peers compare models of the same size).
    pub parameters: usize,
    /// Images forwarded per second at the median step time.
    pub images_per_second: f64,
    /// Steps timed.
    pub steps: usize,
    /// Allocation requests of 64 KiB or more per timed step (None when the counting allocator is
    /// not installed, as in library use; the `muscle` binary installs it).
    pub large_allocations_per_step: Option<f64>,
    /// Of those, the ones that reached the system allocator (the rest were served by the
    /// allocator's cache of freed blocks; see `alloc_count`).
    pub large_system_allocations_per_step: Option<f64>,
}

/// Random images of the shape a model needs (for models the embedded set cannot feed).
fn synthetic(channels: usize, side: usize, n: usize, classes: usize) -> Dataset {
    let mut r = Rng::new(0xbe9c, 0);
    Dataset {
        name: format!("synthetic-{channels}x{side}x{side}"),
        images: (0..n * channels * side * side).map(|_| r.below(256) as u8).collect(),
        labels: (0..n).map(|i| (i % classes) as u16).collect(),
        channels,
        height: side,
        width: side,
        classes,
        class_names: (0..classes).map(|c| c.to_string()).collect(),
    }
}

/// A trainer and a loader on the benchmark's data: one call of `step` is one real training step
/// on a fresh augmented batch (what `muscle bench` and the criterion benches time).
pub struct StepRunner {
    trainer: Trainer,
    loader: Loader,
    step: u64,
    /// Trainable parameters of the model.
    pub parameters: usize,
    /// Whether the images are generated rather than real.
    pub synthetic: bool,
}

impl StepRunner {
    /// Builds the model, optimizer and loader of `cfg` (the embedded Fashion-MNIST for convnet,
    /// generated 32x32x3 images for the others). Sets the global thread count.
    pub fn new(cfg: &TrainConfig) -> Result<StepRunner> {
        cfg.validate()?;
        cfg.device.check_available()?;
        crate::cpu::set_threads(cfg.threads)?;
        let (train, synthetic) = match cfg.model {
            ModelKind::ConvNet { .. } => (data::embedded()?.train, false),
            _ => (self::synthetic(3, 32, 2048, 10), true),
        };
        let split = data::split(&train, cfg.labels.max(train.classes), 0, 1.0, cfg.seed)?;
        let kind = if synthetic { DatasetKind::Cifar10 } else { DatasetKind::FashionMnist };
        let aug = Augment::for_dataset(kind, &train);
        let spec = ModelSpec {
            kind: cfg.model,
            in_channels: train.channels,
            height: train.height,
            width: train.width,
            classes: train.classes,
        };
        let mut model = Model::new(spec, cfg.seed)?;
        model.to_device(cfg.device)?;
        let parameters = model.num_parameters();
        let trainer = Trainer::new(cfg, model)?;
        let loader = Loader::new(Arc::new(train), &split, aug, cfg.seed, cfg.batch_plan(), 0)?;
        Ok(StepRunner { trainer, loader, step: 0, parameters, synthetic })
    }

    /// One training step on the next batch.
    pub fn step(&mut self) -> Result<()> {
        let batch = {
            let _p = crate::profile::scope("loader wait");
            self.loader.next()?
        };
        self.trainer.step(&batch, self.step)?;
        // GPU work is queued asynchronously: a step is done when the device is.
        self.trainer.model.device().synchronize()?;
        self.step += 1;
        Ok(())
    }
}

/// Times `steps` training steps after `warmup` untimed ones.
pub fn bench_training(cfg: &TrainConfig, warmup: usize, steps: usize) -> Result<BenchResult> {
    let mut runner = StepRunner::new(cfg)?;
    let mut times = Vec::with_capacity(steps);
    let counts = || (crate::alloc_count::large_allocations(), crate::alloc_count::large_system_allocations());
    let mut allocs_at_warmup = counts();
    for step in 0..(warmup + steps) {
        if step == warmup {
            crate::profile::reset();
            allocs_at_warmup = counts();
        }
        let t = Instant::now();
        runner.step()?;
        if step >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let images = cfg.images_per_step();
    Ok(BenchResult {
        model: cfg.model.to_string(),
        method: cfg.method.to_string(),
        batch: cfg.batch,
        unlabeled_batch: if cfg.method.uses_unlabeled() { cfg.unlabeled_batch } else { 0 },
        device: cfg.device.to_string(),
        threads: cfg.threads,
        synthetic: runner.synthetic,
        ms_per_step: median * 1e3,
        parameters: runner.parameters,
        images_per_second: images as f64 / median,
        steps,
        large_allocations_per_step: crate::alloc_count::large_allocations()
            .zip(allocs_at_warmup.0)
            .map(|(end, start)| (end - start) as f64 / steps as f64),
        large_system_allocations_per_step: crate::alloc_count::large_system_allocations()
            .zip(allocs_at_warmup.1)
            .map(|(end, start)| (end - start) as f64 / steps as f64),
    })
}
