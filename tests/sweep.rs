//! The sweep runner: a grid of cells, tables over seeds, and resumption that keeps finished cells.

use muscle::app::sweep::{cell_name, sweep, Grid, Shard};
use muscle::ssl::Method;
use muscle::train::TrainConfig;
use std::collections::BTreeSet;
use std::path::Path;

#[test]
fn a_grid_writes_tables_and_a_rerun_only_redoes_missing_cells() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sweep");
    let _ = std::fs::remove_dir_all(&dir);
    let base = TrainConfig {
        steps: 2,
        eval_every: 2,
        batch: Some(8),
        unlabeled_batch: Some(16),
        width: 4,
        ..Default::default()
    };
    let grid = Grid {
        methods: vec![Method::Supervised, Method::Muscle],
        labels: vec![10, 20],
        seeds: vec![0, 1],
        label_imbalances: vec![1.0],
    };
    let mut cells = 0;
    sweep(&base, &grid, &dir, Shard::ALL, &mut |_, p| cells += (p.step == p.steps) as usize).expect("sweep");
    assert_eq!(cells, 8);
    let csv = std::fs::read_to_string(dir.join("results.csv")).expect("csv");
    assert_eq!(csv.lines().count(), 1 + 8, "{csv}");
    let md = std::fs::read_to_string(dir.join("results.md")).expect("md");
    assert_eq!(md.lines().filter(|l| l.ends_with("| 2 |")).count(), 4, "{md}");

    // A lost cell is redone from its config; the others are kept as they are.
    let lost = dir.join(cell_name(Method::Muscle, 20, 1.0, 1));
    std::fs::remove_file(lost.join("summary.json")).expect("remove");
    std::fs::remove_file(lost.join("resume.safetensors")).expect("remove");
    let kept = dir.join(cell_name(Method::Supervised, 10, 1.0, 0)).join("summary.json");
    let before = std::fs::read(&kept).expect("kept");
    // Its claim, kept from the first sweep, holds it until deleted.
    let outcome = sweep(&base, &grid, &dir, Shard::ALL, &mut |_, _| panic!("a claimed cell ran")).expect("rerun");
    assert!(outcome.ran.is_empty(), "{outcome:?}");
    assert_eq!(outcome.held.len(), 1, "{outcome:?}");
    assert_eq!(outcome.held[0].0, cell_name(Method::Muscle, 20, 1.0, 1));
    assert!(outcome.held[0].1.contains(&format!(" pid {} shard 0/1 at ", std::process::id())), "{outcome:?}");
    std::fs::remove_file(lost.join(".claim")).expect("release");
    let mut reran = Vec::new();
    sweep(&base, &grid, &dir, Shard::ALL, &mut |name, p| {
        if p.step == p.steps {
            reran.push(name.to_string())
        }
    })
    .expect("rerun");
    assert_eq!(reran, [cell_name(Method::Muscle, 20, 1.0, 1)]);
    assert!(lost.join("summary.json").exists());
    assert_eq!(std::fs::read(&kept).expect("kept"), before);
}

/// `muscle sweep` with a fault-free environment, stdout dropped.
fn muscle_sweep(out: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_muscle"));
    c.env_remove("MUSCLE_CUDA_EMU").env_remove("MUSCLE_FAULT").stdout(std::process::Stdio::null());
    c.args(["sweep", "--methods", "supervised", "--label-counts", "10", "--steps", "2", "--eval-every", "2"])
        .args(["--width", "4", "--batch", "8", "--out"])
        .arg(out);
    c
}

#[test]
fn a_full_disk_while_writing_the_tables_is_one_line_naming_the_file_and_a_rerun_writes_them() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sweep-full-disk");
    let _ = std::fs::remove_dir_all(&dir);
    let (a, b) = (dir.join("a"), dir.join("b"));
    let o = muscle_sweep(&a).output().expect("sweep");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read(a.join("results.csv")).expect("csv");
    // The finished cell, without the tables: the sweep's only writes are then the tables.
    let cell = cell_name(Method::Supervised, 10, 1.0, 0);
    std::fs::create_dir_all(b.join(&cell)).expect("dir");
    for f in std::fs::read_dir(a.join(&cell)).expect("cell").filter_map(|e| e.ok()) {
        std::fs::copy(f.path(), b.join(&cell).join(f.file_name())).expect("copy");
    }
    let o = muscle_sweep(&b).env("MUSCLE_FAULT", format!("disk@{}", csv.len() / 2)).output().expect("sweep");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains("results.csv: No space left on device") && !err.contains("panicked"), "{err}");
    let names: Vec<String> = std::fs::read_dir(&b)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert_eq!(names, [cell], "no table and no temporary file is left");

    let o = muscle_sweep(&b).output().expect("rerun");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(b.join("results.csv")).expect("csv"), csv);
    assert_eq!(std::fs::read(b.join("results.md")).expect("md"), std::fs::read(a.join("results.md")).expect("md"));
}

/// The 8 cells of the grid the worker tests share, in grid order.
fn small_grid() -> Vec<String> {
    let mut cells = Vec::new();
    for method in [Method::Supervised, Method::Muscle] {
        for labels in [10, 20] {
            for seed in [0, 1] {
                cells.push(cell_name(method, labels, 1.0, seed));
            }
        }
    }
    cells
}

/// A `muscle sweep` worker on the 8-cell grid into `out`, stdout captured (one line per cell it
/// trains, at its last step), `extra` arguments appended.
fn worker(out: &Path, extra: &[&str]) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_muscle"))
        .env_remove("MUSCLE_CUDA_EMU")
        .env_remove("MUSCLE_FAULT")
        .args(["sweep", "--methods", "supervised,muscle", "--label-counts", "10,20", "--seeds", "0,1"])
        .args(["--steps", "2", "--eval-every", "2", "--width", "4", "--batch", "8", "--unlabeled-batch", "16"])
        .args(["--threads", "1", "--out"])
        .arg(out)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn muscle sweep")
}

/// Waits for a worker; returns its pid and the cells it trained (from its stdout).
fn trained(child: std::process::Child) -> (u32, BTreeSet<String>, String) {
    let pid = child.id();
    let o = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "worker {pid}: {}\n{stdout}", String::from_utf8_lossy(&o.stderr));
    let mut cells = BTreeSet::new();
    for line in stdout.lines().filter(|l| l.contains(": step 2/2 ")) {
        let cell = line.split(": ").next().expect("cell").to_string();
        assert!(cells.insert(cell), "worker {pid} trained a cell twice:\n{stdout}");
    }
    (pid, cells, stdout)
}

/// Asserts that the two workers trained disjoint sets covering the grid, that each finished cell
/// has a summary and a claim naming the worker that trained it, and that the table has every row.
fn assert_each_cell_ran_once(dir: &Path, workers: &[(u32, BTreeSet<String>, String); 2]) {
    let [(pid_a, a, out_a), (pid_b, b, out_b)] = workers;
    assert!(a.is_disjoint(b), "both trained {:?}\n{out_a}\n{out_b}", a.intersection(b).collect::<Vec<_>>());
    let all: BTreeSet<String> = a.union(b).cloned().collect();
    assert_eq!(all, small_grid().into_iter().collect(), "\n{out_a}\n{out_b}");
    for cell in small_grid() {
        assert!(dir.join(&cell).join("summary.json").exists(), "{cell}");
        let claim = std::fs::read_to_string(dir.join(&cell).join(".claim")).expect("claim");
        assert_eq!(claim.lines().count(), 1, "{cell}: {claim}");
        let pid = if a.contains(&cell) { pid_a } else { pid_b };
        assert!(claim.contains(&format!(" pid {pid} shard ")), "{cell} trained by {pid}, claimed by {claim}");
    }
    let csv = std::fs::read_to_string(dir.join("results.csv")).expect("csv");
    // Only the slower worker's last table is sure to hold every row.
    assert_eq!(csv.lines().count(), 1 + 8, "{csv}");
    let left: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

#[test]
fn two_shards_started_together_split_the_grid_and_run_every_cell_once() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sweep-shards");
    let _ = std::fs::remove_dir_all(&dir);
    let (a, b) = (worker(&dir, &["--shard", "0/2"]), worker(&dir, &["--shard", "1/2"]));
    let workers = [trained(a), trained(b)];
    assert_each_cell_ran_once(&dir, &workers);
    // Shard i has the cells at indices i, i + 2, ... of the grid's order.
    for (i, (_, cells, _)) in workers.iter().enumerate() {
        let want: BTreeSet<String> = small_grid().into_iter().skip(i).step_by(2).collect();
        assert_eq!(cells, &want, "shard {i}/2");
        for cell in cells {
            let claim = std::fs::read_to_string(dir.join(cell).join(".claim")).expect("claim");
            assert!(claim.contains(&format!(" shard {i}/2 at ")), "{cell}: {claim}");
        }
    }
}

#[test]
fn two_workers_without_shards_on_one_folder_run_every_cell_once() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sweep-workers");
    let _ = std::fs::remove_dir_all(&dir);
    let (a, b) = (worker(&dir, &[]), worker(&dir, &[]));
    let workers = [trained(a), trained(b)];
    assert_each_cell_ran_once(&dir, &workers);
    // A third worker finds every cell finished: it trains nothing and reports no claim.
    let (_, cells, stdout) = trained(worker(&dir, &[]));
    assert!(cells.is_empty() && !stdout.contains("claimed by"), "{stdout}");
}

#[test]
fn a_cell_claimed_by_a_worker_that_is_gone_is_skipped_naming_it_until_the_claim_is_deleted() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sweep-stale-claim");
    let _ = std::fs::remove_dir_all(&dir);
    let cell = dir.join(cell_name(Method::Supervised, 10, 1.0, 0));
    std::fs::create_dir_all(&cell).expect("dir");
    std::fs::write(cell.join(".claim"), "node7 pid 4242 shard 0/1 at 2024-01-01T00:00:00Z\n").expect("claim");
    let (_, cells, stdout) = trained(worker(&dir, &["--shard", "0/8"]));
    assert!(cells.is_empty(), "{stdout}");
    assert!(stdout.contains("claimed by node7 pid 4242") && stdout.contains(".claim"), "{stdout}");
    std::fs::remove_file(cell.join(".claim")).expect("release");
    let (_, cells, stdout) = trained(worker(&dir, &["--shard", "0/8"]));
    assert_eq!(cells, [cell_name(Method::Supervised, 10, 1.0, 0)].into_iter().collect(), "{stdout}");
}

/// A claim left on this machine by a process that has exited (a sweep killed or stopped with
/// Ctrl-C) is taken over by the next run, so one machine's sweep resumes without manual steps.
#[test]
fn a_claim_of_this_machine_whose_process_is_gone_is_taken_over() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sweep-dead-claim");
    let _ = std::fs::remove_dir_all(&dir);
    let cell = dir.join(cell_name(Method::Supervised, 10, 1.0, 0));
    std::fs::create_dir_all(&cell).expect("dir");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    let mut gone = std::process::Command::new("true").spawn().expect("spawn");
    let pid = gone.id();
    gone.wait().expect("wait");
    let line = format!("{} pid {pid} shard 0/1 at 2024-01-01T00:00:00Z\n", host.trim());
    std::fs::write(cell.join(".claim"), line).expect("claim");
    let (me, cells, stdout) = trained(worker(&dir, &["--shard", "0/8"]));
    assert_eq!(cells, [cell_name(Method::Supervised, 10, 1.0, 0)].into_iter().collect(), "{stdout}");
    let claim = std::fs::read_to_string(cell.join(".claim")).expect("claim");
    assert!(claim.contains(&format!(" pid {me} ")), "{claim}");
    assert!(!stdout.contains("claimed by"), "{stdout}");
}

#[test]
fn a_bad_shard_exits_2_with_one_line_naming_it() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sweep-bad-shard");
    for bad in ["3/3", "x/2", "0/0", "1", "-1/2"] {
        // `--shard=VALUE`, so that clap takes "-1/2" as the value rather than a flag.
        let o = muscle_sweep(&dir).arg(format!("--shard={bad}")).output().expect("sweep");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{bad}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{bad}: not one line: {err}");
        assert!(err.contains("--shard") && err.contains(bad) && !err.contains("panicked"), "{bad}: {err}");
    }
    assert!(!dir.exists(), "nothing is written");
}
