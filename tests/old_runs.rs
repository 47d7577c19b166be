//! Run folders written by earlier versions of `muscle` still resume, to the same bytes.
//!
//! tests/fixtures/run-6a24b35 was written by the binary of commit 6a24b35 (whose config.json had
//! its own hand-written reader) and stopped at step 5 of 20: the binary was stopped with SIGSTOP
//! as soon as checkpoint.safetensors appeared, the folder copied, the process killed. `ARGS` are
//! the options it ran with; they exercise the renamed options (`--constant-lr`, `--w-u`,
//! `--label-imbalance`), whose config.json keys must keep their meaning.

use super::reliability::{metrics_without_timing, scratch};
use muscle::train::TrainConfig;
use std::path::{Path, PathBuf};
use std::process::Command;

const ARGS: &[&str] = &[
    "train",
    "--method",
    "mixmatch-muscle",
    "--steps",
    "20",
    "--eval-every",
    "5",
    "--batch",
    "16",
    "--unlabeled-batch",
    "32",
    "--width",
    "8",
    "--threads",
    "2",
    "--constant-lr",
    "--w-u",
    "50",
    "--label-imbalance",
    "2",
];

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/run-6a24b35")
}

fn muscle(args: &[&str], extra: &[&Path]) {
    let o = Command::new(env!("CARGO_BIN_EXE_muscle"))
        .env_remove("MUSCLE_CUDA_EMU")
        .args(args)
        .args(extra)
        .output()
        .expect("run muscle");
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_run_folder_of_an_earlier_version_resumes_to_the_bytes_of_an_uninterrupted_run() {
    let d = scratch("old-run");
    let resumed = d.join("resumed");
    std::fs::create_dir_all(&resumed).expect("dir");
    for f in std::fs::read_dir(fixture()).expect("fixture") {
        let f = f.expect("entry").path();
        std::fs::copy(&f, resumed.join(f.file_name().expect("name"))).expect("copy");
    }
    muscle(&["train", "--resume"], &[&resumed]);
    let fresh = d.join("fresh");
    muscle(ARGS, &[Path::new("--out"), &fresh]);

    // The old config.json reads as the options it was written with (options added since, such
    // as --nesterov, take their defaults when it is resolved).
    let old = TrainConfig::load(&fixture().join("config.json")).expect("old config");
    let new = TrainConfig::load(&fresh.join("config.json")).expect("new config");
    assert_eq!(TrainConfig { out: None, ..old.resolved() }, TrainConfig { out: None, ..new });

    let steps: Vec<u64> = metrics_without_timing(&resumed).iter().map(|v| v["step"].as_u64().expect("step")).collect();
    assert_eq!(steps, [5, 10, 15, 20]);
    // The bits depend on the CPU family (README, "Reproducibility"): where this CPU computes the
    // fixture's first evaluation exactly, the resumed run must end on the uninterrupted run's bytes.
    let recorded = metrics_without_timing(&fixture());
    if metrics_without_timing(&fresh)[..recorded.len()] != recorded[..] {
        println!("skipped the byte comparison: this CPU rounds differently from the one that wrote the fixture");
        return;
    }
    assert_eq!(metrics_without_timing(&resumed), metrics_without_timing(&fresh));
    let read = |dir: &Path| std::fs::read(dir.join("checkpoint.safetensors")).expect("checkpoint");
    assert!(read(&resumed) == read(&fresh), "the resumed run's final checkpoint differs from the uninterrupted run's");
}
