//! `muscle train` and `muscle pretrain`: one run with a progress display and a final line.

use super::progress::show;
use crate::error::Result;
use crate::ssl::Method;
use crate::train::{self, ScheduleKind, TrainConfig};
use std::io::IsTerminal;
use std::path::PathBuf;

/// The training options as the command line takes them: the config, and the spellings kept for
/// scripts written against earlier versions.
#[derive(Clone, Debug, clap::Args)]
pub struct TrainOptions {
    /// Every option of a run.
    #[command(flatten)]
    pub config: TrainConfig,
    /// Keep the learning rate constant (the earlier spelling of --schedule constant).
    #[arg(long, hide = true, conflicts_with = "schedule")]
    pub constant_lr: bool,
}

impl TrainOptions {
    /// The config these options describe.
    pub fn config(&self) -> TrainConfig {
        let mut cfg = self.config.clone();
        if self.constant_lr {
            cfg.schedule = Some(ScheduleKind::Constant);
        }
        cfg
    }
}

/// The options of `muscle train`.
#[derive(Clone, Debug, clap::Args)]
pub struct TrainArgs {
    /// The run's options.
    #[command(flatten)]
    pub train: TrainOptions,
    /// Continue the run in this folder from its last checkpoint, with the options of its
    /// config.json (the other options are ignored).
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
}

/// The options of `muscle pretrain`.
#[derive(Clone, Debug, clap::Args)]
pub struct PretrainArgs {
    /// The run's options (the method is pretrain).
    #[command(flatten)]
    pub train: TrainOptions,
    /// Outputs per class (over-clustering head: k x classes clusters).
    #[arg(long, default_value_t = 1)]
    pub overcluster: usize,
}

/// `muscle train`: trains (or resumes) and prints the final accuracies.
pub fn command(a: &TrainArgs) -> Result<()> {
    let tty = std::io::stdout().is_terminal();
    let s = match &a.resume {
        Some(dir) => train::resume(dir, &mut |p| show(p, tty))?,
        None => train::train(&a.train.config(), &mut |p| show(p, tty))?,
    };
    if !crate::dist::world().is_root() {
        return Ok(());
    }
    println!(
        "final: {} on {} ({} labels, {} steps, seed {}, {}): test accuracy {:.4}, EMA {:.4}; {:.1} s, {:.0} train img/s",
        s.method,
        s.dataset,
        s.labels,
        s.steps,
        s.seed,
        s.device,
        s.test_accuracy,
        s.test_accuracy_ema,
        s.wall_seconds,
        s.train_images_per_second
    );
    Ok(())
}

/// `muscle pretrain`: trains with the IIC loss alone and prints the clustering accuracy.
pub fn pretrain_command(a: &PretrainArgs) -> Result<()> {
    let cfg = TrainConfig { method: Method::Pretrain, overcluster: a.overcluster, ..a.train.config() };
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        train: TrainOptions,
    }

    #[test]
    fn constant_lr_is_still_the_constant_schedule() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).expect("parse").train.config();
        assert_eq!(parse(&["muscle", "--constant-lr"]), parse(&["muscle", "--schedule", "constant"]));
        assert_eq!(parse(&["muscle"]).schedule, None);
        assert!(Cli::try_parse_from(["muscle", "--constant-lr", "--schedule", "cosine"]).is_err());
    }
}
