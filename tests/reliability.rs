//! Crash safety, resume and determinism of `muscle train`.

use muscle::rng::Rng;
use muscle::train::checkpoint::Checkpoint;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SMALL: &[&str] = &[
    "train",
    "--steps",
    "16",
    "--eval-every",
    "2",
    "--batch",
    "16",
    "--unlabeled-batch",
    "32",
    "--width",
    "8",
    "--threads",
    "2",
];

/// A fresh, empty folder under the target dir.
pub(crate) fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn muscle() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_muscle"));
    c.env_remove("MUSCLE_CUDA_EMU").env_remove("MUSCLE_FAULT").stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn run_to_end(args: &[&str], out: &Path) {
    let o = muscle().args(args).arg("--out").arg(out).output().expect("run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// metrics.jsonl without the timing field, which legitimately differs between runs.
pub(crate) fn metrics_without_timing(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("json line");
            v.as_object_mut().expect("object").remove("images_per_second");
            v
        })
        .collect()
}

#[test]
fn same_seed_and_threads_give_identical_metrics_and_checkpoints() {
    let d = scratch("determinism");
    let (a, b) = (d.join("a"), d.join("b"));
    let args =
        ["train", "--steps", "6", "--eval-every", "2", "--batch", "16", "--unlabeled-batch", "32", "--width", "8"];
    run_to_end(&args, &a);
    run_to_end(&args, &b);
    assert_eq!(metrics_without_timing(&a), metrics_without_timing(&b));
    for f in ["checkpoint.safetensors", "resume.safetensors"] {
        assert!(std::fs::read(a.join(f)).expect("a") == std::fs::read(b.join(f)).expect("b"), "{f} differs");
    }
}

#[test]
fn killed_runs_always_leave_a_loadable_checkpoint_and_resume_to_identical_bytes() {
    let d = scratch("sigkill");
    let reference = d.join("reference");
    let t = Instant::now();
    run_to_end(SMALL, &reference);
    // Kill moments are drawn across the run's own duration, so some attempts get past start-up
    // and checkpoint while others die before or during a write, on a fast or a loaded machine.
    let run_ms = t.elapsed().as_millis() as u32;
    let want = std::fs::read(reference.join("checkpoint.safetensors")).expect("reference checkpoint");

    let out = d.join("killed");
    let mut rng = Rng::new(20261128, 0);
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_millis(120 * run_ms as u64).max(Duration::from_secs(300));
    loop {
        assert!(Instant::now() < deadline, "the kill loop did not finish in time");
        let mut cmd = muscle();
        if out.join("config.json").exists() {
            cmd.arg("train").arg("--resume").arg(&out);
        } else {
            cmd.args(SMALL).arg("--out").arg(&out);
        }
        let mut child = cmd.spawn().expect("spawn");
        let wait_ms = (run_ms / 10 + rng.below(run_ms)) as u64;
        let t = Instant::now();
        let mut finished = None;
        while t.elapsed() < Duration::from_millis(wait_ms) {
            if let Some(status) = child.try_wait().expect("try_wait") {
                finished = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match finished {
            Some(status) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                if status.success() {
                    if kills >= 20 {
                        break;
                    }
                    // Finished before 20 kills: start the whole run again.
                    std::fs::remove_dir_all(&out).expect("clear");
                    continue;
                }
                panic!("run failed without being killed: {err}");
            }
            None => {
                child.kill().expect("SIGKILL");
                child.wait().expect("reap");
                kills += 1;
            }
        }
        // Whatever exists after a kill is complete and loadable.
        for f in ["checkpoint.safetensors", "resume.safetensors"] {
            let p = out.join(f);
            if p.exists() {
                Checkpoint::load(&p).unwrap_or_else(|e| panic!("after kill {kills}: {e}"));
            }
        }
        if out.join("config.json").exists() {
            let text = std::fs::read_to_string(out.join("config.json")).expect("config");
            serde_json::from_str::<serde_json::Value>(&text).expect("config.json is complete JSON");
        }
    }
    assert!(kills >= 20);
    let got = std::fs::read(out.join("checkpoint.safetensors")).expect("final checkpoint");
    assert!(got == want, "the resumed run's final checkpoint differs from the uninterrupted run's");
    // metrics.jsonl was cut back at each resume: one line per evaluation, in order.
    let steps: Vec<u64> = metrics_without_timing(&out).iter().map(|v| v["step"].as_u64().expect("step")).collect();
    assert_eq!(steps, (1..=8).map(|i| 2 * i).collect::<Vec<u64>>());
    println!("{kills} kills survived");
}

#[test]
fn a_diverging_run_stops_with_the_step_and_term_and_keeps_its_last_good_checkpoint() {
    let d = scratch("diverge");
    let o = muscle()
        .args(["train", "--lr", "1e6", "--steps", "40", "--eval-every", "2", "--width", "4", "--batch", "16"])
        .args(["--unlabeled-batch", "32"])
        .arg("--out")
        .arg(&d)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("step ") && (err.contains("loss is") || err.contains("gradient of")), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let failed_at: u64 = err
        .split("step ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .expect("step in message");
    let ck = Checkpoint::load(&d.join("checkpoint.safetensors")).expect("last good checkpoint");
    let saved: u64 = ck.metadata["step"].parse().expect("step");
    assert!(saved <= failed_at, "checkpoint at {saved}, failure at {failed_at}");
    assert!(!d.join("summary.json").exists());
}

#[test]
fn a_run_killed_after_its_final_checkpoint_resumes_to_its_summary() {
    let d = scratch("final-checkpoint");
    let args =
        ["train", "--steps", "4", "--eval-every", "2", "--batch", "16", "--unlabeled-batch", "32", "--width", "8"];
    run_to_end(&args, &d);
    let summary = std::fs::read_to_string(d.join("summary.json")).expect("summary");
    std::fs::remove_file(d.join("summary.json")).expect("remove");
    let o = muscle().arg("train").arg("--resume").arg(&d).output().expect("resume");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let field =
        |text: &str| serde_json::from_str::<serde_json::Value>(text).expect("json")["test_accuracy_ema"].clone();
    assert_eq!(field(&std::fs::read_to_string(d.join("summary.json")).expect("summary again")), field(&summary));
    assert_eq!(metrics_without_timing(&d).len(), 2);
}

/// A tiny run with checkpoints at steps 2, 4 and 6 (about half a second).
const TINY: &[&str] =
    &["train", "--width", "4", "--batch", "8", "--unlabeled-batch", "16", "--steps", "6", "--eval-every", "2"];

/// The step a checkpoint file of `dir` holds.
fn step_of(dir: &Path, file: &str) -> String {
    let ck = Checkpoint::load(&dir.join(file)).unwrap_or_else(|e| panic!("{e}"));
    ck.metadata.get("step").unwrap_or_else(|| panic!("{file} has no step")).clone()
}

/// Runs TINY into `out` with `MUSCLE_FAULT=fault` and checks that it stops with one line naming
/// `needle`, exit 1, no temporary file, and its checkpoints at `steps` (resume, checkpoint); then
/// resumes it without the fault and checks that it ends on the bytes and metrics of `reference`.
fn stop_and_resume(reference: &Path, out: &Path, fault: &str, needle: &str, steps: (&str, &str)) {
    let o = muscle().env("MUSCLE_FAULT", fault).args(TINY).arg("--out").arg(out).output().expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{fault}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{fault}: not one line: {err}");
    assert!(err.contains(needle) && !err.contains("panicked"), "{fault}: '{err}' does not name {needle}");
    let leftovers: Vec<_> = std::fs::read_dir(out)
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{fault}: {leftovers:?}");
    assert_eq!((step_of(out, "resume.safetensors").as_str(), step_of(out, "checkpoint.safetensors").as_str()), steps);
    assert!(!out.join("summary.json").exists(), "{fault}");

    let o = muscle().arg("train").arg("--resume").arg(out).output().expect("resume");
    assert!(o.status.success(), "{fault}: resume: {}", String::from_utf8_lossy(&o.stderr));
    for f in ["checkpoint.safetensors", "resume.safetensors"] {
        let (got, want) = (std::fs::read(out.join(f)).expect("got"), std::fs::read(reference.join(f)).expect("want"));
        assert!(got == want, "{fault}: the resumed run's {f} differs from the uninterrupted run's");
    }
    assert_eq!(metrics_without_timing(out), metrics_without_timing(reference), "{fault}");
    assert!(out.join("summary.json").exists(), "{fault}");
}

#[test]
fn a_run_stopped_by_a_full_disk_resumes_to_the_bytes_of_an_uninterrupted_run() {
    // One-letter folders: config.json holds the --out path, so every run writes as many bytes.
    let d = scratch("full-disk");
    let a = d.join("a");
    run_to_end(TINY, &a);
    let size = |f: &str| std::fs::metadata(a.join(f)).expect("size").len();
    let lines: Vec<u64> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| l.len() as u64 + 1)
        .collect();
    let (resume, checkpoint) = (size("resume.safetensors"), size("checkpoint.safetensors"));
    // The bytes written by the end of the step-2 checkpoint; then the step-4 evaluation writes its
    // metrics line, resume.safetensors and checkpoint.safetensors, in that order. The lines'
    // lengths vary by a few bytes (images_per_second), far less than half of any of the three.
    let step2 = size("config.json") + size("split.json") + lines[0] + resume + checkpoint;
    let cases = [
        ("m", step2 + lines[1] / 2, "metrics.jsonl", ("2", "2")),
        ("r", step2 + lines[1] + resume / 2, "resume.safetensors", ("2", "2")),
        ("c", step2 + lines[1] + resume + checkpoint / 2, "checkpoint.safetensors", ("4", "2")),
    ];
    for (name, budget, file, steps) in cases {
        let needle = format!("{}: No space left on device", d.join(name).join(file).display());
        stop_and_resume(&a, &d.join(name), &format!("disk@{budget}"), &needle, steps);
    }
}

#[test]
fn a_run_stopped_by_a_failed_allocation_resumes_to_the_bytes_of_an_uninterrupted_run() {
    let d = scratch("failed-allocation");
    let a = d.join("a");
    run_to_end(TINY, &a);
    let needle = "--batch: a batch of 8 images of 1x28x28 for step 3: could not be allocated";
    stop_and_resume(&a, &d.join("b"), "alloc@3", needle, ("2", "2"));
}

#[test]
fn a_fixmatch_run_killed_mid_way_resumes_to_the_bytes_of_an_uninterrupted_run() {
    // FixMatch + MUSCLE (strong views, pseudo-labels, SGD + Nesterov, its cosine) at a threshold
    // this small model's near-uniform predictions straddle, so the pseudo-label sums restart at each checkpoint too.
    let args = [
        "train",
        "--method",
        "fixmatch-muscle",
        "--tau",
        "0.11",
        "--width",
        "4",
        "--batch",
        "8",
        "--unlabeled-batch",
        "24",
        "--steps",
        "10",
        "--eval-every",
        "2",
    ];
    let d = scratch("fixmatch-kill");
    let (reference, out) = (d.join("a"), d.join("b"));
    run_to_end(&args, &reference);
    let metrics = metrics_without_timing(&reference);
    assert!(metrics.iter().all(|m| m["mask_rate"].is_number()), "{metrics:?}");
    assert!(metrics.iter().any(|m| m["mask_rate"].as_f64() > Some(0.0)), "no pseudo-label was kept: {metrics:?}");

    // SIGKILL once the step-4 checkpoint is there (before the run's end at 10).
    let mut child = muscle().args(args).arg("--out").arg(&out).spawn().expect("spawn");
    let t = Instant::now();
    let killed_at = loop {
        assert!(t.elapsed() < Duration::from_secs(120), "no checkpoint at step 4 within two minutes");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("the run ended ({status}) before it was killed");
        }
        let ck = out.join("checkpoint.safetensors");
        if ck.exists() && Checkpoint::load(&ck).is_ok_and(|c| c.metadata.get("step").is_some_and(|s| s != "2")) {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
            break step_of(&out, "checkpoint.safetensors");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(!out.join("summary.json").exists(), "killed at step {killed_at} but the run had finished");
    let o = muscle().arg("train").arg("--resume").arg(&out).output().expect("resume");
    assert!(o.status.success(), "resume: {}", String::from_utf8_lossy(&o.stderr));
    for f in ["checkpoint.safetensors", "resume.safetensors"] {
        let (got, want) = (std::fs::read(out.join(f)).expect("got"), std::fs::read(reference.join(f)).expect("want"));
        assert!(got == want, "killed at step {killed_at}: the resumed run's {f} differs from the uninterrupted run's");
    }
    assert_eq!(metrics_without_timing(&out), metrics, "killed at step {killed_at}");
}
