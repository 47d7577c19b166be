//! The table of bad inputs (the reliability issue): each gives a one-line error naming the
//! argument or file, the right exit code, no panic, and leaves nothing half-written.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A row of the table: what, an environment variable to set (MUSCLE_FAULT, MUSCLE_MEMORY_LIMIT),
/// arguments, exit code, what the line must name.
type Row<'a> = (&'a str, Option<(&'a str, String)>, Vec<String>, i32, String);

fn scratch(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A copy of the embedded IDX set in `dir` with `file` replaced by `bytes`.
fn idx_set_with(dir: &Path, file: &str, bytes: Option<Vec<u8>>) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-10k");
    std::fs::create_dir_all(dir).expect("dir");
    for f in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ] {
        if f == file {
            if let Some(b) = &bytes {
                std::fs::write(dir.join(f), b).expect("write");
            }
        } else {
            std::fs::copy(src.join(f), dir.join(f)).expect("copy");
        }
    }
    dir.to_str().expect("utf8").to_string()
}

fn gz(raw: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(raw).expect("gzip");
    e.finish().expect("gzip")
}

#[test]
fn every_bad_input_gives_one_line_and_the_right_exit_code() {
    let d = scratch("bad-inputs");
    let s = |p: PathBuf| p.to_str().expect("utf8").to_string();
    let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-10k/train-labels-idx1-ubyte.gz");
    let labels = {
        use std::io::Read;
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(real).expect("labels")).read_to_end(&mut raw).expect("gunzip");
        raw
    };
    let mut bad_label = labels.clone();
    bad_label[8 + 17] = 10;
    let mut bad_magic = labels.clone();
    bad_magic[3] = 3;
    let mut bad_dims = labels.clone();
    bad_dims[7] ^= 0x40;

    // Checkpoints of other models: a WRN (for --init into a convnet) and a 20-cluster convnet
    // (for eval on 10-class data); and a one-step run of the configuration the full-disk row
    // uses, to size that disk.
    let wrn_dir = d.join("wrn");
    let clusters_dir = d.join("clusters");
    let one_step_dir = d.join("one-step");
    let tiny = ["train", "--width", "4", "--batch", "8", "--unlabeled-batch", "16"];
    for (args, dir) in [
        (vec!["train", "--model", "wrn-28-2", "--method", "supervised", "--labels", "10", "--batch", "8"], &wrn_dir),
        (vec!["pretrain", "--overcluster", "2", "--width", "4", "--unlabeled-batch", "8"], &clusters_dir),
        (tiny.to_vec(), &one_step_dir),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_muscle"))
            .env_remove("MUSCLE_CUDA_EMU")
            .args(args)
            .args(["--steps", "1", "--eval-every", "1", "--out", &s(dir.clone())])
            .output()
            .expect("run");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    std::fs::create_dir_all(d.join("full")).expect("dir");
    std::os::unix::fs::symlink("/dev/full", d.join("full/metrics.jsonl")).expect("symlink");
    std::fs::write(d.join("empty.safetensors"), b"").expect("write");
    // A disk that fills halfway through the step-2 resume.safetensors of a run that checkpoints
    // every step: the one-step run's files but summary.json, then half a resume file (the step-2
    // metrics line, and the --out paths' lengths, differ by far less).
    let size = |f: &str| std::fs::metadata(one_step_dir.join(f)).expect("size").len();
    let step1: u64 = ["config.json", "split.json", "metrics.jsonl", "resume.safetensors", "checkpoint.safetensors"]
        .iter()
        .map(|f| size(f))
        .sum();
    let fills = d.join("fills");
    let full_disk = format!("disk@{}", step1 + size("resume.safetensors") / 2);

    let rows: Vec<Row> = vec![
        ("unknown method", None, vec!["train".into(), "--method".into(), "x".into()], 2, "--method".into()),
        ("unknown model", None, vec!["train".into(), "--model".into(), "x".into()], 2, "--model".into()),
        ("unknown dataset", None, vec!["train".into(), "--dataset".into(), "x".into()], 2, "--dataset".into()),
        ("zero steps", None, vec!["train".into(), "--steps".into(), "0".into()], 2, "--steps".into()),
        ("negative steps", None, vec!["train".into(), "--steps=-5".into()], 2, "--steps".into()),
        ("zero batch", None, vec!["train".into(), "--batch".into(), "0".into()], 2, "--batch".into()),
        (
            "zero unlabeled batch",
            None,
            vec!["train".into(), "--unlabeled-batch".into(), "0".into()],
            2,
            "--unlabeled-batch".into(),
        ),
        (
            "fixmatch with no unlabeled images",
            None,
            vec!["train".into(), "--method".into(), "fixmatch".into(), "--unlabeled-batch".into(), "0".into()],
            2,
            "--unlabeled-batch".into(),
        ),
        (
            "tau of 0",
            None,
            vec!["train".into(), "--method".into(), "fixmatch".into(), "--tau".into(), "0".into()],
            2,
            "--tau".into(),
        ),
        ("tau above 1", None, vec!["train".into(), "--tau".into(), "1.5".into()], 2, "--tau".into()),
        ("tau not a number", None, vec!["train".into(), "--tau".into(), "nan".into()], 2, "--tau".into()),
        (
            "nesterov not a bool",
            None,
            vec!["train".into(), "--nesterov".into(), "maybe".into()],
            2,
            "--nesterov".into(),
        ),
        ("labels not balanced", None, vec!["train".into(), "--labels".into(), "15".into()], 2, "15".into()),
        (
            "labels larger than the data",
            None,
            vec!["train".into(), "--labels".into(), "20000".into()],
            2,
            "20000".into(),
        ),
        (
            "imbalance below 1",
            None,
            vec!["train".into(), "--label-imbalance".into(), "0.5".into()],
            2,
            "--label-imbalance".into(),
        ),
        ("bad device", None, vec!["train".into(), "--device".into(), "tpu".into()], 2, "--device".into()),
        ("cuda in a CPU build", None, vec!["train".into(), "--device".into(), "cuda".into()], 1, "cuda".into()),
        (
            "missing data dir",
            None,
            vec!["train".into(), "--data".into(), "/nonexistent/d".into()],
            1,
            "/nonexistent/d".into(),
        ),
        (
            "empty IDX file",
            None,
            vec![
                "train".into(),
                "--data".into(),
                idx_set_with(&d.join("empty"), "train-labels-idx1-ubyte.gz", Some(vec![])),
            ],
            1,
            "train-labels-idx1-ubyte".into(),
        ),
        (
            "missing IDX file",
            None,
            vec!["train".into(), "--data".into(), idx_set_with(&d.join("missing"), "t10k-labels-idx1-ubyte.gz", None)],
            1,
            "t10k-labels-idx1-ubyte".into(),
        ),
        (
            "truncated IDX",
            None,
            vec![
                "train".into(),
                "--data".into(),
                idx_set_with(&d.join("trunc"), "train-labels-idx1-ubyte.gz", Some(gz(&labels[..5000]))),
            ],
            1,
            "train-labels-idx1-ubyte".into(),
        ),
        (
            "wrong IDX magic",
            None,
            vec![
                "train".into(),
                "--data".into(),
                idx_set_with(&d.join("magic"), "train-labels-idx1-ubyte.gz", Some(gz(&bad_magic))),
            ],
            1,
            "train-labels-idx1-ubyte".into(),
        ),
        (
            "wrong IDX dimensions",
            None,
            vec![
                "train".into(),
                "--data".into(),
                idx_set_with(&d.join("dims"), "train-labels-idx1-ubyte.gz", Some(gz(&bad_dims))),
            ],
            1,
            "train-labels-idx1-ubyte".into(),
        ),
        (
            "label out of range",
            None,
            vec![
                "train".into(),
                "--data".into(),
                idx_set_with(&d.join("label"), "train-labels-idx1-ubyte.gz", Some(gz(&bad_label))),
            ],
            1,
            "train-labels-idx1-ubyte".into(),
        ),
        (
            "missing checkpoint",
            None,
            vec!["eval".into(), "--checkpoint".into(), "/nonexistent/c.safetensors".into()],
            1,
            "/nonexistent/c.safetensors".into(),
        ),
        (
            "empty checkpoint",
            None,
            vec!["eval".into(), "--checkpoint".into(), s(d.join("empty.safetensors"))],
            1,
            "empty.safetensors".into(),
        ),
        (
            "checkpoint for other data",
            None,
            vec!["eval".into(), "--checkpoint".into(), s(clusters_dir.join("checkpoint.safetensors"))],
            1,
            "checkpoint.safetensors".into(),
        ),
        (
            "init from another model",
            None,
            vec![
                "train".into(),
                "--steps".into(),
                "1".into(),
                "--init".into(),
                s(wrn_dir.join("checkpoint.safetensors")),
            ],
            1,
            "checkpoint.safetensors".into(),
        ),
        (
            "unwritable --out",
            None,
            vec!["train".into(), "--steps".into(), "1".into(), "--out".into(), "/proc/muscle-out".into()],
            1,
            "/proc/muscle-out".into(),
        ),
        (
            "write error in --out",
            None,
            vec![
                "train".into(),
                "--steps".into(),
                "1".into(),
                "--width".into(),
                "4".into(),
                "--out".into(),
                s(d.join("full")),
            ],
            1,
            "metrics.jsonl".into(),
        ),
        (
            "huge --batch (a batch that cannot be allocated)",
            None,
            vec![
                "train".into(),
                "--batch".into(),
                "100000000".into(),
                "--steps".into(),
                "1".into(),
                "--out".into(),
                s(d.join("huge-batch")),
            ],
            1,
            "--batch 100000000 and --unlabeled-batch 256 (x2 views) of 1x28x28 images (convnet, muscle) needs ~".into(),
        ),
        (
            "huge --batch past the estimate (a batch that cannot be allocated)",
            Some(("MUSCLE_MEMORY_LIMIT", "off".into())),
            vec![
                "train".into(),
                "--batch".into(),
                "100000000".into(),
                "--steps".into(),
                "1".into(),
                "--out".into(),
                s(d.join("huge-batch-off")),
            ],
            1,
            "--batch: a batch of 100000000 images".into(),
        ),
        (
            "huge --unlabeled-batch",
            None,
            vec![
                "train".into(),
                "--unlabeled-batch".into(),
                "100000000".into(),
                "--steps".into(),
                "1".into(),
                "--out".into(),
                s(d.join("huge-unlabeled")),
            ],
            1,
            "--unlabeled-batch 100000000 (x2 views) of 1x28x28 images (convnet, muscle) needs ~".into(),
        ),
        (
            "huge --resize on an image folder",
            None,
            vec![
                "train".into(),
                "--dataset".into(),
                "folder".into(),
                "--data".into(),
                s(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar10-foolbox")),
                "--resize".into(),
                "30000".into(),
            ],
            1,
            "--resize 30000: ".into(),
        ),
        (
            "a data set larger than the memory limit",
            Some(("MUSCLE_MEMORY_LIMIT", "4M".into())),
            vec!["train".into(), "--steps".into(), "1".into()],
            1,
            "train-images-idx3-ubyte.gz: decoding [10000, 28, 28]: 7.5 MiB does not fit".into(),
        ),
        (
            "a step larger than the memory limit",
            Some(("MUSCLE_MEMORY_LIMIT", "200M".into())),
            vec!["train".into(), "--steps".into(), "1".into()],
            1,
            "for one training step; this machine allows 200.0 MiB (MUSCLE_MEMORY_LIMIT)".into(),
        ),
        (
            "malformed MUSCLE_MEMORY_LIMIT",
            Some(("MUSCLE_MEMORY_LIMIT", "lots".into())),
            vec!["train".into()],
            2,
            "MUSCLE_MEMORY_LIMIT".into(),
        ),
        (
            "a disk that fills mid-run",
            Some(("MUSCLE_FAULT", full_disk)),
            tiny.iter()
                .map(|a| a.to_string())
                .chain(["--steps", "3", "--eval-every", "1", "--out"].map(String::from))
                .chain([s(fills.clone())])
                .collect(),
            1,
            "resume.safetensors: No space left on device".into(),
        ),
        (
            "a batch that cannot be allocated mid-run",
            Some(("MUSCLE_FAULT", "alloc@2".into())),
            tiny.iter()
                .map(|a| a.to_string())
                .chain(["--steps", "3", "--eval-every", "1", "--out"].map(String::from))
                .chain([s(d.join("alloc"))])
                .collect(),
            1,
            "--batch: a batch of 8 images of 1x28x28 for step 2: could not be allocated".into(),
        ),
        (
            "malformed MUSCLE_FAULT",
            Some(("MUSCLE_FAULT", "disk@lots".into())),
            vec!["info".into()],
            2,
            "MUSCLE_FAULT".into(),
        ),
        (
            "resume without a run",
            None,
            vec!["train".into(), "--resume".into(), s(d.join("nothing"))],
            1,
            "config.json".into(),
        ),
    ];
    assert!(rows.len() >= 20);
    for (what, env, args, code, needle) in &rows {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_muscle"));
        cmd.env_remove("MUSCLE_CUDA_EMU").env_remove("MUSCLE_FAULT").env_remove("MUSCLE_MEMORY_LIMIT").args(args);
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        let o = cmd.output().expect("run");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(*code), "{what}: {args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{what}: not one line: {err}");
        assert!(err.contains(needle.as_str()), "{what}: '{err}' does not name {needle}");
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
    // The write failures left no temporary files behind, and the full disk the step-1 checkpoint.
    for dir in [d.join("full"), fills.clone()] {
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{}: {leftovers:?}", dir.display());
    }
    for f in ["resume.safetensors", "checkpoint.safetensors"] {
        let ck = muscle::train::checkpoint::Checkpoint::load(&fills.join(f)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ck.metadata.get("step").map(String::as_str), Some("1"), "{f}");
    }
}
