//! Every option of a training run as one value: parsed from the command line (clap's `Args`),
//! written to config.json and read back by `--resume` (serde), varied cell by cell by a sweep.
//!
//! Options whose default depends on the method (optimizer, learning rate, weight decay, schedule,
//! batch sizes) are `None` until given; [`MethodDefaults::of`] is the one place their defaults
//! live, the accessors of the same name return the value in force, and [`TrainConfig::resolved`]
//! writes those values in (config.json stores the resolved config).

use crate::data::{BatchPlan, DatasetKind};
use crate::device::Device;
use crate::error::{choice, or_list, Error, Result};
use crate::kernel_args::Precision;
use crate::nn::ModelKind;
use crate::ssl::Method;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

choice! {
    /// Which optimizer.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(into = "String", try_from = "String")]
    pub enum OptimizerKind {
        /// Adam with L2 decay in the gradient.
        Adam = "adam",
        /// Adam with decoupled weight decay (the default recipe).
        AdamW = "adamw",
        /// SGD with momentum (Nesterov optional).
        Sgd = "sgd",
    }
    unknown(s) = Error::usage(format!(
        "--optimizer: unknown optimizer '{s}' (expected {})",
        or_list(&OptimizerKind::NAMES)
    ));
}

choice! {
    /// How the learning rate moves over a run.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(into = "String", try_from = "String")]
    pub enum ScheduleKind {
        /// Half a cosine from the base rate down to 0 at the last step.
        Cosine = "cosine",
        /// The base rate throughout.
        Constant = "constant",
        /// FixMatch's cosine, lr_k = base * cos(7 pi k / (16 K)): ends at ~0.2 of the base rate.
        FixMatchCosine = "fixmatch-cosine",
    }
    unknown(s) = Error::usage(format!(
        "--schedule: unknown schedule '{s}' (expected {})",
        or_list(&ScheduleKind::NAMES)
    ));
}

/// The defaults of the options that depend on the method.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MethodDefaults {
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Base learning rate.
    pub lr: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// Learning-rate schedule.
    pub schedule: ScheduleKind,
    /// Labeled images per step.
    pub batch: usize,
    /// Unlabeled images per step.
    pub unlabeled_batch: usize,
    /// The host method's unlabeled-loss weight.
    pub w_u: f32,
    /// Nesterov momentum (SGD).
    pub nesterov: bool,
}

impl MethodDefaults {
    /// The defaults for `method`: METHOD.md's recipe, except 600 steps at lr 1e-3 (chosen on a
    /// validation split, README "Default recipe") for the MUSCLE and MixMatch methods; the
    /// FixMatch methods take FixMatch's own recipe (SGD + Nesterov at 0.03, its cosine, mu = 7,
    /// lambda_u = 1).
    pub fn of(method: Method) -> MethodDefaults {
        match method {
            Method::Supervised | Method::Muscle | Method::MixMatch | Method::MixMatchMuscle | Method::Pretrain => {
                MethodDefaults {
                    optimizer: OptimizerKind::AdamW,
                    lr: 1e-3,
                    weight_decay: 5e-4,
                    schedule: ScheduleKind::Cosine,
                    batch: 64,
                    unlabeled_batch: 256,
                    w_u: 75.0,
                    nesterov: false,
                }
            }
            Method::FixMatch | Method::FixMatchMuscle => MethodDefaults {
                optimizer: OptimizerKind::Sgd,
                lr: 0.03,
                weight_decay: 5e-4,
                schedule: ScheduleKind::FixMatchCosine,
                batch: 64,
                unlabeled_batch: 448,
                w_u: 1.0,
                nesterov: true,
            },
        }
    }
}

/// The convnet's base width unless told otherwise.
const DEFAULT_WIDTH: usize = 32;

/// Options of `muscle train` (and of each run of `pretrain` and `sweep`), as the command line,
/// config.json and the library spell them.
#[derive(Clone, Debug, PartialEq, clap::Args, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Data set format: fashion-mnist, mnist, cifar10, cifar100, folder.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.dataset)]
    pub dataset: DatasetKind,
    /// Folder with the full data set; without it, the embedded Fashion-MNIST subset
    /// (10,000 train / 2,000 test images) is used.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Image folders: resize every image to S x S.
    #[arg(long)]
    pub resize: Option<usize>,
    /// Image folders: convert to 1 (grey) or 3 (colour) channels.
    #[arg(long)]
    pub channels: Option<usize>,
    /// Objective: supervised, muscle, mixmatch, mixmatch-muscle, fixmatch, fixmatch-muscle.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.method)]
    pub method: Method,
    /// Architecture: convnet, wrn-28-2, cnn13.
    // By name: a convnet's width is `width` (see `model_kind`), not this value's.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.model)]
    pub model: ModelKind,
    /// convnet base width.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.width)]
    #[serde(default = "default_width", deserialize_with = "width_or_default")]
    pub width: usize,
    /// Number of labeled images (class-balanced, drawn by --split-seed, else --seed).
    #[arg(long, default_value_t = TrainConfig::DEFAULT.labels)]
    pub labels: usize,
    /// Class-balanced validation images held out of the labeled and unlabeled sets.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.val)]
    pub val: usize,
    /// Largest / smallest per-class label count (1 = balanced).
    #[arg(long, default_value_t = TrainConfig::DEFAULT.label_imbalance)]
    pub label_imbalance: f64,
    /// Seed of the split, initialisation, batches, augmentation and dropout.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.seed)]
    pub seed: u64,
    /// Seed of the labeled / validation split alone [default: --seed]; with it, --seed varies
    /// only the initialisation, batches and augmentation on one fixed labeled set.
    #[arg(long)]
    pub split_seed: Option<u64>,
    /// Optimizer steps.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.steps)]
    pub steps: u64,
    /// Labeled images per step [default: 64 for every method].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Unlabeled images per step (each forwarded in two augmented views) [default: 256; 448 for
    /// fixmatch and fixmatch-muscle (FixMatch's mu = 7)].
    #[arg(long)]
    pub unlabeled_batch: Option<usize>,
    /// Base learning rate [default: 1e-3; 0.03 for fixmatch and fixmatch-muscle].
    #[arg(long)]
    pub lr: Option<f32>,
    /// Learning-rate schedule: cosine (decayed to 0 at the last step), constant, or
    /// fixmatch-cosine (cos(7 pi k / 16 K)) [default: cosine; fixmatch-cosine for fixmatch and
    /// fixmatch-muscle].
    #[arg(long)]
    pub schedule: Option<ScheduleKind>,
    /// Optimizer: adamw, adam, sgd [default: adamw; sgd for fixmatch and fixmatch-muscle].
    #[arg(long)]
    pub optimizer: Option<OptimizerKind>,
    /// Weight decay (AdamW: decoupled, times the lr) [default: 5e-4 for every method].
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// SGD momentum.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.momentum)]
    pub momentum: f32,
    /// SGD: Nesterov momentum (`--nesterov` or `--nesterov false`) [default: false; true for
    /// fixmatch and fixmatch-muscle].
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    #[serde(default)]
    pub nesterov: Option<bool>,
    /// Decay only conv and dense kernels, not biases and BN parameters (MixMatch's choice).
    #[arg(long)]
    #[serde(default)]
    pub decay_kernels_only: bool,
    /// Maximum weight of the MI term.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.w_mi)]
    pub w_mi: f32,
    /// IIC lambda (1: mutual information; > 1 favours balanced predictions).
    #[arg(long, default_value_t = TrainConfig::DEFAULT.lambda)]
    pub lambda: f32,
    /// Also feed two augmented views of the labeled images into the MI term.
    #[arg(long)]
    pub mi_labeled: bool,
    /// Weight of the host method's unlabeled loss L_U: MixMatch's maximum (ramped; 75 for
    /// CIFAR-10, 150 for CIFAR-100), FixMatch's lambda_u (not ramped) [default: 75; 1 for
    /// fixmatch and fixmatch-muscle].
    #[arg(long)]
    pub w_u: Option<f32>,
    /// Data-parallel runs (mpirun): batch-norm statistics over the whole batch of every process
    /// instead of each process's rows (PyTorch's SyncBatchNorm).
    #[arg(long)]
    #[serde(default)]
    pub sync_bn: bool,
    /// What the training step's convolution products multiply: f32, or bf16 (operands rounded to
    /// bf16, f32 sums, f32 master weights: the 3x3 stride-1 layers on CPUs with AVX512-BF16;
    /// evaluation stays f32).
    #[arg(long, default_value_t = TrainConfig::DEFAULT.precision)]
    #[serde(default)]
    pub precision: Precision,
    /// FixMatch: confidence threshold of the pseudo-labels, in (0, 1].
    #[arg(long, default_value_t = TrainConfig::DEFAULT.tau)]
    #[serde(default = "default_tau")]
    pub tau: f32,
    /// MixMatch: sharpening temperature of the guessed labels.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.temperature)]
    pub temperature: f32,
    /// MixMatch: MixUp coefficient mu ~ Beta(alpha, alpha).
    #[arg(long, default_value_t = TrainConfig::DEFAULT.mixup_alpha)]
    pub mixup_alpha: f32,
    /// Fraction of the steps over which the MI (and MixMatch's L_U) weight ramps up linearly.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.ramp)]
    pub ramp: f64,
    /// EMA decay of the evaluated weights (ramped as min(ema, (1+t)/(10+t))).
    #[arg(long, default_value_t = TrainConfig::DEFAULT.ema)]
    pub ema: f32,
    /// Evaluate (raw and EMA weights) every this many steps, and at the end.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.eval_every)]
    pub eval_every: u64,
    /// Images per evaluation batch.
    #[arg(skip = TrainConfig::DEFAULT.eval_batch)]
    pub eval_batch: usize,
    /// Worker threads for GEMM, convolution, BN and augmentation [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Device: cpu, or cuda[:N] in a build with the cuda feature.
    #[arg(long, default_value_t = TrainConfig::DEFAULT.device)]
    pub device: Device,
    /// Output folder: config.json, metrics.jsonl, checkpoints, summary.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Fine-tune: start from this checkpoint's weights (e.g. from `muscle pretrain`); a
    /// classifier head of another size is re-initialised.
    #[arg(long, value_name = "CKPT")]
    pub init: Option<PathBuf>,
    /// Outputs per class of the model (pre-training's over-clustering; 1 otherwise).
    #[arg(skip = TrainConfig::DEFAULT.overcluster)]
    #[serde(default = "one")]
    pub overcluster: usize,
}

fn default_width() -> usize {
    DEFAULT_WIDTH
}

fn one() -> usize {
    1
}

/// config.json's `tau`, which runs from before FixMatch did not write.
fn default_tau() -> f32 {
    TrainConfig::DEFAULT.tau
}

/// config.json's `width`, which runs of other models wrote as null.
fn width_or_default<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    Ok(Option::<usize>::deserialize(d)?.unwrap_or(DEFAULT_WIDTH))
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig::DEFAULT
    }
}

fn positive(name: &str, ok: bool) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!("{name}: must be positive")))
    }
}

/// The options whose default depends on the method, listed once: each gets an accessor that
/// returns the value given, else the method's default, and `resolved` fills in every one of
/// them (and the thread count), so a new option of this kind cannot be left out of config.json.
macro_rules! method_defaulted {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),+ $(,)?) => {
        impl TrainConfig {
            $(
                $(#[$doc])*
                pub fn $name(&self) -> $ty {
                    self.$name.unwrap_or(self.method_defaults().$name)
                }
            )+

            /// This config with every option that defaults by method (and the thread count) set
            /// to the value in force.
            pub fn resolved(&self) -> TrainConfig {
                TrainConfig { $($name: Some(self.$name()),)+ threads: Some(self.threads()), ..self.clone() }
            }
        }
    };
}

method_defaulted! {
    /// Labeled images per step.
    batch: usize,
    /// Unlabeled images per step.
    unlabeled_batch: usize,
    /// Base learning rate.
    lr: f32,
    /// Learning-rate schedule.
    schedule: ScheduleKind,
    /// Optimizer.
    optimizer: OptimizerKind,
    /// Weight decay.
    weight_decay: f32,
    /// The host method's unlabeled-loss weight.
    w_u: f32,
    /// Nesterov momentum (SGD).
    nesterov: bool,
}

impl TrainConfig {
    /// The defaults of `muscle train` (the command line takes its defaults from here).
    pub const DEFAULT: TrainConfig = TrainConfig {
        dataset: DatasetKind::FashionMnist,
        data: None,
        resize: None,
        channels: None,
        method: Method::Muscle,
        model: ModelKind::ConvNet { width: DEFAULT_WIDTH },
        width: DEFAULT_WIDTH,
        labels: 40,
        val: 0,
        label_imbalance: 1.0,
        seed: 0,
        split_seed: None,
        steps: 600,
        batch: None,
        unlabeled_batch: None,
        lr: None,
        schedule: None,
        optimizer: None,
        weight_decay: None,
        momentum: 0.9,
        decay_kernels_only: false,
        nesterov: None,
        w_mi: 1.0,
        lambda: 1.0,
        mi_labeled: false,
        w_u: None,
        sync_bn: false,
        precision: Precision::F32,
        tau: 0.95,
        temperature: 0.5,
        mixup_alpha: 0.75,
        ramp: 0.2,
        ema: 0.999,
        eval_every: 200,
        eval_batch: 500,
        threads: None,
        device: Device::Cpu,
        out: None,
        init: None,
        overcluster: 1,
    };

    /// The config a run wrote to its config.json at `path` (earlier versions' files included).
    pub fn load(path: &Path) -> Result<TrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: TrainConfig =
            serde_json::from_str(&text).map_err(|e| Error::format(format!("{}: {e}", path.display())))?;
        cfg.validate().map_err(|e| Error::format(format!("{}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// The number of processes the run whose config.json is at `path` was started with (1 for
    /// files from before data-parallel runs).
    pub fn world_size_in(path: &Path) -> Result<usize> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(format!("{}: {e}", path.display())))?;
        match v.get("world_size") {
            None => Ok(1),
            Some(n) => n.as_u64().filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| {
                Error::format(format!("{}: world_size {n} is not a number of processes", path.display()))
            }),
        }
    }

    /// Every option's value (the method's defaults filled in), with the crate version, git commit,
    /// cargo features and the number of processes: the text of config.json.
    pub fn to_json(&self) -> Result<String> {
        let unwritable = |e: serde_json::Error| Error::usage(format!("the options cannot be written as JSON: {e}"));
        let mut v = serde_json::to_value(self.resolved()).map_err(unwritable)?;
        v["version"] = env!("CARGO_PKG_VERSION").into();
        v["git_commit"] = option_env!("MUSCLE_GIT_COMMIT").unwrap_or("unknown").into();
        v["features"] = crate::device::build_features().into();
        v["world_size"] = crate::dist::world().size().into();
        let text = serde_json::to_string_pretty(&v).map_err(unwritable)?;
        Ok(format!("{text}\n"))
    }

    /// The defaults of this config's method.
    pub fn method_defaults(&self) -> MethodDefaults {
        MethodDefaults::of(self.method)
    }

    /// Worker threads (all cores unless told otherwise).
    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
    }

    /// The architecture with its width.
    pub fn model_kind(&self) -> ModelKind {
        match self.model {
            ModelKind::ConvNet { .. } => ModelKind::ConvNet { width: self.width },
            other => other,
        }
    }

    /// Rejects values that can never be valid, naming the option.
    pub fn validate(&self) -> Result<()> {
        positive("--steps", self.steps > 0)?;
        positive("--overcluster", self.overcluster > 0)?;
        positive("--batch", self.batch() > 0)?;
        positive("--labels", self.labels > 0)?;
        positive("--eval-every", self.eval_every > 0)?;
        positive("--eval-batch", self.eval_batch > 0)?;
        positive("--threads", self.threads() > 0)?;
        positive("--lr", self.lr().is_finite() && self.lr() > 0.0)?;
        positive("--lambda", self.lambda.is_finite() && self.lambda > 0.0)?;
        if self.method.uses_unlabeled() {
            positive("--unlabeled-batch", self.unlabeled_batch() > 0)?;
        }
        if !(self.label_imbalance.is_finite() && self.label_imbalance >= 1.0) {
            return Err(Error::usage("--label-imbalance: must be at least 1"));
        }
        if !(self.w_mi.is_finite() && self.w_mi >= 0.0) {
            return Err(Error::usage("--w-mi: must be a finite value >= 0"));
        }
        if !(self.w_u().is_finite() && self.w_u() >= 0.0) {
            return Err(Error::usage("--w-u: must be a finite value >= 0"));
        }
        if !(self.tau > 0.0 && self.tau <= 1.0) {
            return Err(Error::usage(format!("--tau {}: must be in (0, 1]", self.tau)));
        }
        positive("--temperature", self.temperature.is_finite() && self.temperature > 0.0)?;
        positive("--mixup-alpha", self.mixup_alpha.is_finite() && self.mixup_alpha > 0.0)?;
        if !(0.0..=1.0).contains(&self.ramp) {
            return Err(Error::usage("--ramp: must be a fraction in [0, 1]"));
        }
        let weight_decay = self.weight_decay();
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(Error::usage("--weight-decay: must be a finite value >= 0"));
        }
        if !(0.0..1.0).contains(&self.ema) {
            return Err(Error::usage("--ema: must be in [0, 1)"));
        }
        if let ModelKind::ConvNet { width: 0 } = self.model_kind() {
            return Err(Error::usage("--width: must be positive"));
        }
        if self.precision == Precision::Bf16 && self.device != Device::Cpu {
            return Err(Error::usage(format!(
                "--precision bf16: the CPU's (AVX512-BF16) products; on --device {} the step computes in f32",
                self.device
            )));
        }
        Ok(())
    }

    /// Whether this machine runs the precision asked for (bf16: AVX512-BF16 and Winograd on): a
    /// fact of the machine, not of the options, so it is checked where a run starts, not by
    /// `validate` (which reading an old run's config.json on another machine also calls).
    pub fn check_precision_available(&self) -> Result<()> {
        if self.precision == Precision::Bf16 && !crate::ops::conv::bf16_available() {
            return Err(Error::usage(
                "--precision bf16: this CPU has no AVX512-BF16 (or MUSCLE_SIMD / MUSCLE_CONV turned it off); use f32",
            ));
        }
        Ok(())
    }

    /// What the loader draws each step.
    pub fn batch_plan(&self) -> BatchPlan {
        let views = if self.method.uses_unlabeled() { 2 } else { 0 };
        BatchPlan {
            labeled: if self.method == Method::Pretrain { 0 } else { self.batch() },
            unlabeled: self.unlabeled_batch(),
            views,
            labeled_second_view: self.mi_labeled && self.method.uses_unlabeled(),
            strong_view: self.method.is_fixmatch(),
            shard: crate::data::Shard::WHOLE,
        }
    }

    /// Images forwarded per step.
    pub fn images_per_step(&self) -> usize {
        let p = self.batch_plan();
        p.labeled * (1 + p.labeled_second_view as usize) + p.views * p.unlabeled
    }

    /// The seed that draws the labeled and validation split (`split_seed`, else `seed`).
    pub fn split_seed(&self) -> u64 {
        self.split_seed.unwrap_or(self.seed)
    }

    /// Steps of the linear ramp-up of the unsupervised weights.
    pub fn ramp_steps(&self) -> u64 {
        (self.ramp * self.steps as f64).round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        config: TrainConfig,
    }

    #[test]
    fn the_command_line_defaults_are_the_default_config() {
        let parsed = Cli::try_parse_from(["muscle"]).expect("no arguments").config;
        assert_eq!(parsed, TrainConfig::default());
    }

    #[test]
    fn config_json_round_trips_the_resolved_config() {
        let cfg = TrainConfig { method: Method::MixMatch, width: 8, out: Some("runs/a".into()), ..Default::default() };
        let text = cfg.to_json().expect("json");
        let back: TrainConfig = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, cfg.resolved());
        let v: serde_json::Value = serde_json::from_str(&text).expect("value");
        assert_eq!(v["method"], "mixmatch");
        assert_eq!(v["optimizer"], "adamw");
        assert_eq!(v["schedule"], "cosine");
        assert_eq!(v["device"], "cpu");
        assert_eq!(v["model"], "convnet");
        assert_eq!(v["width"], 8);
    }

    #[test]
    fn unset_options_take_the_methods_defaults() {
        for method in Method::TRAIN.into_iter().chain([Method::Pretrain]) {
            let cfg = TrainConfig { method, ..Default::default() };
            let d = MethodDefaults::of(method);
            let r = cfg.resolved();
            assert_eq!(
                (r.optimizer, r.lr, r.weight_decay, r.schedule, r.batch, r.unlabeled_batch, r.w_u, r.nesterov),
                (
                    Some(d.optimizer),
                    Some(d.lr),
                    Some(d.weight_decay),
                    Some(d.schedule),
                    Some(d.batch),
                    Some(d.unlabeled_batch),
                    Some(d.w_u),
                    Some(d.nesterov)
                )
            );
        }
        let given = TrainConfig { lr: Some(0.1), batch: Some(3), ..Default::default() };
        assert_eq!((given.lr(), given.batch()), (0.1, 3));
        // FixMatch's recipe: SGD + Nesterov at 0.03, its cosine, 64 + 7 x 64, lambda_u 1.
        let fm = TrainConfig { method: Method::FixMatch, ..Default::default() };
        assert_eq!(
            (fm.optimizer(), fm.lr(), fm.schedule(), fm.batch(), fm.unlabeled_batch(), fm.w_u(), fm.nesterov()),
            (OptimizerKind::Sgd, 0.03, ScheduleKind::FixMatchCosine, 64, 448, 1.0, true)
        );
        assert!(fm.batch_plan().strong_view && !TrainConfig::default().batch_plan().strong_view);
        assert_eq!(fm.images_per_step(), 64 + 2 * 448);
        let tau = |tau| TrainConfig { tau, ..fm.clone() }.validate().map_err(|e| e.message().to_string());
        assert!(tau(1.0).is_ok() && tau(0.5).is_ok());
        for bad in [0.0, -0.1, 1.01, f32::NAN] {
            assert!(tau(bad).is_err_and(|m| m.starts_with("--tau")), "tau {bad}");
        }
    }

    /// Options are valid or not on every machine alike: a bf16 run's config.json loads (for
    /// sweep tables, `eval`, a look) on a CPU without AVX512-BF16, and only starting a run there
    /// is refused, as a usage error naming the option.
    #[test]
    fn bf16_options_are_valid_anywhere_and_refused_only_where_a_run_starts() {
        let cfg = TrainConfig { precision: Precision::Bf16, ..TrainConfig::default() };
        cfg.validate().expect("bf16 options are valid options");
        let dir = std::env::temp_dir().join(format!("muscle-config-bf16-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("config.json");
        std::fs::write(&path, cfg.to_json().expect("json")).expect("write");
        assert_eq!(TrainConfig::load(&path).expect("load").precision, Precision::Bf16);
        let _ = std::fs::remove_dir_all(&dir);
        match cfg.check_precision_available() {
            Ok(()) => assert!(crate::ops::conv::bf16_available()),
            Err(e) => assert!(!crate::ops::conv::bf16_available() && e.message().contains("--precision bf16"), "{e}"),
        }
        let gpu = TrainConfig { device: Device::Cuda(0), ..cfg };
        assert!(gpu.validate().is_err_and(|e| e.message().contains("--precision bf16")));
    }

    #[test]
    fn a_bad_config_json_names_the_file_and_the_key() {
        let dir = std::env::temp_dir().join(format!("muscle-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&TrainConfig::default().to_json().expect("json")).expect("v");
        v["optimizer"] = "rmsprop".into();
        std::fs::write(&path, v.to_string()).expect("write");
        let e = TrainConfig::load(&path).expect_err("unknown optimizer");
        assert!(e.message().contains("config.json") && e.message().contains("rmsprop"), "{e}");
        v["optimizer"] = "adamw".into();
        v.as_object_mut().expect("object").remove("steps");
        std::fs::write(&path, v.to_string()).expect("write");
        let e = TrainConfig::load(&path).expect_err("missing key");
        assert!(e.message().contains("config.json") && e.message().contains("steps"), "{e}");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
