//! `muscle sweep`: a grid of training runs (methods x labels x seeds x label imbalance ratios),
//! one folder per cell. Resumable: a cell with a summary.json is kept and skipped, a cell with only a
//! config.json continues from its checkpoint, so a long grid can run over several sittings.
//! After every cell, results.csv (one row per run) and results.md (mean +- std over seeds) are
//! rewritten from the cells' summary.json files.
//!
//! Several workers can share one folder (machines on a shared file system, e.g. a Slurm array
//! job): a worker claims a cell by creating `<cell>/.claim` atomically (`create_new`) before it
//! runs it, and skips cells another worker has claimed, so no cell runs twice. `--shard i/K`
//! spreads the start: worker i only visits the cells whose index in the grid is i modulo K.
//! A claim is kept when its cell finishes or fails. One left by a worker of this machine that is
//! no longer running (killed, Ctrl-C) is taken over, so a sweep on one machine resumes over
//! several sittings as before; one left on another machine is released by deleting
//! `<cell>/.claim`.

use super::progress::show;
use super::train::TrainOptions;
use crate::error::{Error, Result};
use crate::ssl::Method;
use crate::train::{self, checkpoint::write_atomic, Progress, Summary, TrainConfig};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

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
    /// Run only part i of K of the grid (0 <= i < K): the cells whose index is i modulo K, for
    /// the i-th task of an array job sharing --out with the others. Default: every cell.
    #[arg(long, value_name = "I/K")]
    pub shard: Option<Shard>,
}

/// Part `index` of `count` disjoint parts of a grid: the cells whose index is `index` modulo `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Which part, 0-based.
    pub index: usize,
    /// How many parts.
    pub count: usize,
}

impl Shard {
    /// The whole grid (0/1).
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Does the cell at `index` in grid order belong to this part?
    pub fn contains(self, index: usize) -> bool {
        index % self.count == self.index
    }
}

impl FromStr for Shard {
    type Err = Error;
    fn from_str(s: &str) -> Result<Shard> {
        let parsed = s.split_once('/').and_then(|(i, k)| Some((i.trim().parse().ok()?, k.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Shard { index, count }),
            _ => Err(Error::usage(format!("--shard: '{s}' is not I/K with 0 <= I < K (e.g. 0/4)"))),
        }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
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
    let outcome = sweep(&base, &grid, &dir, a.shard.unwrap_or(Shard::ALL), &mut |cell, p| {
        if p.eval.is_some() || p.step == p.steps {
            print!("{cell}: ");
        }
        show(p, tty)
    })?;
    print!("{}", std::fs::read_to_string(dir.join("results.md")).map_err(|e| Error::io(&dir, e))?);
    for (name, holder) in &outcome.held {
        let claim = dir.join(name).join(CLAIM);
        println!("{name}: skipped, claimed by {holder} (if that worker is gone, delete {})", claim.display());
    }
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

/// The name of the file that claims a cell for one worker.
pub const CLAIM: &str = ".claim";

/// What one worker did in a sweep.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// The cells this worker ran (trained or resumed), by folder name.
    pub ran: Vec<String>,
    /// The unfinished cells of its part that other workers had claimed: folder name and the
    /// claim's line (host, pid, shard, time).
    pub held: Vec<(String, String)>,
}

/// Runs every cell of `shard`'s part of `grid` not finished yet and not claimed by another worker
/// under `dir`, with `base` for all other options (the options that default by method resolved
/// for each cell's method).
pub fn sweep(
    base: &TrainConfig,
    grid: &Grid,
    dir: &Path,
    shard: Shard,
    progress: &mut dyn FnMut(&str, &Progress),
) -> Result<Outcome> {
    if grid.methods.is_empty() || grid.labels.is_empty() || grid.seeds.is_empty() || grid.label_imbalances.is_empty() {
        return Err(Error::usage(
            "sweep: every grid axis (--methods, --label-counts, --seeds, --label-imbalances) needs a value",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut outcome = Outcome::default();
    let mut index = 0;
    for &method in &grid.methods {
        for &labels in &grid.labels {
            for &label_imbalance in &grid.label_imbalances {
                for &seed in &grid.seeds {
                    // The grid's fixed order numbers the cells, the same in every worker.
                    let mine = shard.contains(index);
                    index += 1;
                    let name = cell_name(method, labels, label_imbalance, seed);
                    let cell = dir.join(&name);
                    if !mine || cell.join("summary.json").exists() {
                        continue;
                    }
                    if let Some(holder) = claim(&cell, shard)? {
                        outcome.held.push((name, holder));
                        continue;
                    }
                    let mut report = |p: &Progress| progress(&name, p);
                    // A config.json without a summary is an interrupted run: continue it.
                    if cell.join("config.json").exists() {
                        train::resume(&cell, &mut report)?;
                    } else {
                        let cfg = TrainConfig {
                            method,
                            labels,
                            label_imbalance,
                            seed,
                            out: Some(cell.clone()),
                            ..base.clone()
                        }
                        .resolved();
                        train::train(&cfg, &mut report)?;
                    }
                    outcome.ran.push(name);
                    write_tables(dir)?;
                }
            }
        }
    }
    write_tables(dir)?;
    Ok(outcome)
}

/// Claims `cell` for this process by creating its claim file, which fails when it exists (an
/// atomic test-and-set, also on NFS v3 and later): `None` when this worker now holds the cell,
/// else the holder's line.
fn claim(cell: &Path, shard: Shard) -> Result<Option<String>> {
    std::fs::create_dir_all(cell).map_err(|e| Error::io(cell, e))?;
    claim_once(cell, shard, false)
}

/// One attempt at the claim; `retried` after a stale claim was moved away (then a claim that
/// exists again is another worker's, made in between).
fn claim_once(cell: &Path, shard: Shard, retried: bool) -> Result<Option<String>> {
    let path = cell.join(CLAIM);
    let mut f = match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let line = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = line.trim();
            if !retried && take_over_if_stale(&path, holder) {
                return claim_once(cell, shard, true);
            }
            // An empty file is a claim whose holder has not written its line yet.
            return Ok(Some(if holder.is_empty() { "another worker".to_string() } else { holder.to_string() }));
        }
        Err(e) => return Err(Error::io(&path, e)),
    };
    let line = format!("{} pid {} shard {shard} at {}\n", host_name(), std::process::id(), utc_now());
    let written = f.write_all(line.as_bytes()).and_then(|()| f.sync_all());
    if let Err(e) = written {
        // Nothing ran: leave the cell free for another worker.
        drop(f);
        let _ = std::fs::remove_file(&path);
        return Err(Error::io(&path, e));
    }
    Ok(None)
}

/// Moves away the claim at `path` when its holder (`holder`, the claim's line) is a process of this
/// machine that no longer runs; true when this worker did. The rename is the atomic step: of
/// several workers that find the same stale claim, one renames it and the others get an error,
/// and the winner then claims with `create_new` like anyone else.
fn take_over_if_stale(path: &Path, holder: &str) -> bool {
    let mut words = holder.split_whitespace();
    let (Some(host), Some("pid"), Some(pid)) = (words.next(), words.next(), words.next()) else { return false };
    let Ok(pid) = pid.parse::<u32>() else { return false };
    // Only where /proc lists processes, and never our own claims.
    let proc_fs = Path::new("/proc/self").exists();
    if !proc_fs || host != host_name() || pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
        return false;
    }
    let aside = path.with_file_name(format!("{CLAIM}.stale-{}", std::process::id()));
    if std::fs::rename(path, &aside).is_err() {
        return false;
    }
    let _ = std::fs::remove_file(&aside);
    true
}

/// This machine's name (Linux: the kernel's host name; else $HOSTNAME), for claim files.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string())
}

/// The current time in UTC as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    utc(secs)
}

/// `secs` since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (the proleptic Gregorian calendar).
fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to a civil date (H. Hinnant's algorithm), from eras of 400 years starting in March.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
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

    #[test]
    fn a_shard_is_i_of_k_and_the_shards_split_the_cells() {
        assert_eq!("1/4".parse::<Shard>().expect("1/4"), Shard { index: 1, count: 4 });
        assert_eq!("0/1".parse::<Shard>().expect("0/1"), Shard::ALL);
        for bad in ["3/3", "0/0", "x/2", "1", "-1/2", "1/2/3", ""] {
            let e = bad.parse::<Shard>().expect_err(bad);
            assert_eq!(e.exit_code(), 2, "{bad}");
            assert!(e.message().starts_with("--shard: "), "{bad}: {e}");
        }
        let shards: Vec<Shard> = (0..3).map(|index| Shard { index, count: 3 }).collect();
        for cell in 0..10 {
            assert_eq!(shards.iter().filter(|s| s.contains(cell)).count(), 1, "cell {cell}");
        }
        assert!((0..10).all(|c| Shard::ALL.contains(c)));
    }

    #[test]
    fn claim_times_are_utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(utc(4_102_444_800), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn a_cell_is_claimed_once_and_the_second_claim_names_the_holder() {
        let cell = std::env::temp_dir().join(format!("muscle-claim-{}", std::process::id())).join("c");
        let _ = std::fs::remove_dir_all(&cell);
        assert_eq!(claim(&cell, Shard { index: 1, count: 2 }).expect("claim"), None);
        let holder = claim(&cell, Shard::ALL).expect("claim").expect("held");
        assert!(holder.contains(&format!("pid {} shard 1/2 at ", std::process::id())), "{holder}");
        let _ = std::fs::remove_dir_all(cell.parent().expect("parent"));
    }
}
