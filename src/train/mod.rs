//! The training loop: batches -> objective on the tape -> backward -> optimizer + EMA, evaluation
//! every K steps, and the run's files (config.json, metrics.jsonl, checkpoints, summary.json).

pub mod checkpoint;
mod config;
pub mod estimate;
mod eval;
mod hungarian;
mod state;

pub use config::{MethodDefaults, OptimizerKind, ScheduleKind, TrainConfig};
pub use eval::{argmax_rows, evaluate, EvalResult};
pub use hungarian::{clustering_accuracy, max_weight_assignment};
pub use state::{checkpoint_of, init_from_checkpoint, model_from_checkpoint, CheckpointInfo};

use crate::autograd::Tape;
use crate::data::{self, Augment, Dataset, Loader, StepBatch, TrainTest};
use crate::error::{Error, ErrorKind, Result};
use crate::nn::{Model, ModelSpec, Module};
use crate::optim::{Adam, AdamConfig, DecayScope, Ema, EmaDecay, Optimizer, Schedule, Sgd, SgdConfig};
use crate::ssl::{step_loss_with, upload_indices, ObjectiveConfig, StepInput};
use crate::tensor::Tensor;
use serde::Serialize;
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What the loop reports after each step, for a progress display.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Steps done.
    pub step: u64,
    /// Steps in the run.
    pub steps: u64,
    /// Total loss of the last step.
    pub loss: f32,
    /// Supervised term.
    pub sup: f32,
    /// MI term (unweighted).
    pub mi: f32,
    /// Training images per second so far (evaluation excluded).
    pub images_per_second: f64,
    /// Seconds of training so far.
    pub train_seconds: f64,
    /// The evaluation done at this step, if any: (raw accuracy, EMA accuracy).
    pub eval: Option<(f64, f64)>,
}

/// The end of a run (summary.json).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Summary {
    /// Objective.
    pub method: String,
    /// Data set name.
    pub dataset: String,
    /// Architecture.
    pub model: String,
    /// Labeled images.
    pub labels: usize,
    /// Steps run.
    pub steps: u64,
    /// Seed.
    pub seed: u64,
    /// Device.
    pub device: String,
    /// Threads.
    pub threads: usize,
    /// Test accuracy of the raw weights.
    pub test_accuracy: f64,
    /// Test accuracy of the EMA weights (the headline).
    pub test_accuracy_ema: f64,
    /// Median EMA test accuracy over the last 20 evaluations (MixMatch's protocol; over all of
    /// them when there were fewer).
    #[serde(default)]
    pub test_accuracy_ema_median_last20: f64,
    /// Validation accuracy of the EMA weights, when there is a validation split.
    pub val_accuracy_ema: Option<f64>,
    /// Per-class test accuracy of the EMA weights.
    pub per_class_accuracy: Vec<f64>,
    /// Test confusion matrix of the EMA weights, [true][predicted].
    pub confusion_matrix: Vec<Vec<u64>>,
    /// Wall time of the whole run, evaluation included.
    pub wall_seconds: f64,
    /// Training images per second (labeled + every unlabeled view), evaluation excluded.
    pub train_images_per_second: f64,
    /// Host memory the run was estimated to need at its peak, before its first step (bytes).
    #[serde(default)]
    pub memory_estimate_bytes: Option<u64>,
    /// Device memory the run was estimated to take (GPU runs, bytes).
    #[serde(default)]
    pub device_memory_estimate_bytes: Option<u64>,
    /// The process's peak resident memory (VmHWM, bytes), where the system reports it.
    #[serde(default)]
    pub peak_resident_bytes: Option<u64>,
    /// The most device memory the run's buffers held at once after the estimate (GPU runs, bytes).
    #[serde(default)]
    pub device_peak_bytes: Option<u64>,
}

/// The device buffers' high-water mark on a GPU run.
fn device_peak_bytes(device: crate::device::Device) -> Option<u64> {
    match device {
        crate::device::Device::Cpu => None,
        #[cfg(feature = "cuda")]
        crate::device::Device::Cuda(_) => Some(crate::cuda::buffer::device_bytes_peak() as u64),
        #[cfg(not(feature = "cuda"))]
        crate::device::Device::Cuda(_) => None,
    }
}

/// Bytes of one copy of a model's tensors (parameters and buffers).
pub fn model_bytes(model: &Model) -> u64 {
    let mut n = 0u64;
    model.visit(&mut |_, _, t| n += t.numel() as u64 * 4);
    n
}

/// Loads the data a config names: the embedded subset, or the full set from `--data`.
pub fn load_data(cfg: &TrainConfig) -> Result<TrainTest> {
    match &cfg.data {
        None if cfg.dataset == data::DatasetKind::FashionMnist => data::embedded(),
        None => Err(Error::usage(format!(
            "--dataset {}: needs --data DIR (only Fashion-MNIST is embedded)",
            cfg.dataset.name()
        ))),
        Some(dir) => data::load(cfg.dataset, dir, cfg.resize, cfg.channels),
    }
}

fn make_optimizer(cfg: &TrainConfig) -> Result<Box<dyn Optimizer>> {
    let decay_scope = if cfg.decay_kernels_only { DecayScope::KernelsOnly } else { DecayScope::All };
    let (lr, weight_decay) = (cfg.lr(), cfg.weight_decay());
    Ok(match cfg.optimizer() {
        OptimizerKind::AdamW => Box::new(Adam::new(AdamConfig { decay_scope, ..AdamConfig::adamw(lr, weight_decay) })?),
        OptimizerKind::Adam => Box::new(Adam::new(AdamConfig { weight_decay, decay_scope, ..AdamConfig::adam(lr) })?),
        OptimizerKind::Sgd => {
            let mut s = SgdConfig::new(lr);
            s.momentum = cfg.momentum;
            s.nesterov = cfg.nesterov();
            s.weight_decay = weight_decay;
            s.decay_scope = decay_scope;
            Box::new(Sgd::new(s)?)
        }
    })
}

/// The run's output folder and its files.
struct RunFiles {
    dir: PathBuf,
    metrics: std::fs::File,
}

impl RunFiles {
    /// Creates the folder and writes config.json, then split.json (the training-set indices of the
    /// labeled and validation images, so that another implementation can train on the same split).
    fn create(dir: &Path, cfg: &TrainConfig, split: &data::Split) -> Result<RunFiles> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join("config.json");
        checkpoint::write_atomic(&path, cfg.to_json().map_err(|e| e.context(path.display()))?.as_bytes())?;
        let indices = serde_json::json!({ "labeled": split.labeled, "val": split.val });
        checkpoint::write_atomic(&dir.join("split.json"), format!("{indices}\n").as_bytes())?;
        let path = dir.join("metrics.jsonl");
        let metrics = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(RunFiles { dir: dir.to_path_buf(), metrics })
    }

    /// Reopens a run's folder at `step`: metrics.jsonl keeps only the lines up to that step
    /// (rewritten atomically), then grows again from there. Also returns the kept lines' EMA
    /// test accuracies.
    fn reopen(dir: &Path, step: u64) -> Result<(RunFiles, Vec<f64>)> {
        let path = dir.join("metrics.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        checkpoint::write_atomic(&path, kept.as_bytes())?;
        let history = kept
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("test_accuracy_ema")?.as_f64())
            .collect();
        let metrics = std::fs::OpenOptions::new().append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        Ok((RunFiles { dir: dir.to_path_buf(), metrics }, history))
    }

    /// Appends one line to metrics.jsonl; a line cut short by a full disk is dropped on resume
    /// (it does not parse).
    fn metric(&mut self, line: &serde_json::Value) -> Result<()> {
        let path = self.dir.join("metrics.jsonl");
        crate::fault::write_all(&mut self.metrics, format!("{line}\n").as_bytes())
            .and_then(|_| self.metrics.flush())
            .map_err(|e| Error::io(&path, e))
    }
}

/// Set by [`request_stop`]; the loop reads (and clears) it after every step.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Asks the run in progress to stop after its current step with an `Interrupted` error (the
/// Python package calls it on Ctrl-C); its folder keeps the last checkpoint and resumes from it.
pub fn request_stop() {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Trains as `cfg` says, calling `progress` after every step; returns the summary.
pub fn train(cfg: &TrainConfig, progress: &mut dyn FnMut(&Progress)) -> Result<Summary> {
    run(cfg, None, progress)
}

/// Continues the run in `dir` from its last checkpoint (resume.safetensors), or from its start
/// when it was stopped before the first one, with the options in its config.json.
pub fn resume(dir: &Path, progress: &mut dyn FnMut(&Progress)) -> Result<Summary> {
    let path = dir.join("config.json");
    let mut cfg = TrainConfig::load(&path)?;
    let started_with = TrainConfig::world_size_in(&path)?;
    let now = crate::dist::world().size();
    if started_with != now {
        return Err(Error::usage(format!(
            "{}: the run was started by {started_with} process(es) and resumes only with as many (mpirun -np \
             {started_with}), not {now}: each process's share of every batch depends on their number",
            dir.display()
        )));
    }
    cfg.out = Some(dir.to_path_buf());
    let state = dir.join("resume.safetensors");
    let state = if state.exists() { Some(checkpoint::Checkpoint::load(&state)?) } else { None };
    run(&cfg, Some(state), progress)
}

/// Named tensors.
type Named = Vec<(String, Tensor)>;

/// Splits a resume checkpoint into (step, model, EMA, optimizer) tensors.
fn resume_parts(ck: &checkpoint::Checkpoint, path: &Path) -> Result<(u64, Named, Named, Named)> {
    let step: u64 = ck
        .meta("step", path)?
        .parse()
        .map_err(|_| Error::format(format!("{}: metadata 'step' is not a step count", path.display())))?;
    let (mut model, mut ema, mut optim) = (Vec::new(), Vec::new(), Vec::new());
    for e in &ck.entries {
        let t = e.to_tensor()?;
        if let Some(n) = e.name.strip_prefix("model.") {
            model.push((n.to_string(), t));
        } else if let Some(n) = e.name.strip_prefix("ema.") {
            ema.push((n.to_string(), t));
        } else if let Some(n) = e.name.strip_prefix("optim.") {
            optim.push((n.to_string(), t));
        } else {
            return Err(Error::format(format!("{}: unexpected tensor '{}'", path.display(), e.name)));
        }
    }
    Ok((step, model, ema, optim))
}

/// The loop; `resume`: None for a new run, Some(None) to restart a run that has no checkpoint
/// yet, Some(Some(state)) to continue from a checkpoint.
fn run(
    cfg: &TrainConfig,
    resume: Option<Option<checkpoint::Checkpoint>>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary> {
    let started = Instant::now();
    // A request made before this run started is not for it.
    STOP.store(false, std::sync::atomic::Ordering::SeqCst);
    let mut cfg = cfg.resolved();
    cfg.validate()?;
    let world = crate::dist::world();
    // The options as given, the same on every process; then each process's own GPU.
    check_same_options(&cfg)?;
    cfg.device = cfg.device.for_local_rank(world.local_rank());
    let cfg = &cfg;
    cfg.device.check_available()?;
    cfg.check_precision_available()?;
    crate::cpu::set_threads(cfg.threads())?;
    let TrainTest { train, test } = load_data(cfg)?;
    let split = data::split(&train, cfg.labels, cfg.val, cfg.label_imbalance, cfg.split_seed())?;
    let aug = Augment::for_dataset(cfg.dataset, &train);
    let spec = ModelSpec {
        kind: cfg.model_kind(),
        in_channels: train.channels,
        height: train.height,
        width: train.width,
        classes: train.classes * cfg.overcluster,
    };
    let mut model = Model::new(spec, cfg.seed)?;
    if let Some(init) = &cfg.init {
        state::init_from_checkpoint(&mut model, init)?;
    }
    model.to_device(cfg.device)?;
    let mut trainer = Trainer::new(cfg, model)?;
    let mut start = 0;
    if let Some(Some(ck)) = &resume {
        let path = cfg.out.as_deref().unwrap_or(Path::new(".")).join("resume.safetensors");
        let (step, model, ema, optim) = resume_parts(ck, &path)?;
        let ctx = |e: Error| Error::format(format!("{}: {e}", path.display()));
        crate::nn::load_named(&mut trainer.model, &model).map_err(ctx)?;
        trainer.ema.load_tensors(&ema).map_err(ctx)?;
        trainer.optimizer.load_state_tensors(&trainer.model, &optim).map_err(ctx)?;
        if step > cfg.steps {
            return Err(Error::format(format!(
                "{}: checkpoint at step {step} is past the run's {} steps",
                path.display(),
                cfg.steps
            )));
        }
        // At step == steps the run was killed between its final checkpoint and summary.json:
        // the loop below runs no step, and the final evaluation is redone for the summary.
        start = step;
    }
    // Before the first batch is drawn: a run that cannot fit stops here with one line.
    let eval_images = cfg.eval_batch.min(test.len().max(split.val.len()));
    let estimate = estimate::check(&estimate::RunShape {
        cfg,
        spec,
        aug: &aug,
        model_bytes: model_bytes(&trainer.model),
        eval_images,
    })?;
    // From here the device's high-water mark is the run's own (summary.json reports it).
    #[cfg(feature = "cuda")]
    crate::cuda::buffer::reset_device_peak();
    let train = Arc::new(train);
    // Each process of a data-parallel run takes its rows of every batch.
    let plan = data::BatchPlan { shard: data::Shard { rank: world.rank(), ranks: world.size() }, ..cfg.batch_plan() };
    let mut loader = Loader::new(train.clone(), &split, aug.clone(), cfg.seed, plan, start)?;
    let mut ema_history = Vec::new();
    // Rank 0 alone writes the run's folder.
    let out = cfg.out.as_deref().filter(|_| world.is_root());
    let mut files = match (out, &resume) {
        (Some(d), Some(_)) => {
            let (f, h) = RunFiles::reopen(d, start)?;
            ema_history = h;
            Some(f)
        }
        (Some(d), None) => Some(RunFiles::create(d, cfg, &split)?),
        (None, _) => None,
    };
    let eval_aug = Augment::normalize_only(aug.mean.clone(), aug.std.clone());
    let images_per_step = cfg.images_per_step();

    let mut train_seconds = 0.0f64;
    let mut ema_model = trainer.model.clone();
    let mut last_eval = None;
    for step in start..cfg.steps {
        let t0 = Instant::now();
        let batch = loader.next()?;
        let StepStats { loss, sup, mi, w_mi, host, lr } = trainer.step(&batch, step)?;
        train_seconds += t0.elapsed().as_secs_f64();

        let done = step + 1;
        let mut report = Progress {
            step: done,
            steps: cfg.steps,
            loss,
            sup,
            mi,
            images_per_second: ((done - start) as usize * images_per_step) as f64 / train_seconds.max(1e-9),
            train_seconds,
            eval: None,
        };
        if done % cfg.eval_every == 0 || done == cfg.steps {
            let (raw, avg, val) =
                evaluate_run(cfg, &mut trainer, &mut ema_model, &test, &train, &split.val, &eval_aug)?;
            report.eval = Some((raw.accuracy, avg.accuracy));
            ema_history.push(avg.accuracy);
            let pseudo = trainer.take_pseudo_label_stats()?;
            check_replicas(&trainer.model, done)?;
            if let Some(f) = files.as_mut() {
                let mut line = json!({
                    "step": done, "loss": loss, "loss_supervised": sup, "loss_mi": mi,
                    "w_mi": w_mi, "loss_host": host, "lr": lr, "test_accuracy": raw.accuracy,
                    "test_accuracy_ema": avg.accuracy, "val_accuracy_ema": val,
                    "images_per_second": report.images_per_second,
                });
                if let Some(p) = pseudo {
                    line["mask_rate"] = p.mask_rate.into();
                    line["pseudo_label_accuracy"] = p.accuracy.into();
                }
                f.metric(&line)?;
                save_checkpoints(&f.dir, &trainer, &ema_model, done, cfg, &train, &aug)?;
            }
            last_eval = Some((raw, avg, val));
        }
        if world.is_root() {
            progress(&report);
        }
        if crate::fault::kill_after(done) && world.size() > 1 && world.rank() == world.size() - 1 {
            crate::fault::kill_self();
        }
        if STOP.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let last = done - done % cfg.eval_every;
            return Err(Error::new(
                ErrorKind::Interrupted,
                format!("stopped at step {done} on request; the run folder resumes from step {last}"),
            ));
        }
    }
    let (raw, avg, val) = match last_eval {
        Some(e) => e,
        None => evaluate_run(cfg, &mut trainer, &mut ema_model, &test, &train, &split.val, &eval_aug)?,
    };
    let summary = Summary {
        method: cfg.method.to_string(),
        dataset: train.name.clone(),
        model: cfg.model.to_string(),
        labels: split.labeled.len(),
        steps: cfg.steps,
        seed: cfg.seed,
        device: cfg.device.label(),
        threads: cfg.threads(),
        test_accuracy: raw.accuracy,
        test_accuracy_ema: avg.accuracy,
        test_accuracy_ema_median_last20: median_of_last(&ema_history, 20).unwrap_or(avg.accuracy),
        val_accuracy_ema: val,
        per_class_accuracy: avg.per_class_accuracy,
        confusion_matrix: avg.confusion_matrix,
        wall_seconds: started.elapsed().as_secs_f64(),
        train_images_per_second: ((cfg.steps - start) as usize * images_per_step) as f64 / train_seconds.max(1e-9),
        memory_estimate_bytes: estimate.as_ref().map(|e| e.host),
        device_memory_estimate_bytes: estimate.as_ref().and_then(|e| e.device),
        peak_resident_bytes: crate::memory::peak_resident_bytes(),
        device_peak_bytes: device_peak_bytes(cfg.device),
    };
    if let Some(f) = &files {
        let text = serde_json::to_string_pretty(&summary).map_err(|e| Error::format(e.to_string()))?;
        checkpoint::write_atomic(&f.dir.join("summary.json"), format!("{text}\n").as_bytes())?;
    }
    Ok(summary)
}

/// Test accuracy of the raw and EMA weights (clustering accuracy when pre-training), and the
/// EMA's validation accuracy when there is a validation split.
fn evaluate_run(
    cfg: &TrainConfig,
    trainer: &mut Trainer,
    ema_model: &mut Model,
    test: &Dataset,
    train: &Dataset,
    val_idx: &[usize],
    aug: &Augment,
) -> Result<(EvalResult, EvalResult, Option<f64>)> {
    trainer.ema.apply_to(ema_model)?;
    let mut raw = evaluate(&mut trainer.model, test, None, aug, cfg.eval_batch)?;
    let mut avg = evaluate(ema_model, test, None, aug, cfg.eval_batch)?;
    if cfg.method == crate::ssl::Method::Pretrain {
        // Clusters have no class names: score the best one-to-one matching.
        raw.accuracy = clustering_accuracy(&raw.confusion_matrix);
        avg.accuracy = clustering_accuracy(&avg.confusion_matrix);
    }
    let val = if val_idx.is_empty() {
        None
    } else {
        Some(evaluate(ema_model, train, Some(val_idx), aug, cfg.eval_batch)?.accuracy)
    };
    Ok((raw, avg, val))
}

/// Median of the last `k` values (the mean of the two middle ones for an even count).
pub fn median_of_last(values: &[f64], k: usize) -> Option<f64> {
    let mut v = values[values.len().saturating_sub(k)..].to_vec();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 })
}

#[cfg(test)]
mod tests {
    use super::median_of_last;

    #[test]
    fn median_of_the_last_k_evaluations() {
        assert_eq!(median_of_last(&[], 20), None);
        assert_eq!(median_of_last(&[0.3], 20), Some(0.3));
        assert_eq!(median_of_last(&[0.9, 0.1, 0.5], 20), Some(0.5));
        assert_eq!(median_of_last(&[0.9, 0.1, 0.5, 0.7], 20), Some(0.6));
        // Only the last k count: 0.0 and 1.0 fall outside.
        assert_eq!(median_of_last(&[0.0, 1.0, 0.2, 0.4, 0.3], 3), Some(0.3));
    }
}

/// The scalars of one training step.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// Total loss.
    pub loss: f32,
    /// Supervised term.
    pub sup: f32,
    /// MI term (unweighted).
    pub mi: f32,
    /// MI weight this step.
    pub w_mi: f32,
    /// Host method's unsupervised term (MixMatch's L_U).
    pub host: f32,
    /// Learning rate this step.
    pub lr: f32,
}

/// The model with everything that updates it: objective, optimizer, schedule, EMA.
pub struct Trainer {
    /// The trained (raw) model.
    pub model: Model,
    /// Its optimizer.
    pub optimizer: Box<dyn Optimizer>,
    /// The EMA of its weights.
    pub ema: Ema,
    schedule: Schedule,
    objective: ObjectiveConfig,
    base_lr: f32,
    seed: u64,
    /// FixMatch's pseudo-label fractions (kept, kept and right) summed on the model's device
    /// since the last [`Trainer::take_pseudo_label_stats`], and the steps summed.
    pseudo_sums: Option<[Tensor; 2]>,
    pseudo_steps: u64,
}

/// FixMatch's pseudo-labels since the last evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PseudoLabelSummary {
    /// Mean fraction of the unlabeled images whose weak prediction reached tau.
    pub mask_rate: f64,
    /// Fraction of those kept pseudo-labels that equal the images' true labels (None when none
    /// was kept).
    pub accuracy: Option<f64>,
}

impl Trainer {
    /// A trainer for `model` configured by `cfg`.
    pub fn new(cfg: &TrainConfig, model: Model) -> Result<Trainer> {
        Ok(Trainer {
            optimizer: make_optimizer(cfg)?,
            ema: Ema::new(&model, EmaDecay::Warmup { max: cfg.ema }, false)?,
            schedule: match cfg.schedule() {
                ScheduleKind::Cosine => Schedule::cosine(cfg.steps, 0)?,
                ScheduleKind::Constant => Schedule::constant(),
                ScheduleKind::FixMatchCosine => Schedule::fixmatch_cosine(cfg.steps)?,
            },
            objective: ObjectiveConfig {
                method: cfg.method,
                w_mi: cfg.w_mi,
                lambda: cfg.lambda,
                ramp_steps: cfg.ramp_steps(),
                mi_labeled: cfg.mi_labeled,
                w_u: cfg.w_u(),
                tau: cfg.tau,
                world: crate::dist::world(),
                sync_bn: cfg.sync_bn,
                precision: cfg.precision,
                temperature: cfg.temperature,
                mixup_alpha: cfg.mixup_alpha,
            },
            base_lr: cfg.lr(),
            seed: cfg.seed,
            pseudo_sums: None,
            pseudo_steps: 0,
            model,
        })
    }

    /// FixMatch's pseudo-label mask rate and accuracy averaged over the steps since the last
    /// call (one download of the two sums kept on the device), then restarts the sums; None when
    /// no step since produced pseudo-labels.
    pub fn take_pseudo_label_stats(&mut self) -> Result<Option<PseudoLabelSummary>> {
        let (Some([kept, right]), steps) = (self.pseudo_sums.take(), std::mem::take(&mut self.pseudo_steps)) else {
            return Ok(None);
        };
        let v = Tensor::scalars_to_host(&[&kept, &right])?;
        // A data-parallel run's fractions are means over the processes' equal shards.
        let world = crate::dist::world();
        let mut sums = [v[0] as f64, v[1] as f64];
        world.sum_f64(&mut sums)?;
        let (kept, right) = (sums[0] / world.size() as f64, sums[1] / world.size() as f64);
        Ok(Some(PseudoLabelSummary {
            mask_rate: kept / steps.max(1) as f64,
            accuracy: (kept > 0.0).then(|| right / kept),
        }))
    }

    /// One step: loss on the tape, backward, optimizer update, EMA update. A non-finite loss
    /// stops with an error naming the step and the term.
    pub fn step(&mut self, batch: &StepBatch, step: u64) -> Result<StepStats> {
        let tape = Tape::new();
        // On a GPU the batch goes over in one copy (images, labels and the objective's index
        // vectors together).
        let (on_device, indices);
        let (batch, indices) = match self.model.device() {
            crate::device::Device::Cpu => (batch, &[][..]),
            device => {
                let extra = upload_indices(&self.objective, batch, step, self.seed);
                (on_device, indices) = batch.to_device(device, &extra)?;
                (&on_device, &indices[..])
            }
        };
        let terms = {
            let _p = crate::profile::scope("forward");
            let input = StepInput { tape: &tape, batch, step, seed: self.seed, indices };
            step_loss_with(&self.objective, &mut self.model, input)?
        };
        // One copy of every term to the host (on a GPU, the step's only download).
        let mut v = terms.values()?;
        let world = crate::dist::world();
        if world.size() > 1 {
            // The whole batch's terms: the processes' means averaged (the MI term is the same on
            // every process), so every process logs and checks the same values.
            let mut all = [v.total, v.sup, v.mi, v.host];
            world.sum_f32(&mut all)?;
            let k = world.size() as f32;
            v = crate::ssl::TermValues { total: all[0] / k, sup: all[1] / k, mi: all[2] / k, host: all[3] / k };
        }
        if let Some(p) = &terms.pseudo {
            // Summed where they were computed: no download until the next evaluation reads them.
            match &mut self.pseudo_sums {
                Some([kept, right]) => {
                    kept.add_assign(&p.kept)?;
                    right.add_assign(&p.right)?;
                }
                None => self.pseudo_sums = Some([p.kept.clone(), p.right.clone()]),
            }
            self.pseudo_steps += 1;
        }
        let loss = v.total;
        // The terms first, so the message names the one that went bad.
        for (name, v) in [("supervised", v.sup), ("mi", v.mi), ("host", v.host), ("total", loss)] {
            if !v.is_finite() {
                return Err(Error::new(ErrorKind::NonFinite, format!("step {step}: the {name} loss is {v}; stopping")));
            }
        }
        let mut grads = {
            let _p = crate::profile::scope("backward");
            tape.backward(&terms.total)?
        };
        if world.size() > 1 && !crate::fault::allreduce_skipped_at(step + 1) {
            let _p = crate::profile::scope("all-reduce");
            average_gradients(&self.model, &mut grads, world)?;
        }
        // Every gradient checked on the host is a download per parameter per step: on a GPU the
        // loss check above stands alone (a non-finite update shows in the next step's loss).
        let mut bad = None;
        let on_host = self.model.device() == crate::device::Device::Cpu;
        self.model.visit(&mut |name, role, t| {
            if on_host && bad.is_none() && role.is_trainable() {
                if let Some(g) = grads.get(t) {
                    if !g.all_finite().unwrap_or(false) {
                        bad = Some(name.to_string());
                    }
                }
            }
        });
        if let Some(name) = bad {
            return Err(Error::new(
                ErrorKind::NonFinite,
                format!("step {step}: the gradient of '{name}' is not finite; stopping"),
            ));
        }
        let lr = self.schedule.lr(self.base_lr, step);
        {
            let _p = crate::profile::scope("optimizer");
            self.optimizer.step(&mut self.model, &grads, lr)?;
        }
        drop(grads);
        let _p = crate::profile::scope("ema");
        self.ema.update(&self.model, step)?;
        Ok(StepStats { loss, sup: v.sup, mi: v.mi, w_mi: terms.w_mi, host: v.host, lr })
    }
}

/// Replaces every trainable parameter's gradient by its mean over the processes: the gradients
/// go over as one buffer (in the model's parameter order), summed in rank order, so every
/// process gets the same bits and the replicas stay identical.
fn average_gradients(
    model: &Model,
    grads: &mut crate::autograd::Gradients,
    world: &'static crate::dist::World,
) -> Result<()> {
    let mut params = Vec::new();
    model.visit(&mut |_, role, t| {
        if role.is_trainable() {
            params.push(t.clone());
        }
    });
    #[cfg(feature = "cuda")]
    if let crate::device::Device::Cuda(ordinal) = model.device() {
        return average_gradients_on_gpu(&*crate::cuda::context::gpu(ordinal)?, &params, grads, world);
    }
    let mut flat = Vec::new();
    for p in &params {
        match grads.get(p) {
            Some(g) => flat.extend_from_slice(&g.to_vec()?),
            None => flat.resize(flat.len() + p.numel(), 0.0),
        }
    }
    world.sum_f32(&mut flat)?;
    let k = world.size() as f32;
    let mut at = 0;
    for p in &params {
        let n = p.numel();
        let mean: Vec<f32> = flat[at..at + n].iter().map(|g| g / k).collect();
        at += n;
        grads.take(p);
        grads.add_to(p, Tensor::from_vec(mean, p.shape())?)?;
    }
    Ok(())
}

/// [`average_gradients`] on a GPU: the gradients copied into one device buffer, summed in rank
/// order and divided on the device (the host path's bits, without leaving the GPU), copied back.
#[cfg(feature = "cuda")]
fn average_gradients_on_gpu(
    gpu: &crate::cuda::Gpu,
    params: &[Tensor],
    grads: &mut crate::autograd::Gradients,
    world: &'static crate::dist::World,
) -> Result<()> {
    let total: usize = params.iter().map(|p| p.numel()).sum();
    let mut flat = gpu.zeros::<f32>(total.max(1))?;
    let mut at = 0;
    for p in params {
        let n = p.numel();
        if let Some(g) = grads.get(p) {
            gpu.copy_range(g.cuda_slice()?, 0..n, &mut flat, at)?;
        }
        at += n;
    }
    crate::cuda::collective::sum_f32(gpu, world, &mut flat, world.size() as f32)?;
    let mut at = 0;
    for p in params {
        let n = p.numel();
        let mut mean = gpu.zeros::<f32>(n.max(1))?;
        gpu.copy_range(&flat, at..at + n, &mut mean, 0)?;
        at += n;
        grads.take(p);
        grads.add_to(p, Tensor::from_cuda(mean, p.shape().to_vec())?)?;
    }
    Ok(())
}

/// A hash of the trainable parameters' bits (FNV-1a), to check that the replicas of a
/// data-parallel run stay identical.
fn weights_hash(model: &Model) -> Result<u64> {
    let mut h = 0xcbf29ce484222325u64;
    let mut bad = None;
    model.visit(&mut |_, role, t| {
        if role.is_trainable() && bad.is_none() {
            match t.to_vec() {
                Ok(v) => {
                    for x in v {
                        for b in x.to_bits().to_le_bytes() {
                            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
                        }
                    }
                }
                Err(e) => bad = Some(e),
            }
        }
    });
    bad.map_or(Ok(h), Err)
}

/// Stops the run when the replicas' weights differ (the all-reduce keeps them equal bit for bit).
fn check_replicas(model: &Model, step: u64) -> Result<()> {
    let world = crate::dist::world();
    if world.size() == 1 {
        return Ok(());
    }
    let mine = weights_hash(model)?;
    for (r, other) in world.gather_bytes(&mine.to_le_bytes())?.iter().enumerate() {
        if other.as_slice() != mine.to_le_bytes() {
            return Err(Error::new(
                ErrorKind::Device,
                format!(
                    "step {step}: the weights of rank {r} differ from rank {}'s: the replicas diverged",
                    world.rank()
                ),
            ));
        }
    }
    Ok(())
}

/// Every process of a data-parallel run must take the same options (the thread count and the
/// output folder aside): a mismatch is named before the first step.
fn check_same_options(cfg: &TrainConfig) -> Result<()> {
    let world = crate::dist::world();
    if world.size() == 1 {
        return Ok(());
    }
    let plain = |c: &TrainConfig| serde_json::to_value(TrainConfig { threads: None, out: None, ..c.clone() });
    let text = plain(cfg).map_err(|e| Error::format(e.to_string()))?.to_string();
    // Every side compared after the same text round trip (an f32 option prints differently as
    // a parsed f64).
    let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).map_err(|e| Error::format(e.to_string()));
    let mine = parse(text.as_bytes())?;
    for (r, other) in world.gather_bytes(text.as_bytes())?.iter().enumerate() {
        let other = parse(other)?;
        if let Some((key, v)) = mine.as_object().and_then(|m| m.iter().find(|(k, v)| other.get(k.as_str()) != Some(v)))
        {
            return Err(Error::usage(format!(
                "--{}: rank {r} has {} and rank {} has {v}: every process of a data-parallel run takes the same options",
                key.replace('_', "-"),
                other.get(key.as_str()).unwrap_or(&serde_json::Value::Null),
                world.rank()
            )));
        }
    }
    Ok(())
}

/// Writes resume.safetensors (first) and checkpoint.safetensors, each atomically.
#[allow(clippy::too_many_arguments)]
fn save_checkpoints(
    dir: &Path,
    trainer: &Trainer,
    ema_model: &Model,
    step: u64,
    cfg: &TrainConfig,
    train: &Dataset,
    aug: &Augment,
) -> Result<()> {
    let info = CheckpointInfo::new(train, aug, step, cfg);
    let mut resume = checkpoint_of(&trainer.model, &info)?;
    for e in resume.entries.iter_mut() {
        e.name = format!("model.{}", e.name);
    }
    // The EMA's own state (not the evaluated copy), so a resumed average continues exactly.
    for (name, t) in trainer.ema.tensors() {
        resume.entries.push(checkpoint::Entry::f32(format!("ema.{name}"), &t)?);
    }
    for (name, t) in trainer.optimizer.state_tensors() {
        resume.entries.push(checkpoint::Entry::f32(format!("optim.{name}"), &t)?);
    }
    resume.save(&dir.join("resume.safetensors"))?;
    checkpoint_of(ema_model, &info)?.save(&dir.join("checkpoint.safetensors"))
}
