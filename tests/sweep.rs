//! The sweep runner: a grid of cells, tables over seeds, and resumption that keeps finished cells.

use muscle::app::sweep::{cell_name, sweep, Grid};
use muscle::ssl::Method;
use muscle::train::TrainConfig;
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
    sweep(&base, &grid, &dir, &mut |_, p| cells += (p.step == p.steps) as usize).expect("sweep");
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
    let mut reran = Vec::new();
    sweep(&base, &grid, &dir, &mut |name, p| {
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
