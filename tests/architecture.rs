//! The layout's rules, read off the sources (docs/ARCHITECTURE.md states them):
//! - layers only look down: a module may name `crate::X` only for an X of a lower layer;
//! - no import cycle between the modules of one folder (e.g. the CPU convolution kernels);
//! - an op family's kernels are its own: the `extern "C"` names of `kernels/<family>.cu` appear
//!   only in its folder, its `.cu` and its test module, and no code outside its folder reaches
//!   into its `cpu` or `cuda` module (the family's `mod.rs` is its API).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, bottom up; a module may use only modules of lower layers (and itself).
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["rng", "pool", "profile", "alloc_count", "kernel_args", "npy", "fault", "memory", "dist"],
    &["cpu", "cuda"],
    &["device"],
    &["tensor"],
    &["autograd"],
    &["testing"],
    &["ops"],
    &["nn"],
    &["optim"],
    &["data"],
    &["ssl"],
    &["train"],
    &["app", "fuzz"],
];

/// Crate-root items that live in a module: macros exported at the root by `#[macro_export]`.
const ROOT_ALIASES: &[(&str, &str)] = &[("multiversion", "cpu")];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file under src/ (`src/ops/softmax/cuda.rs` -> [ops, softmax, cuda]).
fn module_path(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(root().join("src")).expect("under src/");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop().expect("file name");
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem.to_string());
    }
    parts
}

/// The source without `//` comments (docs name paths that the code does not use).
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut cut = line.len();
        let bytes = line.as_bytes();
        for i in 0..bytes.len() {
            match bytes[i] {
                b'"' if i == 0 || bytes[i - 1] != b'\\' => in_str = !in_str,
                b'/' if !in_str && bytes.get(i + 1) == Some(&b'/') => {
                    cut = i;
                    break;
                }
                _ => {}
            }
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

/// Every module path `text` names through `crate::`, `super::` or `self::`, resolved against
/// `here` and the inline modules (`mod tests { ... }`) a reference sits in; brace groups are
/// expanded one level (`crate::cpu::{gemm, simd::x}`).
fn referenced_paths(text: &str, here: &[String]) -> Vec<Vec<String>> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let chars: Vec<char> = text.chars().collect();
    let mut refs = Vec::new();
    // Inline modules open at the current brace depth: (name, depth inside its braces).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut pending_mod: Option<String> = None;
    let mut depth = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            depth += 1;
            if let Some(name) = pending_mod.take() {
                inline.push((name, depth));
            }
            i += 1;
            continue;
        }
        if c == '}' {
            inline.retain(|&(_, d)| d < depth);
            depth = depth.saturating_sub(1);
            i += 1;
            continue;
        }
        if c == ';' {
            pending_mod = None;
        }
        let starts_word = i == 0 || !(ident(chars[i - 1]) || chars[i - 1] == ':' || chars[i - 1] == '$');
        if !(starts_word && ident(c)) {
            i += 1;
            continue;
        }
        // A path: identifiers joined by `::`, perhaps ending in a `{...}` group.
        let mut segs: Vec<String> = Vec::new();
        let mut group: Vec<String> = Vec::new();
        let mut j = i;
        loop {
            let s = j;
            while j < chars.len() && ident(chars[j]) {
                j += 1;
            }
            segs.push(chars[s..j].iter().collect());
            if j + 1 < chars.len() && chars[j] == ':' && chars[j + 1] == ':' {
                if j + 2 < chars.len() && chars[j + 2] == '{' {
                    let close = (j + 2..chars.len()).find(|&k| chars[k] == '}').unwrap_or(chars.len() - 1);
                    let inner: String = chars[j + 3..close].iter().collect();
                    for item in inner.split(',') {
                        let first: String = item.trim().chars().take_while(|&c| ident(c)).collect();
                        if !first.is_empty() && first != "self" {
                            group.push(first);
                        }
                    }
                    j = close + 1;
                    break;
                }
                if j + 2 < chars.len() && ident(chars[j + 2]) {
                    j += 2;
                    continue;
                }
            }
            break;
        }
        i = j;
        if segs.len() == 1 && segs[0] == "mod" {
            // `mod name {`: the next identifier names an inline module if a brace follows.
            let mut k = j;
            while k < chars.len() && chars[k].is_whitespace() {
                k += 1;
            }
            let s = k;
            while k < chars.len() && ident(chars[k]) {
                k += 1;
            }
            pending_mod = Some(chars[s..k].iter().collect());
            i = k;
            continue;
        }
        let mut module: Vec<String> = here.to_vec();
        module.extend(inline.iter().map(|(n, _)| n.clone()));
        let mut base = match segs[0].as_str() {
            "crate" => Vec::new(),
            "self" => module,
            "super" => {
                let k = segs.iter().take_while(|s| *s == "super").count();
                let mut b = module;
                for _ in 0..k {
                    b.pop();
                }
                segs.drain(..k - 1);
                b
            }
            _ => continue,
        };
        let tail = &segs[1..];
        if tail.is_empty() && group.is_empty() {
            continue;
        }
        base.extend(tail.iter().cloned());
        if group.is_empty() {
            refs.push(base);
        } else {
            for g in group {
                let mut p = base.clone();
                p.push(g);
                refs.push(p);
            }
        }
    }
    refs
}

struct Source {
    file: PathBuf,
    module: Vec<String>,
    code: String,
}

fn sources() -> Vec<Source> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    files
        .into_iter()
        .filter(|f| !f.ends_with("main.rs"))
        .map(|file| {
            let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            Source { module: module_path(&file), code: code_of(&text), file }
        })
        .collect()
}

fn layer_of(top: &str) -> Option<usize> {
    let top = ROOT_ALIASES.iter().find(|(a, _)| *a == top).map_or(top, |(_, m)| m);
    LAYERS.iter().position(|l| l.contains(&top))
}

#[test]
fn every_module_looks_only_down_the_layers() {
    let mut errors = Vec::new();
    let mut tops = BTreeSet::new();
    for s in sources() {
        let Some(top) = s.module.first() else { continue };
        tops.insert(top.clone());
        let Some(mine) = layer_of(top) else {
            errors.push(format!("{}: module `{top}` is in no layer of this test's LAYERS", s.file.display()));
            continue;
        };
        for r in referenced_paths(&s.code, &s.module) {
            let Some(target) = r.first() else { continue };
            if target == top {
                continue;
            }
            match layer_of(target) {
                Some(theirs) if theirs < mine => {}
                Some(theirs) => errors.push(format!(
                    "{}: `{}` (layer {mine}) uses `crate::{}` (layer {theirs})",
                    s.file.display(),
                    top,
                    r.join("::")
                )),
                // A crate-root item that is no module (a function of lib.rs, a re-export).
                None => errors.push(format!("{}: uses crate-root item `{}`", s.file.display(), r.join("::"))),
            }
        }
    }
    assert!(tops.len() > 10, "found only {tops:?}: is the source walk broken?");
    assert!(errors.is_empty(), "layering violations:\n{}", errors.join("\n"));
}

#[test]
fn no_import_cycle_between_the_modules_of_a_folder() {
    // Edges between siblings: file module a/b/x naming a/b/y (x != y), for every folder a/b.
    let mut edges: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for s in sources() {
        for r in referenced_paths(&s.code, &s.module) {
            let common = s.module.iter().zip(&r).take_while(|(a, b)| a == b).count();
            // Siblings: both continue below the common folder.
            if common < s.module.len() && common < r.len() {
                let folder = s.module[..common].to_vec();
                let from = s.module[common].clone();
                let to = r[common].clone();
                edges.entry(folder).or_default().entry(from).or_default().insert(to);
            }
        }
    }
    let mut cycles = Vec::new();
    for (folder, graph) in &edges {
        // Depth-first search for a back edge.
        fn visit(
            n: &str,
            g: &BTreeMap<String, BTreeSet<String>>,
            stack: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(at) = stack.iter().position(|s| s == n) {
                let mut c = stack[at..].to_vec();
                c.push(n.to_string());
                return Some(c);
            }
            if done.contains(n) {
                return None;
            }
            stack.push(n.to_string());
            for m in g.get(n).into_iter().flatten() {
                if let Some(c) = visit(m, g, stack, done) {
                    return Some(c);
                }
            }
            stack.pop();
            done.insert(n.to_string());
            None
        }
        let mut done = BTreeSet::new();
        for n in graph.keys() {
            if let Some(c) = visit(n, graph, &mut Vec::new(), &mut done) {
                cycles.push(format!("crate::{}: {}", folder.join("::"), c.join(" -> ")));
                break;
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

/// The op families: (folder under src/, kernel file stem or None for a cuDNN-only family).
fn families() -> Vec<(PathBuf, Option<String>)> {
    // The CUDA runtime owns the data-parallel sums' kernels (cuda::collective, beside NCCL).
    let mut out = vec![
        (PathBuf::from("src/optim"), Some("optim".into())),
        (PathBuf::from("src/tensor"), Some("tensor".into())),
        (PathBuf::from("src/cuda"), Some("collective".into())),
    ];
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("src/ops"))
        .expect("src/ops")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for d in dirs {
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        let cu = root().join("kernels").join(format!("{name}.cu"));
        out.push((PathBuf::from("src/ops").join(&name), cu.is_file().then_some(name)));
    }
    out
}

/// The `extern "C" __global__` names of a kernel source.
fn kernel_entry_names(source: &str) -> Vec<String> {
    let mark = "extern \"C\" __global__";
    source
        .match_indices(mark)
        .filter_map(|(at, _)| {
            let mut rest = &source[at + mark.len()..];
            loop {
                let open = rest.find('(')?;
                let name = rest[..open].split_whitespace().last()?;
                if name == "__launch_bounds__" {
                    rest = &rest[open + 1..];
                    rest = &rest[rest.find(')')? + 1..];
                } else {
                    return Some(name.to_string());
                }
            }
        })
        .collect()
}

/// Whether `text` contains `word` as a whole identifier (so `mi_softmax_fwd_f32` does not name
/// `softmax_fwd_f32`).
fn names_word(text: &str, word: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

#[test]
fn an_op_familys_kernels_are_named_only_in_its_folder() {
    // Every kernel file belongs to exactly one family folder.
    let families = families();
    let mut cu_files: Vec<String> = std::fs::read_dir(root().join("kernels"))
        .expect("kernels/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    cu_files.sort();
    let mut owned: Vec<String> = families.iter().filter_map(|(_, k)| k.clone()).collect();
    owned.sort();
    assert_eq!(
        cu_files, owned,
        "each kernels/<family>.cu needs a src/ops/<family>/ folder (or optim/, tensor/, cuda/ for collective)"
    );

    let mut code_files = Vec::new();
    for dir in ["src", "tests", "benches"] {
        rust_files(&root().join(dir), &mut code_files);
    }
    let mut kernel_sources: Vec<PathBuf> = std::fs::read_dir(root().join("kernels"))
        .expect("kernels/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu" || e == "cuh"))
        .collect();
    kernel_sources.sort();
    code_files.extend(kernel_sources);

    let mut errors = Vec::new();
    for (folder, kernel) in &families {
        let family = folder.file_name().unwrap().to_string_lossy().into_owned();
        let own_test = root().join("tests/gpu").join(format!("{family}.rs"));
        let inside = |f: &Path| f.starts_with(root().join(folder)) || f == own_test;
        let entries = match kernel {
            Some(k) => {
                let cu = root().join("kernels").join(format!("{k}.cu"));
                kernel_entry_names(&std::fs::read_to_string(&cu).expect("kernel source"))
            }
            None => Vec::new(),
        };
        let reach_ins = [
            format!("{family}::cpu::"),
            format!("{family}::cuda::"),
            format!("{family}::{{cpu"),
            format!("{family}::{{cuda"),
        ];
        for f in &code_files {
            let own_cu = kernel.as_ref().is_some_and(|k| f == &root().join("kernels").join(format!("{k}.cu")));
            if inside(f) || own_cu {
                continue;
            }
            let text = code_of(&std::fs::read_to_string(f).expect("source"));
            for name in &entries {
                if names_word(&text, name) {
                    errors.push(format!("{}: names {family}'s kernel {name}", f.display()));
                }
            }
            // Reaching into a family's cpu/cuda module from elsewhere in the crate (tests and
            // benches may: they measure and check the kernels themselves).
            if f.starts_with(root().join("src")) {
                for pat in &reach_ins {
                    if text.contains(pat.as_str()) {
                        errors.push(format!("{}: reaches into {family}'s kernels (`{pat}`)", f.display()));
                    }
                }
            }
        }
    }
    assert!(errors.is_empty(), "family boundaries crossed:\n{}", errors.join("\n"));
}
