//! What a run needs in memory, known before its first step, against what the machine allows.
//!
//! The estimate is measured, not modelled: a throwaway model runs a few real training steps at
//! tiny batch sizes (and evaluations at tiny batch sizes) while the binary's allocator
//! (`alloc_count`) and the device buffers (`cuda::buffer`) keep high-water marks; the peaks are
//! linear in the number of images, so three probes give the fixed part and the bytes per labeled
//! and per unlabeled image, which scale to the requested batch. Large images are probed at 32x32
//! and scaled by the pixel count (every model ends in global average pooling). Added to that:
//! the process as it is now (data set, model, optimizer: resident memory), the EMA model's copy
//! and the loader's three batches in flight (one in use, one queued, one being built).
//!
//! The limit is `MUSCLE_MEMORY_LIMIT` when set (a size such as `512M`, or `off`), else what this
//! process holds plus what it may still take: the cgroup's `memory.max` less its usage when a
//! limit is set, else MemAvailable; on a GPU, the device's free memory.

use super::config::TrainConfig;
use super::eval::evaluate;
use super::Trainer;
use crate::data::{Augment, Dataset, StepBatch};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::memory::{host_limit, human, resident_bytes};
use crate::nn::{Model, ModelSpec};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Images are probed at their own size up to this many pixels, above it at `PROBE_SIDE` squared.
const NATIVE_PIXELS: usize = 64 * 64;
const PROBE_SIDE: usize = 32;
/// Images per batch of the smallest probe; the others add as many again. Peaks move by a few
/// MB with the threads' timing, so the probes must be far enough apart for that to be small per
/// image (at 4 images apart the estimate of a default step varied by 2x; at 16, by a few %).
const PROBE_IMAGES: usize = 16;

/// Peak bytes above the starting point of one measured piece of work (host, device); also a
/// number of bytes per image, so that the linear fits below read as arithmetic.
#[derive(Clone, Copy, Debug, Default)]
struct Peak {
    host: f64,
    device: f64,
}

impl std::ops::Add for Peak {
    type Output = Peak;
    fn add(self, o: Peak) -> Peak {
        Peak { host: self.host + o.host, device: self.device + o.device }
    }
}

impl std::ops::Sub for Peak {
    type Output = Peak;
    fn sub(self, o: Peak) -> Peak {
        Peak { host: self.host - o.host, device: self.device - o.device }
    }
}

impl std::ops::Mul<f64> for Peak {
    type Output = Peak;
    fn mul(self, k: f64) -> Peak {
        Peak { host: self.host * k, device: self.device * k }
    }
}

impl Peak {
    /// Negative parts (a fit's noise) as 0.
    fn at_least_zero(self) -> Peak {
        Peak { host: self.host.max(0.0), device: self.device.max(0.0) }
    }
}

/// Runs `f` and returns the host and device bytes it needed at its peak, from an empty pool.
fn measure(device: Device, f: impl FnOnce() -> Result<()>) -> Result<Peak> {
    crate::pool::clear();
    let host0 = crate::alloc_count::live_bytes().unwrap_or(0);
    crate::alloc_count::reset_peak();
    #[cfg(feature = "cuda")]
    let device0 = {
        crate::cuda::buffer::reset_device_peak();
        crate::cuda::buffer::device_bytes_live()
    };
    f()?;
    device.synchronize()?;
    let host = crate::alloc_count::peak_bytes().unwrap_or(0).saturating_sub(host0) as f64;
    #[cfg(feature = "cuda")]
    let device = crate::cuda::buffer::device_bytes_peak().saturating_sub(device0) as f64;
    #[cfg(not(feature = "cuda"))]
    let device = {
        let _ = device;
        0.0
    };
    crate::pool::clear();
    Ok(Peak { host, device })
}

/// Random images in [-1, 1] of shape [n, c, h, w] (the values do not change what is allocated).
fn images(n: usize, c: usize, h: usize, w: usize, rng: &mut Rng) -> Result<Tensor> {
    Tensor::from_vec((0..n * c * h * w).map(|_| rng.range(-1.0, 1.0)).collect(), &[n, c, h, w])
}

/// The estimate of one run.
#[derive(Clone, Debug)]
pub struct Estimate {
    /// Host bytes the process is expected to hold at its peak.
    pub host: u64,
    /// Device bytes the run is expected to take on top of what it holds when estimated (GPU runs).
    pub device: Option<u64>,
    /// Whether the evaluation, not a training step, is the peak.
    pub eval_peak: bool,
}

/// What the estimate needs to know about a run.
pub struct RunShape<'a> {
    /// The run's options (resolved).
    pub cfg: &'a TrainConfig,
    /// The model's specification (input shape and classes).
    pub spec: ModelSpec,
    /// The training set's normalisation (for the evaluation probe).
    pub aug: &'a Augment,
    /// Bytes of one copy of the model's tensors (the EMA model is one more).
    pub model_bytes: u64,
    /// Images the evaluation runs at once (0: no evaluation, `muscle bench`).
    pub eval_images: usize,
}

/// Measures the run's memory as the module documentation says; None when this process does not
/// count its allocations (library use without muscle's allocator).
pub fn estimate(run: &RunShape<'_>) -> Result<Option<Estimate>> {
    if crate::alloc_count::live_bytes().is_none() {
        return Ok(None);
    }
    let cfg = run.cfg;
    let plan = cfg.batch_plan();
    // Before the probes, whose freed blocks stay resident in the allocator's cache.
    let held = resident_bytes().unwrap_or(0) as f64;
    let spec = &run.spec;
    let (h, w) = if spec.height * spec.width <= NATIVE_PIXELS {
        (spec.height, spec.width)
    } else {
        (PROBE_SIDE.min(spec.height), PROBE_SIDE.min(spec.width))
    };
    let scale = (spec.height * spec.width) as f64 / (h * w) as f64;
    let small = ModelSpec { height: h, width: w, ..*spec };
    let mut rng = Rng::new(0x6d656d, 0);
    let c = spec.in_channels;

    // One training step at (labeled, unlabeled) images on a fresh model and optimizer.
    let mut step_peak = |labeled: usize, unlabeled: usize| -> Result<Peak> {
        let mut model = Model::new(small, cfg.seed)?;
        model.to_device(cfg.device)?;
        let mut trainer = Trainer::new(cfg, model)?;
        let views = (0..plan.views).map(|_| images(unlabeled, c, h, w, &mut rng)).collect::<Result<Vec<_>>>()?;
        let batch = StepBatch {
            step: 0,
            labeled: images(labeled, c, h, w, &mut rng)?,
            views,
            labels: (0..labeled).map(|i| i % spec.classes).collect::<Vec<_>>().into(),
            labeled_view2: if plan.labeled_second_view { Some(images(labeled, c, h, w, &mut rng)?) } else { None },
            labeled_idx: (0..labeled).collect(),
            unlabeled_idx: (0..if plan.views > 0 { unlabeled } else { 0 }).collect(),
            unlabeled_labels: (0..if plan.views > 0 { unlabeled } else { 0 }).map(|i| i % spec.classes).collect(),
        };
        measure(cfg.device, || trainer.step(&batch, 0).map(|_| ()))
    };
    let (l0, u0) = (if plan.labeled > 0 { PROBE_IMAGES } else { 0 }, if plan.views > 0 { PROBE_IMAGES } else { 0 });
    let base = step_peak(l0, u0)?;
    let per_labeled = if l0 > 0 { slope(base, step_peak(2 * l0, u0)?, l0) } else { Peak::default() };
    let per_unlabeled = if u0 > 0 { slope(base, step_peak(l0, 2 * u0)?, u0) } else { Peak::default() };
    let fixed = (base - per_labeled * l0 as f64 - per_unlabeled * u0 as f64).at_least_zero();
    let unlabeled = plan.unlabeled * usize::from(plan.views > 0);
    let step = fixed + (per_labeled * plan.labeled as f64 + per_unlabeled * unlabeled as f64) * scale;

    // The evaluation: a forward pass without a tape over one batch of n images, at two sizes.
    let eval = if run.eval_images > 0 {
        let mut eval_peak = |n: usize| -> Result<Peak> {
            let mut model = Model::new(small, cfg.seed)?;
            model.to_device(cfg.device)?;
            let ds = Dataset {
                name: "memory probe".into(),
                images: (0..n * c * h * w).map(|_| rng.below(256) as u8).collect(),
                labels: (0..n).map(|i| (i % spec.classes) as u16).collect(),
                channels: c,
                height: h,
                width: w,
                classes: spec.classes,
                class_names: (0..spec.classes).map(|k| k.to_string()).collect(),
            };
            let aug = Augment::normalize_only(run.aug.mean.clone(), run.aug.std.clone());
            measure(cfg.device, || evaluate(&mut model, &ds, None, &aug, n).map(|_| ()))
        };
        let e0 = eval_peak(PROBE_IMAGES)?;
        let per = slope(e0, eval_peak(2 * PROBE_IMAGES)?, PROBE_IMAGES);
        (e0 - per * PROBE_IMAGES as f64).at_least_zero() + per * (scale * run.eval_images as f64)
    } else {
        Peak::default()
    };

    // The probes' buffers have sizes the run will not ask for again.
    crate::pool::clear();
    crate::alloc_count::release_cache();
    let image_bytes = (c * spec.height * spec.width * 4) as f64;
    let loader = 3.0 * cfg.images_per_step() as f64 * image_bytes;
    // The host's tensor pool keeps a step's buffers idle while the evaluation runs (its batches
    // have other sizes) and the reverse: the peak holds both. Device buffers are freed as they
    // go: the larger of the two.
    let device = (cfg.device != Device::Cpu).then(|| run.model_bytes as f64 + step.device.max(eval.device));
    // The emulated device's memory is this process's host memory.
    #[cfg(feature = "cuda")]
    let emulated = if crate::cuda::emulation_requested() { device.unwrap_or(0.0) } else { 0.0 };
    #[cfg(not(feature = "cuda"))]
    let emulated = 0.0;
    let host = held + run.model_bytes as f64 + loader + step.host + eval.host + emulated;
    let device = device.map(|d| d as u64);
    Ok(Some(Estimate { host: host.min(u64::MAX as f64) as u64, device, eval_peak: eval.host > step.host }))
}

/// Bytes per image between two probes `n` images apart.
fn slope(a: Peak, b: Peak, n: usize) -> Peak {
    ((b - a) * (1.0 / n as f64)).at_least_zero()
}

/// What the run's step is made of, in the flags that set it: "--batch 64 and --unlabeled-batch
/// 256 (x2 views) of 1x28x28 images".
fn step_flags(cfg: &TrainConfig, spec: &ModelSpec) -> String {
    let plan = cfg.batch_plan();
    let mut parts = Vec::new();
    if plan.labeled > 0 {
        parts.push(format!("--batch {}", plan.labeled));
    }
    if plan.views > 0 {
        parts.push(format!("--unlabeled-batch {} (x{} views)", plan.unlabeled, plan.views));
    }
    format!("{} of {}x{}x{} images", parts.join(" and "), spec.in_channels, spec.height, spec.width)
}

/// Estimates the run's memory and refuses to start one that cannot fit: an out-of-memory error
/// naming the flags, the estimate and the limit. Returns the estimate (None when unmeasured).
pub fn check(run: &RunShape<'_>) -> Result<Option<Estimate>> {
    let Some(est) = estimate(run)? else { return Ok(None) };
    let s = &run.spec;
    let (subject, phase) = if est.eval_peak {
        let subject = format!(
            "evaluating in batches of {} images of {}x{}x{} ({})",
            run.eval_images, s.in_channels, s.height, s.width, run.cfg.model
        );
        (subject, "one evaluation batch")
    } else {
        (format!("{} ({}, {})", step_flags(run.cfg, s), run.cfg.model, run.cfg.method), "one training step")
    };
    if let Some(limit) = host_limit()? {
        if est.host > limit.bytes {
            return Err(Error::out_of_memory(format!(
                "{subject} needs ~{} of memory for {phase}; this machine allows {} ({})",
                human(est.host as f64),
                human(limit.bytes as f64),
                limit.source
            )));
        }
    }
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(i), Some(need)) = (run.cfg.device, est.device) {
        let free = crate::cuda::context::gpu(i)?.free_memory()?;
        if need as usize > free {
            return Err(Error::out_of_memory(format!(
                "{subject} needs ~{} of memory on {} for {phase}; {} is free there",
                human(need as f64),
                run.cfg.device.label(),
                human(free as f64)
            )));
        }
    }
    Ok(Some(est))
}
