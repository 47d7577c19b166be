//! The `muscle` command line: argument parsing, progress display, printing. Everything else lives
//! in the library.

use clap::{Args, Parser, Subcommand};
use muscle::data::{self, Augment, DatasetKind};
use muscle::nn::ModelKind;
use muscle::ssl::Method;
use muscle::train::{self, OptimizerKind, Progress, TrainConfig};
use muscle::{Device, Error, Result};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Caches freed large blocks and counts large allocations, so that `muscle bench` can report them per step.
#[global_allocator]
static ALLOC: muscle::alloc_count::CountingAlloc = muscle::alloc_count::CountingAlloc;

#[derive(Parser)]
#[command(name = "muscle", version, about = "MUSCLE: semi-supervised training with mutual-information maximisation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a classifier (defaults: MUSCLE, convnet, 40 labels of the embedded Fashion-MNIST subset).
    Train(Box<TrainArgs>),
    /// Unsupervised pre-training with the IIC loss alone; reports clustering accuracy (Hungarian
    /// matching of clusters to classes) on the test set. Fine-tune with `train --init`.
    Pretrain(Box<PretrainArgs>),
    /// Run a grid of trainings (methods x labels x seeds x imbalance), resumably, into one folder
    /// with results.csv and results.md (mean +- std over seeds).
    Sweep(Box<SweepArgs>),
    /// Evaluate a checkpoint written by `muscle train` on a data set's test split.
    Eval(EvalArgs),
    /// Time training steps (median ms/step, images/s) of a model and method.
    Bench(BenchArgs),
    /// Reference IIC loss and gradients in f64 for two n x C logit matrices (.npy or
    /// .safetensors, f32 or f64), to check other implementations against.
    Mi(MiArgs),
    /// Draw PNG charts: EMA test accuracy against steps for run folders (their metrics.jsonl),
    /// or, with --sweep, accuracy against the number of labels per method (results.csv).
    Plot(PlotArgs),
    /// Print build features, devices and threads.
    Info,
}

#[derive(Args)]
struct PlotArgs {
    /// Run folders written by `muscle train --out` (or a sweep's cells), one curve each.
    runs: Vec<PathBuf>,
    /// A sweep folder: plot its results.csv instead (mean +- std over seeds, log label axis).
    #[arg(long, conflicts_with = "runs")]
    sweep: Option<PathBuf>,
    /// With --sweep: the label imbalance whose cells are plotted.
    #[arg(long, default_value_t = 1.0)]
    imbalance: f64,
    /// Chart title.
    #[arg(long, default_value = "")]
    title: String,
    /// The PNG file to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct MiArgs {
    /// Logits of the first view, n x C.
    #[arg(long = "logits-a")]
    logits_a: PathBuf,
    /// Logits of the second view, n x C.
    #[arg(long = "logits-b")]
    logits_b: PathBuf,
    /// IIC lambda (1: mutual information).
    #[arg(long, default_value_t = 1.0)]
    lambda: f64,
    /// Write the gradients (grad_a, grad_b, f64) to this .safetensors file.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    /// Architecture: convnet (embedded real data), wrn-28-2 or cnn13 (synthetic 32x32x3 images).
    #[arg(long, default_value = "convnet")]
    model: String,
    /// Objective: supervised or muscle.
    #[arg(long, default_value = "muscle")]
    method: String,
    /// Labeled images per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Unlabeled images per step (two views each).
    #[arg(long = "unlabeled-batch", default_value_t = 256)]
    unlabeled_batch: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Device: cpu, or cuda[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print one JSON object per case instead of text.
    #[arg(long)]
    json: bool,
    /// Also print where the time went, by op (same as MUSCLE_PROFILE=1).
    #[arg(long)]
    profile: bool,
    /// Time one kernel instead of training steps: mi, softmax-ce, conv (the convnet's layers at
    /// --batch images) or gemm; prints time, GB/s or GFLOP/s and the fraction of the ceiling
    /// (copy bandwidth or FMA peak) measured by the same command.
    #[arg(long)]
    op: Option<String>,
    /// Rows (images) for --op mi and softmax-ce.
    #[arg(long, default_value_t = 262_144)]
    rows: usize,
    /// Classes for --op mi and softmax-ce.
    #[arg(long, default_value_t = 10)]
    classes: usize,
    /// GEMM rows of the output, for --op gemm.
    #[arg(long, default_value_t = 1024)]
    m: usize,
    /// GEMM columns of the output, for --op gemm.
    #[arg(long, default_value_t = 1024)]
    n: usize,
    /// GEMM inner dimension, for --op gemm.
    #[arg(long, default_value_t = 1024)]
    k: usize,
}

#[derive(Args)]
struct TrainArgs {
    /// Data set format: fashion-mnist, mnist, cifar10, cifar100, folder.
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    /// Folder with the full data set; without it, the embedded Fashion-MNIST subset
    /// (10,000 train / 2,000 test images) is used.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Image folders: resize every image to S x S.
    #[arg(long)]
    resize: Option<usize>,
    /// Image folders: convert to 1 (grey) or 3 (colour) channels.
    #[arg(long)]
    channels: Option<usize>,
    /// Objective: supervised, muscle, mixmatch, mixmatch-muscle.
    #[arg(long, default_value = "muscle")]
    method: String,
    /// Architecture: convnet, wrn-28-2, cnn13.
    #[arg(long, default_value = "convnet")]
    model: String,
    /// convnet base width.
    #[arg(long, default_value_t = 32)]
    width: usize,
    /// Number of labeled images (class-balanced, drawn by --split-seed, else --seed).
    #[arg(long, default_value_t = 40)]
    labels: usize,
    /// Class-balanced validation images held out of the labeled and unlabeled sets.
    #[arg(long, default_value_t = 0)]
    val: usize,
    /// Largest / smallest per-class label count (1 = balanced).
    #[arg(long = "label-imbalance", default_value_t = 1.0)]
    imbalance: f64,
    /// Seed of the split, initialisation, batches, augmentation and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seed of the labeled / validation split alone [default: --seed]; with it, --seed varies
    /// only the initialisation, batches and augmentation on one fixed labeled set.
    #[arg(long = "split-seed")]
    split_seed: Option<u64>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 600)]
    steps: u64,
    /// Labeled images per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Unlabeled images per step (each forwarded in two augmented views).
    #[arg(long = "unlabeled-batch", default_value_t = 256)]
    unlabeled_batch: usize,
    /// Base learning rate (cosine-decayed to 0 unless --constant-lr).
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Keep the learning rate constant.
    #[arg(long = "constant-lr")]
    constant_lr: bool,
    /// Optimizer: adamw, adam, sgd.
    #[arg(long, default_value = "adamw")]
    optimizer: String,
    /// Weight decay (AdamW: decoupled, times the lr).
    #[arg(long = "weight-decay", default_value_t = 5e-4)]
    weight_decay: f32,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Decay only conv and dense kernels, not biases and BN parameters (MixMatch's choice).
    #[arg(long = "decay-kernels-only")]
    decay_kernels_only: bool,
    /// Maximum weight of the MI term.
    #[arg(long = "w-mi", default_value_t = 1.0)]
    w_mi: f32,
    /// IIC lambda (1: mutual information; > 1 favours balanced predictions).
    #[arg(long, default_value_t = 1.0)]
    lambda: f32,
    /// Also feed two augmented views of the labeled images into the MI term.
    #[arg(long = "mi-labeled")]
    mi_labeled: bool,
    /// MixMatch: maximum weight of the unlabeled loss L_U (75 for CIFAR-10, 150 for CIFAR-100).
    #[arg(long = "w-u", default_value_t = 75.0)]
    w_u: f32,
    /// MixMatch: sharpening temperature of the guessed labels.
    #[arg(long, default_value_t = 0.5)]
    temperature: f32,
    /// MixMatch: MixUp coefficient mu ~ Beta(alpha, alpha).
    #[arg(long = "mixup-alpha", default_value_t = 0.75)]
    mixup_alpha: f32,
    /// Fraction of the steps over which the MI (and MixMatch's L_U) weight ramps up linearly.
    #[arg(long, default_value_t = 0.2)]
    ramp: f64,
    /// EMA decay of the evaluated weights (ramped as min(ema, (1+t)/(10+t))).
    #[arg(long, default_value_t = 0.999)]
    ema: f32,
    /// Evaluate (raw and EMA weights) every this many steps, and at the end.
    #[arg(long = "eval-every", default_value_t = 200)]
    eval_every: u64,
    /// Worker threads for GEMM, convolution, BN and augmentation (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Device: cpu, or cuda[:N] in a build with the cuda feature.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Output folder: config.json, metrics.jsonl, checkpoints, summary.json.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint, with the options of its
    /// config.json (the other options are ignored).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Fine-tune: start from this checkpoint's weights (e.g. from `muscle pretrain`); a
    /// classifier head of another size is re-initialised.
    #[arg(long, value_name = "CKPT")]
    init: Option<PathBuf>,
}

#[derive(Args)]
struct SweepArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// Methods, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "supervised,muscle")]
    methods: Vec<String>,
    /// Label counts, comma-separated.
    #[arg(long = "label-counts", value_delimiter = ',', default_value = "40,250")]
    label_counts: Vec<usize>,
    /// Seeds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    seeds: Vec<u64>,
    /// Label imbalance ratios, comma-separated.
    #[arg(long = "imbalances", value_delimiter = ',', default_value = "1")]
    imbalances: Vec<f64>,
}

#[derive(Args)]
struct PretrainArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// Outputs per class (over-clustering head: k x classes clusters).
    #[arg(long, default_value_t = 1)]
    overcluster: usize,
}

#[derive(Args)]
struct EvalArgs {
    /// checkpoint.safetensors written by `muscle train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Data set format (as for train).
    #[arg(long, default_value = "fashion-mnist")]
    dataset: String,
    /// Folder with the data set; without it, the embedded Fashion-MNIST test images.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl TrainArgs {
    fn config(&self) -> Result<TrainConfig> {
        let mut model: ModelKind = self.model.parse()?;
        if let ModelKind::ConvNet { width } = &mut model {
            *width = self.width;
        }
        let d = TrainConfig::default();
        Ok(TrainConfig {
            dataset: self.dataset.parse()?,
            data: self.data.clone(),
            resize: self.resize,
            channels: self.channels,
            method: self.method.parse()?,
            model,
            labels: self.labels,
            val: self.val,
            imbalance: self.imbalance,
            seed: self.seed,
            split_seed: self.split_seed,
            steps: self.steps,
            batch: self.batch,
            unlabeled_batch: self.unlabeled_batch,
            lr: self.lr,
            optimizer: self.optimizer.parse::<OptimizerKind>()?,
            weight_decay: self.weight_decay,
            momentum: self.momentum,
            decay_kernels_only: self.decay_kernels_only,
            cosine: !self.constant_lr,
            w_mi: self.w_mi,
            lambda: self.lambda,
            mi_labeled: self.mi_labeled,
            w_host: self.w_u,
            temperature: self.temperature,
            mixup_alpha: self.mixup_alpha,
            ramp: self.ramp,
            ema: self.ema,
            eval_every: self.eval_every,
            eval_batch: d.eval_batch,
            threads: self.threads.unwrap_or(d.threads),
            device: self.device.parse::<Device>()?,
            out: self.out.clone(),
            init: self.init.clone(),
            overcluster: 1,
        })
    }
}

fn main() -> ExitCode {
    muscle::profile::init_from_env();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return clap_error(e),
    };
    let result = match cli.command {
        Command::Train(a) => run_train(&a),
        Command::Pretrain(a) => run_pretrain(&a),
        Command::Sweep(a) => run_sweep(&a),
        Command::Eval(a) => run_eval(&a),
        Command::Bench(a) => run_bench(&a),
        Command::Mi(a) => run_mi(&a),
        Command::Plot(a) => run_plot(&a),
        Command::Info => info(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// Help and version print as clap formats them; every parse error becomes one line, exit 2.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind as K;
    if matches!(e.kind(), K::DisplayHelp | K::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let text = e.to_string();
    let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("invalid arguments");
    eprintln!("error: {} (see --help)", first.trim_start_matches("error: ").trim_end_matches('.'));
    ExitCode::from(2)
}

/// A one-line progress bar on a terminal; plain log lines (every 50 steps and at evaluations)
/// otherwise.
fn show(p: &Progress, tty: bool) {
    let eta = p.train_seconds / p.step as f64 * (p.steps - p.step) as f64;
    let text = format!(
        "step {}/{} loss {:.4} (sup {:.4}, mi {:.4}) {:.0} img/s eta {:.0}s",
        p.step, p.steps, p.loss, p.sup, p.mi, p.images_per_second, eta
    );
    if tty {
        let filled = (30 * p.step / p.steps.max(1)) as usize;
        print!("\r[{}{}] {text}   ", "#".repeat(filled), ".".repeat(30 - filled));
        if let Some((raw, ema)) = p.eval {
            println!("\n  eval at step {}: test accuracy {:.4}, EMA {:.4}", p.step, raw, ema);
        }
        let _ = std::io::stdout().flush();
    } else if let Some((raw, ema)) = p.eval {
        println!("{text} | test accuracy {raw:.4}, EMA {ema:.4}");
    } else if p.step.is_multiple_of(50) {
        println!("{text}");
    }
}

fn run_train(a: &TrainArgs) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    let s = match &a.resume {
        Some(dir) => train::resume(dir, &mut |p| show(p, tty))?,
        None => train::train(&a.config()?, &mut |p| show(p, tty))?,
    };
    println!(
        "final: {} on {} ({} labels, {} steps, seed {}): test accuracy {:.4}, EMA {:.4}; {:.1} s, {:.0} train img/s",
        s.method,
        s.dataset,
        s.labels,
        s.steps,
        s.seed,
        s.test_accuracy,
        s.test_accuracy_ema,
        s.wall_seconds,
        s.train_images_per_second
    );
    Ok(())
}

fn run_sweep(a: &SweepArgs) -> Result<()> {
    let base = a.train.config()?;
    let dir = base.out.clone().ok_or_else(|| Error::usage("sweep: --out DIR is required"))?;
    let grid = muscle::app::sweep::Grid {
        methods: a.methods.iter().map(|m| m.parse()).collect::<Result<_>>()?,
        labels: a.label_counts.clone(),
        seeds: a.seeds.clone(),
        imbalance: a.imbalances.clone(),
    };
    let tty = std::io::stdout().is_terminal();
    muscle::app::sweep::sweep(&base, &grid, &dir, &mut |cell, p| {
        if p.eval.is_some() || p.step == p.steps {
            print!("{cell}: ");
        }
        show(p, tty)
    })?;
    print!("{}", std::fs::read_to_string(dir.join("results.md")).map_err(|e| Error::io(&dir, e))?);
    Ok(())
}

fn run_pretrain(a: &PretrainArgs) -> Result<()> {
    let mut cfg = a.train.config()?;
    cfg.method = Method::Pretrain;
    cfg.overcluster = a.overcluster;
    let tty = std::io::stdout().is_terminal();
    let s = train::train(&cfg, &mut |p| show(p, tty))?;
    println!(
        "final: pretrain on {} ({} clusters, {} steps, seed {}): clustering accuracy {:.4}, EMA {:.4}; {:.1} s",
        s.dataset,
        s.per_class_accuracy.len(),
        s.steps,
        s.seed,
        s.test_accuracy,
        s.test_accuracy_ema,
        s.wall_seconds
    );
    Ok(())
}

fn run_eval(a: &EvalArgs) -> Result<()> {
    let device: Device = a.device.parse()?;
    device.check_available()?;
    muscle::cpu::set_threads(a.threads.unwrap_or_else(|| TrainConfig::default().threads))?;
    let (mut model, info) = train::model_from_checkpoint(&a.checkpoint)?;
    model.to_device(device)?;
    let kind: DatasetKind = a.dataset.parse()?;
    let test = match &a.data {
        None => data::embedded()?.test,
        Some(dir) => data::load(kind, dir, None, None)?.test,
    };
    if (test.channels, test.height, test.width, test.classes)
        != (info.spec.in_channels, info.spec.height, info.spec.width, info.spec.classes)
    {
        return Err(Error::format(format!(
            "{}: the checkpoint's model takes {}x{}x{} images and {} classes; {} has {}x{}x{} and {}",
            a.checkpoint.display(),
            info.spec.in_channels,
            info.spec.height,
            info.spec.width,
            info.spec.classes,
            test.name,
            test.channels,
            test.height,
            test.width,
            test.classes
        )));
    }
    let aug = Augment::normalize_only(info.mean.clone(), info.std.clone());
    let r = train::evaluate(&mut model, &test, None, &aug, 500)?;
    println!(
        "{}",
        serde_json::json!({"checkpoint": a.checkpoint.display().to_string(), "dataset": test.name, "images": r.images, "test_accuracy": r.accuracy, "per_class_accuracy": r.per_class_accuracy})
    );
    Ok(())
}

fn run_bench(a: &BenchArgs) -> Result<()> {
    if let Some(op) = &a.op {
        return run_bench_op(a, op.parse()?);
    }
    let mut model: ModelKind = a.model.parse()?;
    if let ModelKind::ConvNet { width } = &mut model {
        *width = 32;
    }
    let d = TrainConfig::default();
    let cfg = TrainConfig {
        model,
        method: a.method.parse()?,
        batch: a.batch,
        unlabeled_batch: a.unlabeled_batch,
        threads: a.threads.unwrap_or(d.threads),
        device: a.device.parse()?,
        steps: (a.steps + a.warmup).max(1) as u64,
        ..d
    };
    if a.steps == 0 {
        return Err(Error::usage("--steps: must be positive"));
    }
    if a.profile {
        muscle::profile::enable();
    }
    let r = muscle::app::bench::bench_training(&cfg, a.warmup, a.steps)?;
    if a.json {
        println!("{}", serde_json::to_string(&r).map_err(|e| Error::format(e.to_string()))?);
    } else {
        println!(
            "{} {} batch {}+{}: {:.1} ms/step, {:.0} images/s, large allocations/step: {:.1} requested, {:.1} from the system ({} threads, {}{})",
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
    }
    if muscle::profile::enabled() {
        let rows = muscle::profile::report();
        let timed = a.steps as f64;
        eprintln!("{:<18} {:>8} {:>12}", "op", "calls", "ms/step");
        for (name, calls, secs) in rows {
            eprintln!("{name:<18} {calls:>8} {:>12.2}", secs * 1e3 / timed);
        }
    }
    Ok(())
}

/// `muscle plot`.
fn run_plot(a: &PlotArgs) -> Result<()> {
    match (&a.sweep, a.runs.is_empty()) {
        (Some(dir), _) => {
            let title = if a.title.is_empty() {
                format!("{} (imbalance {})", dir.display(), a.imbalance)
            } else {
                a.title.clone()
            };
            muscle::app::plot::plot_sweep(dir, a.imbalance, &title, &a.out)?
        }
        (None, false) => muscle::app::plot::plot_runs(&a.runs, &a.title, &a.out)?,
        (None, true) => return Err(Error::usage("plot: give run folders or --sweep DIR")),
    }
    println!("wrote {}", a.out.display());
    Ok(())
}

/// `muscle bench --op`: one kernel against the measured ceiling.
fn run_bench_op(a: &BenchArgs, op: muscle::app::bench_op::Op) -> Result<()> {
    let device: muscle::Device = a.device.parse()?;
    device.check_available()?;
    if let Some(t) = a.threads {
        muscle::cpu::set_threads(t)?;
    }
    let b = muscle::app::bench_op::OpBench {
        op,
        rows: a.rows,
        classes: a.classes,
        mnk: (a.m, a.n, a.k),
        batch: a.batch,
        reps: a.steps,
        model: a.model.clone(),
    };
    let results = match device {
        muscle::Device::Cpu => muscle::app::bench_op::run(&b)?,
        #[cfg(feature = "cuda")]
        muscle::Device::Cuda(i) => muscle::app::bench_op_gpu::run(&b, i)?,
        #[cfg(not(feature = "cuda"))]
        muscle::Device::Cuda(_) => {
            return Err(Error::device("--device cuda: this binary was built without the `cuda` feature"))
        }
    };
    for r in results {
        if a.json {
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

/// Reads an n x C matrix from .npy, or from the single tensor of a .safetensors file.
fn read_logits(path: &std::path::Path) -> Result<muscle::npy::Matrix> {
    if path.extension().is_some_and(|e| e == "npy") {
        return muscle::npy::read_npy(path);
    }
    let ck = muscle::train::checkpoint::Checkpoint::load(path)?;
    let [e] = ck.entries.as_slice() else {
        return Err(Error::format(format!(
            "{}: expected exactly one tensor, found {}",
            path.display(),
            ck.entries.len()
        )));
    };
    let [rows, cols] = e.shape[..] else {
        return Err(Error::format(format!(
            "{}: tensor '{}' of shape {:?} is not 2-d",
            path.display(),
            e.name,
            e.shape
        )));
    };
    let data = match &e.values {
        muscle::train::checkpoint::Values::F64(v) => v.clone(),
        muscle::train::checkpoint::Values::F32(v) => v.iter().map(|&x| x as f64).collect(),
        _ => return Err(Error::format(format!("{}: tensor '{}' is not f32 or f64", path.display(), e.name))),
    };
    Ok(muscle::npy::Matrix { rows, cols, data })
}

fn run_mi(a: &MiArgs) -> Result<()> {
    use muscle::train::checkpoint::{Checkpoint, Entry, Values};
    if !(a.lambda.is_finite() && a.lambda > 0.0) {
        return Err(Error::usage("--lambda: must be a finite value > 0"));
    }
    let (za, zb) = (read_logits(&a.logits_a)?, read_logits(&a.logits_b)?);
    if (za.rows, za.cols) != (zb.rows, zb.cols) || za.rows == 0 || za.cols < 2 {
        return Err(Error::usage(format!(
            "--logits-a ({} x {}) and --logits-b ({} x {}) must have the same shape, n >= 1 rows and C >= 2 columns",
            za.rows, za.cols, zb.rows, zb.cols
        )));
    }
    let (loss, ga, gb) = muscle::ops::mutual_info::mi_loss_f64(&za.data, &zb.data, za.rows, za.cols, a.lambda);
    if let Some(out) = &a.out {
        let shape = vec![za.rows, za.cols];
        let ck = Checkpoint {
            entries: vec![
                Entry { name: "grad_a".into(), shape: shape.clone(), values: Values::F64(ga) },
                Entry { name: "grad_b".into(), shape, values: Values::F64(gb) },
            ],
            metadata: [("loss".to_string(), format!("{loss:e}")), ("lambda".to_string(), format!("{}", a.lambda))]
                .into(),
        };
        ck.save(out)?;
    }
    println!("{}", serde_json::json!({"loss": loss, "rows": za.rows, "classes": za.cols, "lambda": a.lambda}));
    Ok(())
}

fn info() -> Result<()> {
    println!("muscle {}", env!("CARGO_PKG_VERSION"));
    let f = muscle::build_features();
    println!("features: {}", if f.is_empty() { "cpu-only".to_string() } else { f.join(",") });
    println!("threads: {} (default for --threads)", TrainConfig::default().threads);
    println!("devices: cpu{}", if cfg!(feature = "cuda") { ", cuda (see below)" } else { "" });
    #[cfg(feature = "cuda")]
    match muscle::cuda::device::probe() {
        Ok(g) => println!(
            "cuda:0: {} (compute {}.{}, driver {}.{}, {:.1} GiB)",
            g.name,
            g.compute_capability.0,
            g.compute_capability.1,
            g.driver_version / 1000,
            g.driver_version % 1000 / 10,
            g.total_memory as f64 / (1u64 << 30) as f64
        ),
        Err(e) => println!("cuda: {e}"),
    }
    #[cfg(feature = "cudnn")]
    match muscle::cuda::device::cudnn_version() {
        Ok((major, minor, patch)) => println!("cudnn: {major}.{minor}.{patch}"),
        Err(e) => println!("cudnn: {e}"),
    }
    println!("methods: {}", Method::ALL.join(", "));
    Ok(())
}
