//! The memory estimate against the measured peak of real runs (the reliability issue, item 1).

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;

/// The embedded IDX set with its test split cut to `n` images (the final evaluation is then a
/// tenth of the work; it still runs in batches of 500, so its memory is unchanged).
pub(crate) fn with_small_test_split(dir: &Path, n: u32) -> String {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-10k");
    std::fs::create_dir_all(dir).expect("dir");
    for (f, header) in [
        ("train-images-idx3-ubyte.gz", 0),
        ("train-labels-idx1-ubyte.gz", 0),
        ("t10k-images-idx3-ubyte.gz", 16),
        ("t10k-labels-idx1-ubyte.gz", 8),
    ] {
        if header == 0 {
            std::fs::copy(src.join(f), dir.join(f)).expect("copy");
            continue;
        }
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(src.join(f)).expect("open"))
            .read_to_end(&mut raw)
            .expect("gunzip");
        let per = if header == 16 { 28 * 28 } else { 1 };
        raw[4..8].copy_from_slice(&n.to_be_bytes());
        raw.truncate(header + n as usize * per);
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&raw).expect("gzip");
        std::fs::write(dir.join(f), e.finish().expect("gzip")).expect("write");
    }
    dir.to_str().expect("utf8").to_string()
}

#[test]
fn the_memory_estimate_is_within_a_quarter_of_the_measured_peak() {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("memory-estimate");
    let _ = std::fs::remove_dir_all(&root);
    let data = with_small_test_split(&root.join("data"), 1000);
    let cases: [&[&str]; 2] = [
        // A step large enough that the step, not the process, dominates (~2.5 GiB).
        &["--batch", "256", "--unlabeled-batch", "1024", "--steps", "2"],
        &["--model", "wrn-28-2", "--method", "supervised", "--batch", "128", "--steps", "1"],
    ];
    for (k, args) in cases.iter().enumerate() {
        let out = root.join(format!("run{k}"));
        let o = Command::new(env!("CARGO_BIN_EXE_muscle"))
            .env_remove("MUSCLE_CUDA_EMU")
            .env_remove("MUSCLE_FAULT")
            .env_remove("MUSCLE_MEMORY_LIMIT")
            .args(["train", "--data", &data, "--threads", "2"])
            .args(*args)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("run");
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        let text = std::fs::read_to_string(out.join("summary.json")).expect("summary");
        let s: serde_json::Value = serde_json::from_str(&text).expect("json");
        let est = s["memory_estimate_bytes"].as_f64().expect("an estimate");
        let peak = s["peak_resident_bytes"].as_f64().expect("a peak");
        let ratio = est / peak;
        eprintln!("{args:?}: estimate {:.0} MiB, peak {:.0} MiB, ratio {ratio:.3}", est / 1048576.0, peak / 1048576.0);
        assert!((0.75..=1.25).contains(&ratio), "{args:?}: estimate {est} against a peak of {peak}");
    }
}
