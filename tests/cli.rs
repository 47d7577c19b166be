//! The `muscle` binary as users' scripts see it: files, exit codes, one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the binary as a user on this machine would: without the emulated device that the
/// emulated CI suite switches on (MUSCLE_CUDA_EMU=1), which would turn the `--device cuda`
/// errors tested here into training runs. (Every spawn of the binary in tests/ does the same.)
fn muscle(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_muscle")).env_remove("MUSCLE_CUDA_EMU").args(args).output().expect("run muscle")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh, empty folder under the target dir.
fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Asserts exit code `code`, a one-line error naming `needle`, no panic, no backtrace.
fn expect_error(args: &[&str], code: i32, needle: &str) {
    let o = muscle(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "{args:?}: stderr {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: not one line: {err}");
    assert!(err.contains(needle), "{args:?}: '{err}' does not name {needle}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
}

#[test]
fn bad_arguments_exit_2_and_name_the_argument() {
    expect_error(&["train", "--method", "nope"], 2, "--method");
    expect_error(&["train", "--model", "resnet"], 2, "--model");
    expect_error(&["train", "--dataset", "imagenet"], 2, "--dataset");
    expect_error(&["train", "--steps", "0"], 2, "--steps");
    expect_error(&["train", "--batch", "0"], 2, "--batch");
    expect_error(&["train", "--lr=-1"], 2, "--lr");
    expect_error(&["train", "--lr", "fast"], 2, "--lr");
    expect_error(&["train", "--no-such-flag"], 2, "--no-such-flag");
    expect_error(&["frobnicate"], 2, "frobnicate");
    expect_error(&["train", "--labels", "7"], 2, "7");
    expect_error(&["train", "--labels", "20000"], 2, "20000");
    expect_error(&["train", "--threads", "0"], 2, "--threads");
    expect_error(&["train", "--device", "tpu"], 2, "--device");
    expect_error(&["train", "--dataset", "cifar10"], 2, "--data");
}

/// `--precision bf16`: refused with a one-line usage error where the CPU (or `MUSCLE_SIMD`)
/// lacks AVX512-BF16 and on a GPU; where it has it, a run whose 3x3 layers compute bf16 products
/// is reproducible to the byte, records its precision, and is not the f32 run.
#[test]
fn bf16_precision_is_refused_without_avx512_bf16_and_reproducible_with_it() {
    expect_error(&["train", "--precision", "f16"], 2, "--precision");
    let o = Command::new(env!("CARGO_BIN_EXE_muscle"))
        .env_remove("MUSCLE_CUDA_EMU")
        .env("MUSCLE_SIMD", "avx2")
        .args(["train", "--precision", "bf16", "--steps", "1"])
        .output()
        .expect("run muscle");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--precision bf16") && err.contains("AVX512-BF16") && !err.contains("panicked"), "{err}");
    expect_error(&["train", "--precision", "bf16", "--device", "cuda", "--steps", "1"], 2, "--precision bf16");
    expect_error(&["bench", "--op", "conv", "--precision", "bf16", "--device", "cuda"], 2, "--precision bf16");
    expect_error(&["bench", "--op", "mi", "--precision", "bf16"], 2, "--op mi");
    // `muscle info` says whether this CPU takes it (and not when MUSCLE_SIMD lowers the level).
    let info = |simd: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_muscle"));
        c.env_remove("MUSCLE_CUDA_EMU").arg("info");
        if let Some(level) = simd {
            c.env("MUSCLE_SIMD", level);
        }
        let o = c.output().expect("run muscle info");
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(info(Some("avx2")).contains("--precision bf16: not here"), "{}", info(Some("avx2")));
    assert_eq!(info(None).contains("--precision bf16: available"), muscle::ops::conv::bf16_available());
    if !muscle::ops::conv::bf16_available() {
        eprintln!("skipped (the bf16 runs): this CPU has no AVX512-BF16");
        return;
    }
    let d = scratch("cli-bf16");
    let run = |name: &str, precision: &str| {
        let out = d.join(name);
        // Width 16: 16 channels and more, so every 3x3 layer but the first is Winograd's.
        let args = ["train", "--steps", "3", "--batch", "16", "--unlabeled-batch", "32", "--width", "16"];
        let o = muscle(&[&args[..], &["--precision", precision, "--out", out.to_str().expect("utf8")]].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("config")).expect("json");
        assert_eq!(config["precision"], precision);
        std::fs::read(out.join("checkpoint.safetensors")).expect("checkpoint")
    };
    let (a, b, f32_run) = (run("a", "bf16"), run("b", "bf16"), run("f32", "f32"));
    assert!(a == b, "two bf16 runs differ");
    assert!(a != f32_run, "the bf16 run is the f32 run");
}

#[test]
fn missing_or_corrupt_files_exit_1_and_name_the_file() {
    let d = scratch("cli-corrupt");
    expect_error(&["train", "--data", "/nonexistent/fashion"], 1, "/nonexistent/fashion");
    // A truncated IDX file: copy the embedded set's labels and cut the images file.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-10k");
    for f in ["train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"] {
        std::fs::copy(src.join(f), d.join(f)).expect("copy");
    }
    let img = std::fs::read(src.join("train-images-idx3-ubyte.gz")).expect("read");
    std::fs::write(d.join("train-images-idx3-ubyte.gz"), &img[..img.len() / 2]).expect("write");
    expect_error(&["train", "--data", d.to_str().expect("utf8")], 1, "train-images-idx3-ubyte");
    expect_error(&["eval", "--checkpoint", "/nonexistent/ck.safetensors"], 1, "/nonexistent/ck.safetensors");
    let junk = d.join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint at all").expect("write");
    expect_error(&["eval", "--checkpoint", junk.to_str().expect("utf8")], 1, "junk.safetensors");
    expect_error(&["train", "--device", "cuda", "--steps", "1"], 1, "cuda");
}

#[test]
fn split_seed_fixes_the_labeled_set_while_seed_moves_the_rest() {
    let d = scratch("cli-split-seed");
    let data = muscle::data::embedded().expect("embedded set");
    let run = |name: &str, seed: &str, split_seed: Option<&str>| {
        let out = d.join(name);
        let mut args = vec!["train", "--steps", "1", "--batch", "8", "--unlabeled-batch", "16", "--width", "8"];
        args.extend(["--seed", seed, "--out", out.to_str().expect("utf8")]);
        if let Some(s) = split_seed {
            args.extend(["--split-seed", s]);
        }
        let o = muscle(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let read = |f: &str| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(out.join(f)).expect(f)).expect("json")
        };
        let labeled: Vec<usize> = read("split.json")["labeled"]
            .as_array()
            .expect("labeled")
            .iter()
            .map(|v| v.as_u64().expect("i") as usize)
            .collect();
        (labeled, read("config.json")["split_seed"].clone(), read("summary.json")["test_accuracy"].clone())
    };
    let (fixed, recorded, acc_fixed) = run("fixed", "3", Some("5"));
    assert_eq!(fixed, muscle::data::split(&data.train, 40, 0, 1.0, 5).expect("split").labeled);
    assert_ne!(fixed, muscle::data::split(&data.train, 40, 0, 1.0, 3).expect("split").labeled);
    assert_eq!(recorded, 5);
    let (default, recorded, acc_default) = run("default", "5", None);
    assert_eq!(default, fixed, "without --split-seed the split follows --seed");
    assert!(recorded.is_null());
    // Same labeled set, different seed: other initial weights and batches, so another model.
    assert_ne!(acc_fixed, acc_default);
}

#[test]
fn a_short_run_writes_its_files_and_eval_reproduces_the_ema_accuracy() {
    let d = scratch("cli-run");
    let out = d.join("run");
    let o = muscle(&[
        "train",
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--batch",
        "16",
        "--unlabeled-batch",
        "32",
        "--width",
        "8",
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in
        ["config.json", "split.json", "metrics.jsonl", "checkpoint.safetensors", "resume.safetensors", "summary.json"]
    {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let split: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("split.json")).expect("split")).expect("json");
    let labeled: Vec<usize> = split["labeled"]
        .as_array()
        .expect("labeled indices")
        .iter()
        .map(|v| v.as_u64().expect("index") as usize)
        .collect();
    let data = muscle::data::embedded().expect("embedded set");
    let expected = muscle::data::split(&data.train, 40, 0, 1.0, 0).expect("split");
    assert_eq!(labeled, expected.labeled);
    assert_eq!(split["val"].as_array().map(Vec::len), Some(0));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("json");
    for key in [
        "method",
        "dataset",
        "model",
        "labels",
        "steps",
        "seed",
        "device",
        "test_accuracy",
        "test_accuracy_ema",
        "test_accuracy_ema_median_last20",
        "per_class_accuracy",
        "confusion_matrix",
        "wall_seconds",
        "train_images_per_second",
    ] {
        assert!(summary.get(key).is_some(), "summary.json lacks {key}");
    }
    let ema = summary["test_accuracy_ema"].as_f64().expect("number");
    assert!((0.0..=1.0).contains(&ema));
    // Two evaluations: the median of the last 20 is their mean.
    let accs: Vec<f64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("json")["test_accuracy_ema"].as_f64().expect("acc")
        })
        .collect();
    let median = summary["test_accuracy_ema_median_last20"].as_f64().expect("number");
    assert!((median - (accs[0] + accs[1]) / 2.0).abs() < 1e-12, "{median} vs {accs:?}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).expect("config")).expect("json");
    assert_eq!(config["steps"], 6);
    assert_eq!(config["method"], "muscle");
    // Built from a git checkout (as in CI): the commit, not "unknown".
    let head =
        Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(env!("CARGO_MANIFEST_DIR")).output();
    if let Ok(head) = head.as_ref().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()) {
        if !head.is_empty() {
            let commit = config["git_commit"].as_str().expect("git_commit");
            assert!(commit.starts_with(&head), "git_commit {commit} is not HEAD {head}");
        }
    }

    // The checkpoint alone rebuilds the model: the same EMA accuracy, from another directory.
    let ck = out.join("checkpoint.safetensors");
    let o = Command::new(env!("CARGO_BIN_EXE_muscle"))
        .env_remove("MUSCLE_CUDA_EMU")
        .args(["eval", "--checkpoint", ck.to_str().expect("utf8")])
        .current_dir(std::env::temp_dir())
        .output()
        .expect("eval");
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("eval json");
    assert_eq!(r["test_accuracy"].as_f64(), Some(ema), "eval {r} vs summary {ema}");

    // The run's curve as a PNG; bad plot requests are one-line errors.
    let png = d.join("curve.png");
    let o = muscle(&["plot", out.to_str().expect("utf8"), "--out", png.to_str().expect("utf8")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&png).expect("png");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    expect_error(&["plot", "--out", png.to_str().expect("utf8")], 2, "--sweep");
    expect_error(&["plot", "/nonexistent/run", "--out", png.to_str().expect("utf8")], 1, "/nonexistent/run");
}

/// `muscle bench --json` counts a step's FLOPs exactly (the convnet's five convolutions and its
/// dense head at 2 + 2 x 2 images, forward and backward, the first layer without an input
/// gradient) and reports the steps' memory.
#[test]
fn bench_reports_the_direct_flop_count_and_memory_of_a_step() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_muscle"))
        .env_remove("MUSCLE_CUDA_EMU")
        .args(["bench", "--json", "--steps", "1", "--warmup", "0", "--batch", "2", "--unlabeled-batch", "2"])
        .args(["--threads", "2"])
        .output()
        .expect("run muscle bench");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    let r: serde_json::Value = serde_json::from_str(text.trim().lines().last().expect("a line")).expect("json");
    let n = 6u64; // images per step
                  // (c_in, c_out, side) per 3x3 convolution; x3 for forward, dW and dX, x2 for the first.
    let convs = [(1u64, 32u64, 28u64), (32, 32, 28), (32, 64, 14), (64, 64, 14), (64, 128, 7)];
    let mut flops: u64 = convs
        .iter()
        .enumerate()
        .map(|(i, &(ci, co, s))| 2 * n * co * s * s * ci * 9 * if i == 0 { 2 } else { 3 })
        .sum();
    flops += 2 * n * 128 * 10 * 3; // the dense head
    let got = r["gflop_per_step"].as_f64().expect("gflop_per_step");
    assert!((got * 1e9 - flops as f64).abs() < 1.0, "counted {got} GFLOP, expected {}", flops as f64 / 1e9);
    let built = r["resident_after_build_bytes"].as_f64().expect("built");
    let peak = r["peak_resident_bytes"].as_f64().expect("peak");
    assert!(built > 1e6 && peak >= built, "built {built}, peak {peak}");
}

#[test]
fn augment_draws_a_grid_of_weak_and_strong_views() {
    let d = scratch("cli-augment");
    let png = d.join("grid.png");
    let p = png.to_str().expect("utf8");
    let o = muscle(&["augment", "--out", p, "--images", "3", "--views", "2", "--seed", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // 28x28 cells upscaled 3x (96 / 28), 1 + 2 + 2 columns, 2 px separators.
    let img = image::open(&png).expect("a PNG").to_rgb8();
    let (cell, sep) = (84usize, 2usize);
    assert_eq!((img.width(), img.height()), ((5 * (cell + sep) + sep) as u32, (3 * (cell + sep) + sep) as u32));
    let cell_at = |row: usize, col: usize| -> Vec<u8> {
        let (x0, y0) = (sep + col * (cell + sep), sep + row * (cell + sep));
        (y0..y0 + cell)
            .flat_map(|y| (x0..x0 + cell).map(move |x| (x, y)))
            .map(|(x, y)| img.get_pixel(x as u32, y as u32)[0])
            .collect()
    };
    for row in 0..3 {
        let weak = [cell_at(row, 1), cell_at(row, 2)];
        for col in [3, 4] {
            let strong = cell_at(row, col);
            assert!(weak.iter().all(|w| *w != strong), "row {row}: strong column {col} equals a weak one");
            // Not the white background: the strong view was drawn.
            assert!(strong.iter().any(|&v| v != 255), "row {row} column {col} is blank");
        }
    }
    expect_error(&["augment", "--out", p, "--images", "0"], 2, "--images");
    expect_error(&["augment", "--out", p, "--views", "0"], 2, "--views");
    expect_error(&["augment", "--out", p, "--dataset", "imagenet"], 2, "--dataset");
    expect_error(&["augment", "--out", "/nonexistent/dir/grid.png"], 1, "/nonexistent/dir");
}
