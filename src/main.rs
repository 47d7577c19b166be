//! The `muscle` command line: the subcommands, their dispatch to `muscle::app`, and exit codes.

use clap::{Parser, Subcommand};
use muscle::app::train::{PretrainArgs, TrainArgs};
use muscle::app::{
    self, augment::AugmentArgs, bench::BenchArgs, eval::EvalArgs, mi::MiArgs, plot::PlotArgs, sweep::SweepArgs,
};
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
    /// Draw a PNG grid of what the network is fed: per training image, the original, weak views
    /// (crop + flip) and strong views (crop + flip, RandAugment, Cutout).
    Augment(AugmentArgs),
    /// Print build features, devices and threads.
    Info,
}

fn main() -> ExitCode {
    muscle::profile::init_from_env();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return clap_error(e),
    };
    // A malformed MUSCLE_FAULT (test-only fault injection) is a usage error before anything runs.
    if let Err(e) = muscle::fault::check_env() {
        return exit_with(&e);
    }
    // Joins the MPI world when mpirun started this process; finalised when main returns.
    let _mpi = match muscle::dist::init() {
        Ok(g) => g,
        Err(e) => return exit_with(&e),
    };
    let result = match cli.command {
        Command::Train(a) => app::train::command(&a),
        Command::Pretrain(a) => app::train::pretrain_command(&a),
        Command::Sweep(a) => app::sweep::command(&a),
        Command::Eval(a) => app::eval::command(&a),
        Command::Bench(a) => app::bench::command(&a),
        Command::Mi(a) => app::mi::command(&a),
        Command::Plot(a) => app::plot::command(&a),
        Command::Augment(a) => app::augment::command(&a),
        Command::Info => app::info::command(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_with(&e),
    }
}

/// One line on stderr and the error's exit code (2 for a value that can never be valid, else 1).
fn exit_with(e: &muscle::Error) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(e.exit_code() as u8)
}

/// Help and version print as clap formats them; a value our parsers reject (unknown method,
/// device, ...) is reported like any other error of ours; every other parse error becomes one
/// line, exit 2.
fn clap_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind as K;
    if matches!(e.kind(), K::DisplayHelp | K::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if let Some(ours) = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<muscle::Error>()) {
        return exit_with(ours);
    }
    let text = e.to_string();
    let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("invalid arguments");
    eprintln!("error: {} (see --help)", first.trim_start_matches("error: ").trim_end_matches('.'));
    ExitCode::from(2)
}
