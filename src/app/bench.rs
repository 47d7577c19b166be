//! `muscle bench`: the median time of real training steps (fresh augmented batches each step,
//! the same `Trainer` as `muscle train`), on the embedded data or, for shapes it lacks, generated
//! images marked synthetic; with `--op`, one kernel (`bench_op` on the CPU, `bench_op_gpu` on a GPU).

use super::bench_op::{self, OpBench};
use crate::data::{self, Augment, BatchPlan, Dataset, DatasetKind, Loader, Shard};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::{Model, ModelKind, ModelSpec, Module};
use crate::rng::Rng;
use crate::train::{estimate, TrainConfig, Trainer};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

/// The options of `muscle bench`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Architecture: convnet (embedded real data), wrn-28-2 or cnn13 (synthetic 32x32x3 images).
    #[arg(long, default_value = "convnet")]
    pub model: String,
    /// Objective: supervised or muscle.
    #[arg(long, default_value = "muscle")]
    pub method: String,
    /// Labeled images per step.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Unlabeled images per step (two views each).
    #[arg(long = "unlabeled-batch", default_value_t = 256)]
    pub unlabeled_batch: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Device: cpu, or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// What the convolutions' products multiply: f32, or bf16 (CPUs with AVX512-BF16; steps and
    /// --op conv).
    #[arg(long, default_value = "f32")]
    pub precision: String,
    /// Print one JSON object per case instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also print where the time went, by op (same as MUSCLE_PROFILE=1).
    #[arg(long)]
    pub profile: bool,
    /// Time one kernel instead of training steps: mi, softmax-ce, conv (the convnet's layers at
    /// --batch images) or gemm; prints time, GB/s or GFLOP/s and the fraction of the ceiling
    /// (copy bandwidth or FMA peak) measured by the same command; mi with more than 16 classes also
    /// times the GEMM crate doing the loss's three C x C products alone.
    #[arg(long)]
    pub op: Option<String>,
    /// Rows (images) for --op mi and softmax-ce.
    #[arg(long, default_value_t = 262_144)]
    pub rows: usize,
    /// Classes for --op mi and softmax-ce.
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// GEMM rows of the output, for --op gemm.
    #[arg(long, default_value_t = 1024)]
    pub m: usize,
    /// GEMM columns of the output, for --op gemm.
    #[arg(long, default_value_t = 1024)]
    pub n: usize,
    /// GEMM inner dimension, for --op gemm.
    #[arg(long, default_value_t = 1024)]
    pub k: usize,
}

/// `muscle bench`: times training steps (or, with `--op`, one kernel) and prints the result.
pub fn command(a: &BenchArgs) -> Result<()> {
    if let Some(op) = &a.op {
        let b = OpBench {
            op: op.parse()?,
            rows: a.rows,
            classes: a.classes,
            mnk: (a.m, a.n, a.k),
            batch: a.batch,
            reps: a.steps,
            model: a.model.clone(),
            precision: a.precision.parse()?,
        };
        let device: Device = a.device.parse()?;
        if b.precision == crate::kernel_args::Precision::Bf16 {
            if device != Device::Cpu {
                return Err(Error::usage(format!(
                    "--precision bf16: the CPU's (AVX512-BF16) products; on --device {device} the kernels compute in f32"
                )));
            }
            if b.op != bench_op::Op::Conv {
                return Err(Error::usage(format!(
                    "--precision bf16: --op {op} has no bf16 products (--op conv and the training steps have)"
                )));
            }
            if !crate::ops::conv::bf16_available() {
                return Err(Error::usage(
                    "--precision bf16: this CPU has no AVX512-BF16 (or MUSCLE_SIMD / MUSCLE_CONV turned it off)",
                ));
            }
        }
        return op_command(&b, device, a.threads, a.json);
    }
    let cfg = TrainConfig {
        model: a.model.parse()?,
        method: a.method.parse()?,
        batch: Some(a.batch),
        unlabeled_batch: Some(a.unlabeled_batch),
        threads: a.threads,
        device: a.device.parse()?,
        precision: a.precision.parse()?,
        steps: (a.steps + a.warmup).max(1) as u64,
        ..TrainConfig::default()
    };
    if a.steps == 0 {
        return Err(Error::usage("--steps: must be positive"));
    }
    if a.profile {
        crate::profile::enable();
    }
    let r = bench_training(&cfg, a.warmup, a.steps)?;
    if !crate::dist::world().is_root() {
        return Ok(());
    }
    if a.json {
        println!("{}", serde_json::to_string(&r).map_err(|e| Error::format(e.to_string()))?);
    } else {
        let memory = match (r.peak_resident_bytes, r.resident_after_build_bytes) {
            (Some(peak), Some(built)) => format!(
                ", peak memory {} ({} over the built model)",
                crate::memory::human(peak as f64),
                crate::memory::human(peak.saturating_sub(built) as f64)
            ),
            _ => String::new(),
        };
        println!(
            "{} {} batch {}+{}: {:.1} ms/step, {:.0} images/s, large allocations/step: {:.1} requested, {:.1} from the system{memory} ({} threads, {}{})",
            r.model,
            r.method,
            r.batch,
            r.unlabeled_batch,
            r.ms_per_step,
            r.images_per_second,
            r.large_allocations_per_step.unwrap_or(f64::NAN),
            r.large_system_allocations_per_step.unwrap_or(f64::NAN),
            r.threads,
            r.device,
            if r.synthetic { ", synthetic data" } else { "" }
        );
        let peak = match r.fma_peak_gflops {
            Some(p) => format!(", {:.1}% of the {p:.0} GFLOP/s FMA peak measured now", 100.0 * r.gflops / p),
            None => String::new(),
        };
        println!(
            "roofline: {:.2} GFLOP per step (convolutions and products, forward + backward, direct count): {:.1} GFLOP/s{peak}",
            r.gflop_per_step, r.gflops
        );
    }
    if crate::profile::enabled() {
        let rows = crate::profile::report();
        let timed = a.steps as f64;
        eprintln!("{:<18} {:>8} {:>12}", "op", "calls", "ms/step");
        for (name, calls, secs) in rows {
            eprintln!("{name:<18} {calls:>8} {:>12.2}", secs * 1e3 / timed);
        }
    }
    Ok(())
}

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
    /// GFLOP of a step's convolutions and products, forward and backward, by the direct count
    /// (2 per multiply-add; Winograd and other fast algorithms do fewer).
    pub gflop_per_step: f64,
    /// Those GFLOP over the median step time.
    pub gflops: f64,
    /// The CPU's FMA peak at the step's thread count, measured in the same run (CPU only).
    pub fma_peak_gflops: Option<f64>,
    /// Resident memory once the model, optimizer and loader were built (bytes).
    pub resident_after_build_bytes: Option<u64>,
    /// Peak resident memory over the steps (VmHWM restarted after the build; None where the
    /// system cannot restart it). The steps' own increment is this less the one above.
    pub peak_resident_bytes: Option<u64>,
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

/// `muscle bench --op`: times `b` on `device` (with `threads` CPU workers when given) and prints
/// one line, or one JSON object, per case.
fn op_command(b: &OpBench, device: Device, threads: Option<usize>, json: bool) -> Result<()> {
    device.check_available()?;
    if let Some(t) = threads {
        crate::cpu::set_threads(t)?;
    }
    let results = match device {
        Device::Cpu => bench_op::run(b)?,
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => super::bench_op_gpu::run(b, i)?,
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            return Err(Error::device("--device cuda: this binary was built without the `cuda` feature"))
        }
    };
    for r in results {
        if json {
            println!("{}", serde_json::to_string(&r).map_err(|e| Error::format(e.to_string()))?);
            continue;
        }
        let (rate, unit) = match (r.gflops, r.gbs) {
            (Some(g), _) => (g, "GFLOP/s"),
            (None, Some(b)) => (b, "GB/s"),
            _ => (f64::NAN, ""),
        };
        println!(
            "{}: {:.3} ms, {:.1} {unit}, {:.1}% of {:.1} {unit} ceiling (floor {:.3} ms, {:.1}x it; {} threads)",
            r.case,
            r.ms,
            rate,
            100.0 * r.fraction,
            r.ceiling,
            r.floor_ms,
            r.ms / r.floor_ms,
            r.threads
        );
    }
    Ok(())
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
        cfg.check_precision_available()?;
        crate::cpu::set_threads(cfg.threads())?;
        let (train, synthetic) = match cfg.model {
            ModelKind::ConvNet { .. } => (data::embedded()?.train, false),
            _ => (self::synthetic(3, 32, 2048, 10), true),
        };
        let split = data::split(&train, cfg.labels.max(train.classes), 0, 1.0, cfg.seed)?;
        let kind = if synthetic { DatasetKind::Cifar10 } else { DatasetKind::FashionMnist };
        let aug = Augment::for_dataset(kind, &train);
        let spec = ModelSpec {
            kind: cfg.model_kind(),
            in_channels: train.channels,
            height: train.height,
            width: train.width,
            classes: train.classes,
        };
        let mut model = Model::new(spec, cfg.seed)?;
        model.to_device(cfg.device)?;
        let parameters = model.num_parameters();
        let trainer = Trainer::new(cfg, model)?;
        // No evaluation and no separate EMA model here: only the steps.
        estimate::check(&estimate::RunShape { cfg, spec, aug: &aug, model_bytes: 0, eval_images: 0 })?;
        // Under mpirun each process takes its rows, as `train` does.
        let world = crate::dist::world();
        let plan = BatchPlan { shard: Shard { rank: world.rank(), ranks: world.size() }, ..cfg.batch_plan() };
        let loader = Loader::new(Arc::new(train), &split, aug, cfg.seed, plan, 0)?;
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
    // The steps' own memory: the high-water mark restarts once the model and loader are built.
    let peak_reset = crate::memory::reset_peak_resident();
    let built = crate::memory::resident_bytes();
    let mut times = Vec::with_capacity(steps);
    let counts = || (crate::alloc_count::large_allocations(), crate::alloc_count::large_system_allocations());
    let mut allocs_at_warmup = counts();
    let mut flops_at_warmup = crate::profile::flops();
    for step in 0..(warmup + steps) {
        if step == warmup {
            crate::profile::reset();
            allocs_at_warmup = counts();
            flops_at_warmup = crate::profile::flops();
        }
        let t = Instant::now();
        runner.step()?;
        if step >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let flops_per_step = (crate::profile::flops() - flops_at_warmup) as f64 / steps as f64;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let images = cfg.images_per_step();
    // The CPU's FMA peak, measured now with the step's threads, for the roofline line.
    let fma_peak_gflops = match cfg.device {
        Device::Cpu => crate::cpu::peak::fma_peak_gflops(cfg.threads(), 0.5).map(|(g, _)| g),
        _ => None,
    };
    Ok(BenchResult {
        model: cfg.model.to_string(),
        method: cfg.method.to_string(),
        batch: cfg.batch(),
        unlabeled_batch: if cfg.method.uses_unlabeled() { cfg.unlabeled_batch() } else { 0 },
        device: cfg.device.label(),
        threads: cfg.threads(),
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
        gflop_per_step: flops_per_step / 1e9,
        gflops: flops_per_step / median / 1e9,
        fma_peak_gflops,
        resident_after_build_bytes: built,
        peak_resident_bytes: crate::memory::peak_resident_bytes().filter(|_| peak_reset),
    })
}
