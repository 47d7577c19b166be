//! Everything a training run depends on, as one value (written to config.json).

use crate::data::{BatchPlan, DatasetKind};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::ModelKind;
use crate::ssl::Method;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::str::FromStr;

/// Which optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    /// Adam with L2 decay in the gradient.
    Adam,
    /// Adam with decoupled weight decay (the default recipe).
    AdamW,
    /// SGD with momentum (Nesterov optional).
    Sgd,
}

impl FromStr for OptimizerKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adam" => Ok(OptimizerKind::Adam),
            "adamw" => Ok(OptimizerKind::AdamW),
            "sgd" => Ok(OptimizerKind::Sgd),
            _ => Err(Error::usage(format!("--optimizer: unknown optimizer '{s}' (expected adam, adamw or sgd)"))),
        }
    }
}

/// Options of `muscle train`: METHOD.md's default recipe, except 600 steps at lr 1e-3 (chosen on a
/// validation split, README "Default recipe"), unless told otherwise.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Data set format.
    pub dataset: DatasetKind,
    /// Folder with the full data; None: the embedded Fashion-MNIST subset.
    pub data: Option<PathBuf>,
    /// Resize image-folder images to S x S.
    pub resize: Option<usize>,
    /// Convert image-folder images to this many channels.
    pub channels: Option<usize>,
    /// Objective.
    pub method: Method,
    /// Architecture.
    pub model: ModelKind,
    /// Number of labeled images.
    pub labels: usize,
    /// Held-out validation images (class-balanced).
    pub val: usize,
    /// Label imbalance ratio R (1 = balanced).
    pub imbalance: f64,
    /// Seed of the split, initialisation, batches, augmentation and dropout.
    pub seed: u64,
    /// Seed of the labeled / validation split alone, when it differs from `seed` (to measure the
    /// spread over initialisations and batches on one fixed labeled set).
    pub split_seed: Option<u64>,
    /// Optimizer steps.
    pub steps: u64,
    /// Labeled images per step.
    pub batch: usize,
    /// Unlabeled images per step (each seen in two views).
    pub unlabeled_batch: usize,
    /// Base learning rate.
    pub lr: f32,
    /// Optimizer.
    pub optimizer: OptimizerKind,
    /// Weight decay (decoupled for AdamW, multiplied by the lr as PyTorch does).
    pub weight_decay: f32,
    /// SGD momentum.
    pub momentum: f32,
    /// Decay only conv and dense kernels (MixMatch), not biases and BN parameters.
    pub decay_kernels_only: bool,
    /// Cosine learning-rate schedule over the run (else constant).
    pub cosine: bool,
    /// Maximum weight of the MI term.
    pub w_mi: f32,
    /// IIC lambda.
    pub lambda: f32,
    /// Also feed two views of the labeled images into the MI term.
    pub mi_labeled: bool,
    /// MixMatch: maximum weight of L_U.
    pub w_host: f32,
    /// MixMatch: sharpening temperature.
    pub temperature: f32,
    /// MixMatch: MixUp's Beta parameter.
    pub mixup_alpha: f32,
    /// Fraction of the steps over which unsupervised weights ramp up linearly.
    pub ramp: f64,
    /// EMA decay (the schedule's maximum).
    pub ema: f32,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: u64,
    /// Images per evaluation batch.
    pub eval_batch: usize,
    /// Worker threads.
    pub threads: usize,
    /// Compute device.
    pub device: Device,
    /// Output folder.
    pub out: Option<PathBuf>,
    /// Start from this checkpoint's weights (fine-tuning); a head of another size is re-initialised.
    pub init: Option<PathBuf>,
    /// Outputs per class of the model (pre-training's over-clustering; 1 otherwise).
    pub overcluster: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            dataset: DatasetKind::FashionMnist,
            data: None,
            resize: None,
            channels: None,
            method: Method::Muscle,
            model: ModelKind::ConvNet { width: 32 },
            labels: 40,
            val: 0,
            imbalance: 1.0,
            seed: 0,
            split_seed: None,
            steps: 600,
            batch: 64,
            unlabeled_batch: 256,
            lr: 1e-3,
            optimizer: OptimizerKind::AdamW,
            weight_decay: 5e-4,
            momentum: 0.9,
            decay_kernels_only: false,
            cosine: true,
            w_mi: 1.0,
            lambda: 1.0,
            mi_labeled: false,
            w_host: 75.0,
            temperature: 0.5,
            mixup_alpha: 0.75,
            ramp: 0.2,
            ema: 0.999,
            eval_every: 200,
            eval_batch: 500,
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            device: Device::Cpu,
            out: None,
            init: None,
            overcluster: 1,
        }
    }
}

fn positive(name: &str, ok: bool) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!("{name}: must be positive")))
    }
}

impl TrainConfig {
    /// Rejects values that can never be valid, naming the option.
    pub fn validate(&self) -> Result<()> {
        positive("--steps", self.steps > 0)?;
        positive("--overcluster", self.overcluster > 0)?;
        positive("--batch", self.batch > 0)?;
        positive("--labels", self.labels > 0)?;
        positive("--eval-every", self.eval_every > 0)?;
        positive("--eval-batch", self.eval_batch > 0)?;
        positive("--threads", self.threads > 0)?;
        positive("--lr", self.lr.is_finite() && self.lr > 0.0)?;
        positive("--lambda", self.lambda.is_finite() && self.lambda > 0.0)?;
        if self.method.uses_unlabeled() {
            positive("--unlabeled-batch", self.unlabeled_batch > 0)?;
        }
        if !(self.imbalance.is_finite() && self.imbalance >= 1.0) {
            return Err(Error::usage("--label-imbalance: must be at least 1"));
        }
        if !(self.w_mi.is_finite() && self.w_mi >= 0.0) {
            return Err(Error::usage("--w-mi: must be a finite value >= 0"));
        }
        if !(self.w_host.is_finite() && self.w_host >= 0.0) {
            return Err(Error::usage("--w-u: must be a finite value >= 0"));
        }
        positive("--temperature", self.temperature.is_finite() && self.temperature > 0.0)?;
        positive("--mixup-alpha", self.mixup_alpha.is_finite() && self.mixup_alpha > 0.0)?;
        if !(0.0..=1.0).contains(&self.ramp) {
            return Err(Error::usage("--ramp: must be a fraction in [0, 1]"));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::usage("--weight-decay: must be a finite value >= 0"));
        }
        if !(0.0..1.0).contains(&self.ema) {
            return Err(Error::usage("--ema: must be in [0, 1)"));
        }
        if let ModelKind::ConvNet { width: 0 } = self.model {
            return Err(Error::usage("--width: must be positive"));
        }
        Ok(())
    }

    /// What the loader draws each step.
    pub fn batch_plan(&self) -> BatchPlan {
        let views = if self.method.uses_unlabeled() { 2 } else { 0 };
        BatchPlan {
            labeled: if self.method == Method::Pretrain { 0 } else { self.batch },
            unlabeled: self.unlabeled_batch,
            views,
            labeled_second_view: self.mi_labeled && self.method.uses_unlabeled(),
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

    /// The config a run wrote to its config.json (`path` names the file in errors).
    pub fn from_json(v: &Value, path: &std::path::Path) -> Result<TrainConfig> {
        let bad = |key: &str| Error::format(format!("{}: '{key}' is missing or invalid", path.display()));
        let s = |key: &str| v.get(key).and_then(Value::as_str).ok_or_else(|| bad(key));
        let u = |key: &str| v.get(key).and_then(Value::as_u64).ok_or_else(|| bad(key));
        let f = |key: &str| v.get(key).and_then(Value::as_f64).ok_or_else(|| bad(key));
        let b = |key: &str| v.get(key).and_then(Value::as_bool).ok_or_else(|| bad(key));
        let opt_u = |key: &str| v.get(key).and_then(Value::as_u64).map(|x| x as usize);
        let ctx = |e: Error| Error::format(format!("{}: {e}", path.display()));
        let mut model: ModelKind = s("model")?.parse().map_err(ctx)?;
        if let ModelKind::ConvNet { width } = &mut model {
            *width = u("width")? as usize;
        }
        let cfg = TrainConfig {
            dataset: s("dataset")?.parse().map_err(ctx)?,
            data: v.get("data").and_then(Value::as_str).map(PathBuf::from),
            resize: opt_u("resize"),
            channels: opt_u("channels"),
            method: s("method")?.parse().map_err(ctx)?,
            model,
            labels: u("labels")? as usize,
            val: u("val")? as usize,
            imbalance: f("label_imbalance")?,
            seed: u("seed")?,
            split_seed: v.get("split_seed").and_then(Value::as_u64),
            steps: u("steps")?,
            batch: u("batch")? as usize,
            unlabeled_batch: u("unlabeled_batch")? as usize,
            lr: f("lr")? as f32,
            optimizer: s("optimizer")?.parse().map_err(ctx)?,
            weight_decay: f("weight_decay")? as f32,
            momentum: f("momentum")? as f32,
            decay_kernels_only: v.get("decay_kernels_only").and_then(Value::as_bool).unwrap_or(false),
            cosine: s("schedule")? == "cosine",
            w_mi: f("w_mi")? as f32,
            lambda: f("lambda")? as f32,
            mi_labeled: b("mi_labeled")?,
            w_host: f("w_u")? as f32,
            temperature: f("temperature")? as f32,
            mixup_alpha: f("mixup_alpha")? as f32,
            ramp: f("ramp")?,
            ema: f("ema")? as f32,
            eval_every: u("eval_every")?,
            eval_batch: u("eval_batch")? as usize,
            threads: u("threads")? as usize,
            device: s("device")?.parse().map_err(ctx)?,
            out: v.get("out").and_then(Value::as_str).map(PathBuf::from),
            init: v.get("init").and_then(Value::as_str).map(PathBuf::from),
            overcluster: opt_u("overcluster").unwrap_or(1),
        };
        cfg.validate().map_err(ctx)?;
        Ok(cfg)
    }

    /// Every option's value, for config.json.
    pub fn to_json(&self) -> Value {
        let width = match self.model {
            ModelKind::ConvNet { width } => Some(width),
            _ => None,
        };
        json!({
            "dataset": self.dataset.name(),
            "data": self.data.as_ref().map(|p| p.display().to_string()),
            "resize": self.resize,
            "channels": self.channels,
            "method": self.method.to_string(),
            "model": self.model.to_string(),
            "width": width,
            "labels": self.labels,
            "val": self.val,
            "label_imbalance": self.imbalance,
            "seed": self.seed,
            "split_seed": self.split_seed,
            "steps": self.steps,
            "batch": self.batch,
            "unlabeled_batch": self.unlabeled_batch,
            "lr": self.lr,
            "optimizer": format!("{:?}", self.optimizer).to_lowercase(),
            "weight_decay": self.weight_decay,
            "momentum": self.momentum,
            "decay_kernels_only": self.decay_kernels_only,
            "schedule": if self.cosine { "cosine" } else { "constant" },
            "w_mi": self.w_mi,
            "lambda": self.lambda,
            "mi_labeled": self.mi_labeled,
            "w_u": self.w_host,
            "temperature": self.temperature,
            "mixup_alpha": self.mixup_alpha,
            "ramp": self.ramp,
            "ema": self.ema,
            "eval_every": self.eval_every,
            "eval_batch": self.eval_batch,
            "threads": self.threads,
            "device": self.device.to_string(),
            "out": self.out.as_ref().map(|p| p.display().to_string()),
            "init": self.init.as_ref().map(|p| p.display().to_string()),
            "overcluster": self.overcluster,
            "version": env!("CARGO_PKG_VERSION"),
            "git_commit": option_env!("MUSCLE_GIT_COMMIT").unwrap_or("unknown"),
            "features": crate::build_features(),
        })
    }
}
