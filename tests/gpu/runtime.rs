//! The runtime: launchers' kernel names against the sources, PTX, NVRTC, probing.

use super::*;
use muscle::cuda::device::{compile_with_nvrtc, nvrtc_present};
use muscle::cuda::embedded::KERNEL_FILES;
use muscle::ErrorKind;

fn defined_kernels(source: &str) -> Vec<String> {
    let marker = "extern \"C\" __global__ void ";
    source
        .match_indices(marker)
        .map(|(at, _)| {
            let mut rest = &source[at + marker.len()..];
            if let Some(after) = rest.strip_prefix("__launch_bounds__(") {
                rest = &after[after.find(')').expect("unclosed __launch_bounds__") + 1..];
            }
            rest[..rest.find('(').expect("kernel without parameter list")].trim().to_string()
        })
        .collect()
}

/// Every kernel name a launcher passes to `launch!` (a string literal ending in `_f32` in the
/// Rust sources under src/), by file.
fn launched_kernels() -> Vec<(String, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src/") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    let mut names = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read source");
        for (at, _) in text.match_indices("_f32\"") {
            let start = text[..at].rfind('"').expect("opening quote") + 1;
            let name = &text[start..at + 4];
            if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.push((file.display().to_string(), name.to_string()));
            }
        }
    }
    names
}

#[test]
fn launchers_and_kernel_sources_name_the_same_kernels() {
    // build.rs reads the kernel table off the sources; here every name a launcher uses must be
    // in it (a typo fails here, not at launch time on a GPU), and every kernel must be launched.
    let defined: Vec<&str> = KERNEL_FILES.iter().flat_map(|f| f.kernels.iter().copied()).collect();
    let launched = launched_kernels();
    for (file, name) in &launched {
        assert!(defined.contains(&name.as_str()), "{file}: launches {name}, which no kernels/*.cu defines");
    }
    for name in &defined {
        assert!(launched.iter().any(|(_, n)| n == name), "{name}: defined but never launched");
    }
    for file in KERNEL_FILES {
        let mut from_source = defined_kernels(file.source);
        let mut table: Vec<String> = file.kernels.iter().map(|s| s.to_string()).collect();
        from_source.sort();
        table.sort();
        assert_eq!(from_source, table, "kernels/{}.cu definitions vs build.rs's table", file.name);
        for name in &from_source {
            assert!(name.ends_with("_fwd_f32") || name.ends_with("_bwd_f32"), "{name}: not <op>_<fwd|bwd>_f32");
            // Each kernel has a header comment naming it (what it computes and why).
            assert!(file.source.contains(&format!("// {name}")), "{name}: no header comment");
        }
        // The embedded source is what NVRTC compiles: common.cuh inlined, no include left.
        let includes = file.source.lines().any(|l| l.trim_start().starts_with("#include"));
        assert!(!includes, "kernels/{}.cu: NVRTC compiles it without include paths", file.name);
    }
}

#[test]
fn embedded_ptx_has_every_kernel_when_nvcc_was_found() {
    for file in KERNEL_FILES {
        let Some(ptx) = file.ptx else {
            skip("embedded_ptx_has_every_kernel_when_nvcc_was_found", "built without nvcc (NVRTC at run time)");
            return;
        };
        assert!(ptx.contains(".target sm_80"), "kernels/{}.cu: PTX not for compute_80", file.name);
        for name in defined_kernels(file.source) {
            assert!(ptx.contains(&format!(".entry {name}(")), "kernels/{}.cu: no .entry {name} in the PTX", file.name);
        }
    }
}

#[test]
fn nvrtc_compiles_every_kernel_source() {
    // The fallback when nvcc is missing at build time; NVRTC needs no GPU, only libnvrtc.
    if !nvrtc_present() {
        skip("nvrtc_compiles_every_kernel_source", "libnvrtc not found");
        return;
    }
    for file in KERNEL_FILES {
        let ptx = compile_with_nvrtc(file, "compute_80").unwrap_or_else(|e| panic!("{e}"));
        for name in defined_kernels(file.source) {
            assert!(ptx.contains(&format!(".entry {name}(")), "NVRTC kernels/{}.cu: no .entry {name}", file.name);
        }
    }
}

#[test]
fn probing_never_panics() {
    match probe() {
        Ok(info) => {
            assert!(!info.name.is_empty() && info.compute_capability.0 >= 5, "{info:?}");
            let _ = writeln!(std::io::stderr(), "gpu: {info}");
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Device);
            assert!(!e.message().is_empty() && !e.message().contains('\n'), "not one line: {e:?}");
        }
    }
}

/// A device allocation that does not fit is one line and exit 1, naming what was being moved and
/// the device's free memory (the emulated device given 1 MiB).
#[cfg(muscle_cuda_emu)]
#[test]
fn out_of_device_memory_is_one_line_and_exit_1() {
    let dir = std::env::temp_dir().join(format!("muscle-oom-{}", std::process::id()));
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_muscle"))
        .env("MUSCLE_CUDA_EMU", "1")
        .env("MUSCLE_CUDA_EMU_MEMORY", "1M")
        .args(["train", "--device", "cuda", "--steps", "1", "--out"])
        .arg(&dir)
        .output()
        .expect("run muscle");
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains("out of memory") && err.contains("free") && err.contains("moving a tensor"), "{err}");
}

/// The device side of the memory estimate: a step that cannot fit the (emulated) device is
/// refused before it starts, naming the flags and the free memory; one that fits is estimated
/// within a quarter of its buffers' measured peak.
#[cfg(all(muscle_cuda_emu, feature = "cudnn"))]
#[test]
fn the_device_memory_estimate_refuses_a_step_that_cannot_fit_and_is_close_to_the_peak() {
    let root = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("gpu-memory-estimate");
    let _ = std::fs::remove_dir_all(&root);
    let data = crate::memory::with_small_test_split(&root.join("data"), 200);
    let run = |memory: &str, unlabeled: &str, out: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_muscle"))
            .env("MUSCLE_CUDA_EMU", "1")
            .env("MUSCLE_CUDA_EMU_MEMORY", memory)
            .env_remove("MUSCLE_MEMORY_LIMIT")
            .env_remove("MUSCLE_FAULT")
            .args([
                "train",
                "--device",
                "cuda",
                "--data",
                &data,
                "--steps",
                "1",
                "--batch",
                "16",
                "--unlabeled-batch",
                unlabeled,
                "--out",
            ])
            .arg(root.join(out))
            .output()
            .expect("run muscle")
    };
    let o = run("64M", "4096", "refused");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(
        err.contains("--batch 16 and --unlabeled-batch 4096 (x2 views)")
            && err.contains("on cuda:0 (emulated) for one training step")
            && err.contains("free there"),
        "{err}"
    );
    assert!(!root.join("refused/metrics.jsonl").exists(), "the refused run started");

    let o = run("4G", "32", "fits");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(root.join("fits/summary.json")).expect("summary");
    let s: serde_json::Value = serde_json::from_str(&text).expect("json");
    let est = s["device_memory_estimate_bytes"].as_f64().expect("a device estimate");
    let peak = s["device_peak_bytes"].as_f64().expect("a device peak");
    assert!((0.75..=1.25).contains(&(est / peak)), "device estimate {est} against a peak of {peak}");
}

/// An op whose output does not fit the device is one line naming the output's shape and the
/// device's free memory: a 4 TiB one-hot from a one-element input fits no device.
#[test]
fn an_op_out_of_device_memory_names_the_shape() {
    with_gpu("an_op_out_of_device_memory_names_the_shape", |_| {
        let like = muscle::Tensor::full_on(muscle::Device::Cuda(0), &[1], 0.0).expect("on cuda:0");
        let labels = muscle::ops::Indices::from(vec![0]);
        let e = muscle::ops::mixmatch::one_hot(&labels, 1 << 40, &like).expect_err("a 4 TiB output");
        let text = e.to_string();
        assert_eq!(e.kind(), ErrorKind::OutOfMemory, "{text}");
        assert!(text.starts_with("a [1, 1099511627776] f32 tensor (4.0 TiB): out of memory"), "{text}");
        assert!(text.contains("free") && !text.contains('\n'), "{text}");
    });
}
