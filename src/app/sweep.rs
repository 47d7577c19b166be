//! `muscle sweep`: a grid of training runs (methods x labels x seeds x label imbalance ratios),
//! one folder per cell. Resumable: a cell with a summary.json is kept and skipped, a cell with only a
//! config.json continues from its checkpoint, so a long grid can run over several sittings.
//! After every cell, results.csv (one row per run) and results.md (mean +- std over seeds) are
//! rewritten from the cells' summary.json files.

use super::progress::show;
use super::train::TrainOptions;
use crate::error::{Error, Result};
use crate::ssl::Method;
use crate::train::{self, checkpoint::write_atomic, Progress, Summary, TrainConfig};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// The options of `muscle sweep`: the grid's axes, and the options of every run.
#[derive(Clone, Debug, clap::Args)]
pub struct SweepArgs {
    /// The options every cell shares (each cell sets its method, labels, imbalance and seed).
    #[command(flatten)]
    pub train: TrainOptions,
    /// Methods, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "supervised,muscle")]
    pub methods: Vec<Method>,
    /// Label counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "40,250")]
    pub label_counts: Vec<usize>,
    /// Seeds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub seeds: Vec<u64>,
    /// Label imbalance ratios, comma-separated.
    #[arg(long, alias = "imbalances", value_delimiter = ',', default_value = "1")]
    pub label_imbalances: Vec<f64>,
}

/// `muscle sweep`: runs the grid into --out with a progress display, then prints results.md.
pub fn command(a: &SweepArgs) -> Result<()> {
    let base = a.train.config();
    let dir = base.out.clone().ok_or_else(|| Error::usage("sweep: --out DIR is required"))?;
    let grid = Grid {
        methods: a.methods.clone(),
        labels: a.label_counts.clone(),
        seeds: a.seeds.clone(),
        label_imbalances: a.label_imbalances.clone(),
    };
    let tty = std::io::stdout().is_terminal();
    sweep(&base, &grid, &dir, &mut |cell, p| {
        if p.eval.is_some() || p.step == p.steps {
            print!("{cell}: ");
        }
        show(p, tty)
    })?;
    print!("{}", std::fs::read_to_string(dir.join("results.md")).map_err(|e| Error::io(&dir, e))?);
    Ok(())
}

/// The grid.
#[derive(Clone, Debug)]
pub struct Grid {
    /// Objectives.
    pub methods: Vec<Method>,
    /// Label counts.
    pub labels: Vec<usize>,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Label imbalance ratios (1 = balanced).
    pub label_imbalances: Vec<f64>,
}

/// One cell's folder name.
pub fn cell_name(method: Method, labels: usize, label_imbalance: f64, seed: u64) -> String {
    format!("{method}-n{labels}-r{label_imbalance}-s{seed}")
}

/// Runs every cell of `grid` not finished yet under `dir`, with `base` for all other options
/// (the options that default by method resolved for each cell's method).
pub fn sweep(base: &TrainConfig, grid: &Grid, dir: &Path, progress: &mut dyn FnMut(&str, &Progress)) -> Result<()> {
    if grid.methods.is_empty() || grid.labels.is_empty() || grid.seeds.is_empty() || grid.label_imbalances.is_empty() {
        return Err(Error::usage(
            "sweep: every grid axis (--methods, --label-counts, --seeds, --label-imbalances) needs a value",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for &method in &grid.methods {
        for &labels in &grid.labels {
            for &label_imbalance in &grid.label_imbalances {
                for &seed in &grid.seeds {
                    let name = cell_name(method, labels, label_imbalance, seed);
                    let cell = dir.join(&name);
                    if cell.join("summary.json").exists() {
                        continue;
                    }
                    let mut report = |p: &Progress| progress(&name, p);
                    if cell.join("config.json").exists() {
                        train::resume(&cell, &mut report)?;
                        write_tables(dir)?;
                        continue;
                    }
                    let cfg =
                        TrainConfig { method, labels, label_imbalance, seed, out: Some(cell.clone()), ..base.clone() }
                            .resolved();
                    train::train(&cfg, &mut report)?;
                    write_tables(dir)?;
                }
            }
        }
    }
    write_tables(dir)
}

fn summaries(dir: &Path) -> Result<Vec<(PathBuf, Summary)>> {
    let mut out = Vec::new();
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for cell in entries {
        let p = cell.join("summary.json");
        if let Ok(text) = std::fs::read_to_string(&p) {
            let s: Summary = serde_json::from_str(&text).map_err(|e| Error::format(format!("{}: {e}", p.display())))?;
            out.push((cell, s));
        }
    }
    Ok(out)
}

/// The label imbalance a cell's config.json records (1 when it cannot be read).
fn label_imbalance_of(cell: &Path) -> f64 {
    TrainConfig::load(&cell.join("config.json")).map_or(1.0, |c| c.label_imbalance)
}

/// Mean and sample standard deviation.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = if v.len() > 1 { v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64 } else { 0.0 };
    (m, var.sqrt())
}

/// Rewrites results.csv and results.md from the finished cells.
pub fn write_tables(dir: &Path) -> Result<()> {
    let rows = summaries(dir)?;
    let mut csv =
        String::from("method,dataset,model,labels,imbalance,seed,steps,test_accuracy,test_accuracy_ema,wall_seconds\n");
    let mut groups: BTreeMap<(String, usize, String), Vec<f64>> = BTreeMap::new();
    for (cell, s) in &rows {
        let r = label_imbalance_of(cell);
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{:.4},{:.4},{:.1}\n",
            s.method,
            s.dataset,
            s.model,
            s.labels,
            r,
            s.seed,
            s.steps,
            s.test_accuracy,
            s.test_accuracy_ema,
            s.wall_seconds
        ));
        groups.entry((s.method.clone(), s.labels, format!("{r}"))).or_default().push(100.0 * s.test_accuracy_ema);
    }
    write_atomic(&dir.join("results.csv"), csv.as_bytes())?;
    let mut md =
        String::from("| method | labels | imbalance | EMA test accuracy (%) | seeds |\n|---|---|---|---|---|\n");
    for ((method, labels, r), accs) in &groups {
        let (m, sd) = mean_std(accs);
        md.push_str(&format!("| {method} | {labels} | {r} | {m:.2} +- {sd:.2} | {} |\n", accs.len()));
    }
    write_atomic(&dir.join("results.md"), md.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sweep: SweepArgs,
    }

    #[test]
    fn the_earlier_spelling_imbalances_still_sets_the_label_imbalances() {
        let parse = |flag: &str| Cli::try_parse_from(["muscle", flag, "1,10"]).expect("parse").sweep.label_imbalances;
        assert_eq!(parse("--imbalances"), [1.0, 10.0]);
        assert_eq!(parse("--label-imbalances"), [1.0, 10.0]);
    }
}
