//! Compiles kernels/*.cu to PTX when the `cuda` feature is on, and records the git commit the
//! build was made from (MUSCLE_GIT_COMMIT, for config.json) in every build.
//!
//! nvcc is looked up as $NVCC, then $CUDA_HOME/bin/nvcc, then `.cuda-tools/nvidia/cu13/bin/nvcc`
//! under the crate root (what scripts/install-cuda-tools.sh installs), then `nvcc` on PATH. Each
//! kernel file becomes `OUT_DIR/<name>.ptx` (`-arch=compute_80`: the driver JIT-compiles it for
//! Ampere and Hopper; no `--use_fast_math`, whose approximate logs and divisions would break
//! parity with the CPU twins). An nvcc error fails the build with nvcc's own message.
//!
//! Without nvcc the build prints one `cargo:warning` and still succeeds: the generated
//! `OUT_DIR/kernels.rs` then marks every PTX as absent and the crate compiles the embedded `.cu`
//! sources with NVRTC when a GPU context is created. The generated file always embeds the sources
//! (for NVRTC, with `kernels/common.cuh` put in place of their one `#include`) and the table of
//! each file's kernel entry points, read from its `extern "C"` definitions: the list the
//! launchers may name, kept by nobody's hand. This script never panics for a missing tool,
//! never runs nvidia-smi and writes only into OUT_DIR.
//!
//! It reruns when kernels/, src/, build.rs, $NVCC, $CUDA_HOME or git's HEAD change; a kernel whose
//! source, nvcc and flags are those of its PTX in OUT_DIR is not compiled again. An nvcc that appears later in
//! .cuda-tools or on PATH is not noticed by itself (cargo cannot watch a file that does not exist
//! yet without rerunning every build): set NVCC to it, as .ci/run does.

#[path = "emu/signatures.rs"]
mod signatures;

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    git_commit();
    println!("cargo::rustc-check-cfg=cfg(muscle_cuda_emu)");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    if let Err(message) = build_kernels().and_then(|()| build_emulator()) {
        // A failed nvcc or C++ compiler (or an unreadable kernels/ folder) is a build error,
        // with the tool's message.
        eprintln!("{message}");
        std::process::exit(1);
    }
}

/// Builds the emulated CUDA device (emu/): its runtime and every `kernels/*.cu` compiled as C++
/// against emu/cuda_emu.h, with the per-kernel glue that emu/signatures.rs generates from the
/// kernels' signatures, into one static library; sets `cfg(muscle_cuda_emu)` for the crate.
/// Without a C++ compiler it prints one warning and the crate is built without the emulator.
fn build_emulator() -> Result<(), String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| format!("CARGO_MANIFEST_DIR: {e}"))?);
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?).join("emu");
    println!("cargo:rerun-if-changed=emu");
    println!("cargo:rerun-if-env-changed=CXX");
    let mut build = cc::Build::new();
    build.cpp(true).warnings(false).cargo_warnings(false);
    // cc names a compiler whether or not it exists ($CXX, c++): run it to know.
    let runs = build
        .try_get_compiler()
        .is_ok_and(|c| c.to_command().arg("--version").output().is_ok_and(|o| o.status.success()));
    if !runs {
        println!(
            "cargo:warning=no C++ compiler found: the emulated CUDA device (MUSCLE_CUDA_EMU=1) is not built \
             (apt-get install g++)"
        );
        return Ok(());
    }
    fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let kernel_dir = manifest.join("kernels");
    let sources = kernel_sources(&kernel_dir)?;
    let mut paths = Vec::new();
    for src in &sources {
        let path = src.to_str().ok_or_else(|| format!("{}: not UTF-8", src.display()))?.to_string();
        let source = fs::read_to_string(src).map_err(|e| format!("{path}: {e}"))?;
        let stem = src.file_stem().and_then(|s| s.to_str()).ok_or_else(|| format!("{path}: bad name"))?;
        let glue = out.join(format!("{stem}.glue.cpp"));
        write_if_changed(&glue, &signatures::render_glue(&path, &source)?)?;
        build.file(&glue);
        paths.push(path);
    }
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    let index = out.join("index.cpp");
    write_if_changed(&index, &signatures::render_index(&paths))?;
    let header = manifest.join("emu").join("cuda_emu.h");
    build
        .file(manifest.join("emu").join("runtime.cpp"))
        .file(&index)
        .include(&manifest)
        .include(&kernel_dir)
        .std("c++17")
        .opt_level(2)
        // Line tables, so that a fault names the kernel's file:line.
        .debug(true)
        // No FMA contraction: the __f*_rn kernels must round as the CPU twins and the GPU do.
        .flag("-ffp-contract=off")
        .flag("-Wno-unknown-pragmas")
        .flag("-include")
        .flag(header.to_str().ok_or("emu/cuda_emu.h: path not UTF-8")?);
    build.try_compile("cuda_emu").map_err(|e| format!("building the emulated CUDA device (emu/): {e}"))?;
    println!("cargo:rustc-cfg=muscle_cuda_emu");
    Ok(())
}

/// Writes `text` to `path` unless it already holds it, so that an unchanged glue file keeps its
/// time stamp.
fn write_if_changed(path: &Path, text: &str) -> Result<(), String> {
    if fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Everything the `cuda` feature needs from the build; `Err` fails the build with its message.
fn build_kernels() -> Result<(), String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| format!("CARGO_MANIFEST_DIR: {e}"))?);
    let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
    let kernel_dir = manifest.join("kernels");
    let sources = kernel_sources(&kernel_dir)?;
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
    }

    let nvcc = find_nvcc(&manifest);
    if nvcc.is_none() {
        println!(
            "cargo:warning=nvcc not found ($NVCC, $CUDA_HOME/bin, .cuda-tools, PATH): the CUDA kernels will be \
             compiled at run time by NVRTC (for PTX now: NVCC=$(bash scripts/install-cuda-tools.sh | tail -n 1) cargo build ...)"
        );
    }

    let common_path = kernel_dir.join(COMMON);
    println!("cargo:rerun-if-changed={}", common_path.display());
    let common = fs::read_to_string(&common_path).map_err(|e| format!("{}: {e}", common_path.display()))?;

    let mut generated = String::from(
        "// Generated by build.rs: the kernel sources, their entry points, and their PTX when nvcc was found.\n\
         /// One kernels/*.cu file: its stem, its source, its kernels, and the PTX nvcc made of it.\n\
         pub struct KernelFile {\n    \
             /// File stem, e.g. \"softmax\".\n    \
             pub name: &'static str,\n    \
             /// The CUDA C++ source with common.cuh in place of its include (what NVRTC compiles).\n    \
             pub source: &'static str,\n    \
             /// The `extern \"C\"` kernels the file defines, in source order.\n    \
             pub kernels: &'static [&'static str],\n    \
             /// PTX from nvcc -arch=compute_80, if nvcc was found at build time.\n    \
             pub ptx: Option<&'static str>,\n\
         }\n\
         /// Every kernel file, sorted by name.\n\
         pub const KERNEL_FILES: &[KernelFile] = &[\n",
    );
    for src in &sources {
        let stem = src.file_stem().and_then(|s| s.to_str()).ok_or_else(|| format!("{}: bad name", src.display()))?;
        let text = fs::read_to_string(src).map_err(|e| format!("{}: {e}", src.display()))?;
        let standalone = inline_common(&text, &common).map_err(|e| format!("{}: {e}", src.display()))?;
        let standalone_path = out.join(format!("{stem}.nvrtc.cu"));
        fs::write(&standalone_path, &standalone).map_err(|e| format!("{}: {e}", standalone_path.display()))?;
        let kernels = kernel_names(&text);
        if kernels.is_empty() {
            return Err(format!("{}: defines no extern \"C\" __global__ kernel", src.display()));
        }
        let ptx = match &nvcc {
            Some(nvcc) => {
                let ptx_path = out.join(format!("{stem}.ptx"));
                compile_cached(nvcc, src, &standalone, &ptx_path)?;
                format!("Some(include_str!({:?}))", ptx_path.display().to_string())
            }
            None => "None".to_string(),
        };
        let _ = writeln!(
            generated,
            "    KernelFile {{ name: {stem:?}, source: include_str!({:?}), kernels: &{kernels:?}, ptx: {ptx} }},",
            standalone_path.display().to_string()
        );
    }
    generated.push_str("];\n");
    let target = out.join("kernels.rs");
    fs::write(&target, generated).map_err(|e| format!("{}: {e}", target.display()))
}

/// The `kernels/*.cu` files, sorted by name (the order of the generated tables).
fn kernel_sources(kernel_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut sources: Vec<PathBuf> = fs::read_dir(kernel_dir)
        .map_err(|e| format!("{}: {e}", kernel_dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    Ok(sources)
}

/// The shared header every kernel file includes.
const COMMON: &str = "common.cuh";

/// `source` with its `#include "common.cuh"` line replaced by the header's text (NVRTC is given
/// no include path); an error when the line is missing, so every file builds the same both ways.
fn inline_common(source: &str, common: &str) -> Result<String, String> {
    let include = format!("#include \"{COMMON}\"");
    let mut found = false;
    let mut out = String::with_capacity(source.len() + common.len());
    for line in source.lines() {
        if line.trim() == include {
            found = true;
            out.push_str(common);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    if found {
        Ok(out)
    } else {
        Err(format!("no `{include}` line"))
    }
}

/// The names of the `extern "C" __global__` functions defined in `source`, in order: the
/// identifier before the first parenthesis that is not `__launch_bounds__(...)`.
fn kernel_names(source: &str) -> Vec<String> {
    const MARK: &str = "extern \"C\" __global__";
    let mut names = Vec::new();
    for (at, _) in source.match_indices(MARK) {
        let mut rest = &source[at + MARK.len()..];
        while let Some(open) = rest.find('(') {
            let name = rest[..open].split_whitespace().last().unwrap_or("");
            if name == "__launch_bounds__" {
                rest = &rest[open + 1..];
                match rest.find(')') {
                    Some(close) => rest = &rest[close + 1..],
                    None => break,
                }
            } else {
                if !name.is_empty() {
                    names.push(name.to_string());
                }
                break;
            }
        }
    }
    names
}

/// The first nvcc that exists, in the documented order.
fn find_nvcc(manifest: &Path) -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(p));
    }
    if let Some(home) = env::var_os("CUDA_HOME").filter(|p| !p.is_empty()) {
        candidates.push(PathBuf::from(home).join("bin").join(exe));
    }
    candidates.push(manifest.join(".cuda-tools").join("nvidia").join("cu13").join("bin").join(exe));
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join(exe)));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// Sets MUSCLE_GIT_COMMIT (config.json's `git_commit`) to HEAD's hash, suffixed `-dirty` when the
/// tracked sources differ from HEAD; sets nothing outside a git checkout or without git. Reruns
/// when HEAD moves or a source changes (kernels/ and build.rs are watched already).
fn git_commit() {
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    for path in ["src", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={path}");
    }
    let Some(head) = git(&["rev-parse", "--short=12", "HEAD"]) else { return };
    // A missing watched file would make cargo rerun this script on every build: watch what exists.
    let mut refs = vec!["HEAD".to_string(), "packed-refs".to_string()];
    refs.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in refs {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]).map(PathBuf::from).filter(|p| p.is_file()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    let sources = ["src", "kernels", "build.rs", "Cargo.toml", "Cargo.lock"];
    let mut status = vec!["status", "--porcelain", "--untracked-files=no", "--"];
    status.extend(sources);
    let dirty = git(&status).is_some_and(|s| !s.is_empty());
    println!("cargo:rustc-env=MUSCLE_GIT_COMMIT={head}{}", if dirty { "-dirty" } else { "" });
}

/// `compile`, skipped when the PTX beside it was made from the same source (and header) by the same nvcc: this
/// script reruns on every source change (for the git hash), and nvcc takes most of a minute.
fn compile_cached(nvcc: &Path, src: &Path, standalone: &str, ptx: &Path) -> Result<(), String> {
    // The key holds the source with the header inlined, so an edit of common.cuh recompiles.
    let key = format!("{}\n{}\n{standalone}", nvcc.display(), NVCC_FLAGS.join(" "));
    let stamp = ptx.with_extension("ptx.key");
    if ptx.is_file() && fs::read_to_string(&stamp).is_ok_and(|k| k == key) {
        return Ok(());
    }
    compile(nvcc, src, ptx)?;
    fs::write(&stamp, key).map_err(|e| format!("{}: {e}", stamp.display()))
}

/// nvcc's options for every kernel file.
const NVCC_FLAGS: [&str; 5] = ["--ptx", "-arch=compute_80", "-O3", "-lineinfo", "-std=c++17"];

/// nvcc --ptx of one file; nvcc's stderr becomes the build error.
fn compile(nvcc: &Path, src: &Path, ptx: &Path) -> Result<(), String> {
    let output = Command::new(nvcc)
        .args(NVCC_FLAGS)
        .arg(src)
        .arg("-o")
        .arg(ptx)
        .output()
        .map_err(|e| format!("could not run {}: {e}", nvcc.display()))?;
    if !output.status.success() {
        return Err(format!(
            "nvcc failed on {} ({}):\n{}{}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(())
}
