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
