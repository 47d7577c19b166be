//! CUDA kernels against their CPU twins (src/cpu/) on seeded random inputs with awkward sizes:
//! one row, C = 3, C = 1000 and C > 1024, rows not a multiple of 32, logits of +-80, probabilities
//! that underflow so that the EPS clamp of the MI loss acts; forward and backward.
//!
//! Without a usable GPU each GPU test prints "skipped: <reason>" (straight to stderr, so it shows
//! even with captured output) and passes, unless REQUIRE_GPU=1, where it fails instead. The first
//! tests below need no GPU and always run: the dropout kernel's Philox indexing against the CPU op,
//! the kernel table against the sources, the embedded PTX, NVRTC on the sources (when libnvrtc is
//! found), and that probing never panics.
//!
//! Tolerances are stated per test, with the reason. Where the GPU does the CPU's operations in the
//! CPU's order (elementwise, dropout, max-pool, optimizer updates, BN eval) the test demands equal
//! bits; where a sum runs in another order, the tolerance is relative to the size of the quantity.
#![cfg(feature = "cuda")]

use muscle::cpu;
use muscle::cpu::optim::{AdamScalars, SgdScalars};
use muscle::cuda::device::{compile_with_nvrtc, nvrtc_present};
use muscle::cuda::embedded::KERNEL_FILES;
use muscle::cuda::kernels::{self as k, BatchStatsGpu, KERNELS};
use muscle::cuda::{probe, CudaSlice, DeviceRepr, Gpu};
use muscle::rng::Rng;
use muscle::{ErrorKind, Tape, Tensor};
use std::io::Write;
use std::sync::{Mutex, OnceLock};

// ---------------------------------------------------------------------------------------------
// The shared GPU (or why there is none).

enum Slot {
    Ready(Mutex<Gpu>),
    /// No usable GPU (probe failed): skip.
    Absent(String),
    /// A GPU is there but the kernels could not be loaded: every GPU test fails.
    Broken(String),
}

static GPU: OnceLock<Slot> = OnceLock::new();

/// Runs `f` with the process-wide GPU context (tests take turns), or reports the skip.
fn with_gpu(test: &str, f: impl FnOnce(&Gpu)) {
    let slot = GPU.get_or_init(|| match probe() {
        Err(e) => Slot::Absent(e.to_string()),
        Ok(_) => match Gpu::new(0) {
            Ok(g) => Slot::Ready(Mutex::new(g)),
            Err(e) => Slot::Broken(e.to_string()),
        },
    });
    match slot {
        Slot::Ready(m) => {
            let gpu = m.lock().unwrap_or_else(|e| e.into_inner());
            f(&gpu);
        }
        Slot::Broken(e) => panic!("{test}: a GPU is present but the CUDA backend failed: {e}"),
        Slot::Absent(reason) => {
            if std::env::var("REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("{test}: REQUIRE_GPU=1 but no usable GPU: {reason}");
            }
            skip(test, reason);
        }
    }
}

/// Prints a skip line past the test harness's output capture.
fn skip(test: &str, reason: &str) {
    let _ = writeln!(std::io::stderr(), "skipped: gpu::{test}: {reason}");
}

// ---------------------------------------------------------------------------------------------
// Helpers.

fn randv(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed, 0x6b1);
    (0..n).map(|_| std * r.normal()).collect()
}

/// Logits with every awkward row type: ordinary (std 3), rows at +-80 (exp underflows to 0 for
/// all but the largest entries), one-hot at 80 over -80, and a constant row.
fn awkward_logits(n: usize, c: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed, 0x6b2);
    let mut v = vec![0.0f32; n * c];
    for i in 0..n {
        let hot = r.below(c as u32) as usize;
        for j in 0..c {
            v[i * c + j] = match i % 5 {
                1 => {
                    if r.uniform() < 0.5 {
                        80.0
                    } else {
                        -80.0
                    }
                }
                3 => {
                    if j == hot {
                        80.0
                    } else {
                        -80.0 + r.uniform()
                    }
                }
                4 if i % 10 == 4 => 0.5,
                _ => 3.0 * r.normal(),
            };
        }
    }
    v
}

fn up<T: DeviceRepr>(gpu: &Gpu, v: &[T]) -> CudaSlice<T> {
    gpu.upload(v).expect("upload")
}

fn down<T: DeviceRepr>(gpu: &Gpu, s: &CudaSlice<T>) -> Vec<T> {
    gpu.download(s).expect("download")
}

fn zeros(gpu: &Gpu, n: usize) -> CudaSlice<f32> {
    gpu.zeros::<f32>(n).expect("alloc")
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |a, &b| a.max(b.abs()))
}

/// Every element within atol + rtol |want|.
fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(!err.is_nan() || (g.is_nan() && w.is_nan()), "{what}[{i}]: {g} vs {w}");
        let excess = err - (atol + rtol * w.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{what}[{i}]: {} vs cpu {} (rtol {rtol:e}, atol {atol:e})", got[i], want[i]);
}

/// max |got - want| <= tol * max |want| (for quantities whose individual entries may cancel).
fn assert_scaled(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite value on the GPU");
    let scale = max_abs(want);
    let (i, err) = got.iter().zip(want).map(|(g, w)| (g - w).abs()).enumerate().fold((0, 0.0f32), |a, (i, e)| {
        if e > a.1 {
            (i, e)
        } else {
            a
        }
    });
    assert!(
        err <= tol * scale,
        "{what}[{i}]: {} vs cpu {} (error {err:.3e} > {tol:e} x max {scale:.3e})",
        got[i],
        want[i]
    );
}

/// Equal bits (every NaN counts as equal to every NaN; 0 and -0 differ).
fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()), "{what}[{i}]: {g:e} vs cpu {w:e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tests that need no GPU.

#[test]
fn dropout_kernel_indexing_reproduces_the_cpu_op() {
    // The kernel gives element i word i % 4 of Philox block i / 4; ops::dropout draws
    // Rng::new(seed, stream).uniform() sequentially. On a tensor of ones the op's output is its
    // mask, so the two must agree exactly, for lengths around the block size of 4 and keys whose
    // high 32 bits matter.
    let keys = [(0u64, 0u64), (7, 1), (0x1234_5678_9abc_def0, u64::MAX - 5), (u64::MAX, 0x8000_0000_0000_0001)];
    for &(seed, stream) in &keys {
        for &n in &[1usize, 3, 4, 5, 8, 1023, 4099] {
            for &p in &[0.1f32, 0.5, 0.9] {
                let ones = Tensor::full(&[n], 1.0);
                let y = muscle::ops::dropout(&Tape::no_grad(), &ones, p, seed, stream).expect("dropout");
                let want = y.to_vec().expect("data");
                let got = k::dropout_mask_host(n, p, seed, stream);
                assert_bits(&format!("mask n {n} p {p} seed {seed:#x} stream {stream:#x}"), &got, &want);
            }
        }
    }
}

/// The `extern "C" __global__ void NAME(` definitions of a source.
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

#[test]
fn kernel_table_matches_the_sources() {
    let mut files: Vec<&str> = KERNEL_FILES.iter().map(|f| f.name).collect();
    let mut table: Vec<&str> = KERNELS.iter().map(|(f, _)| *f).collect();
    files.sort_unstable();
    table.sort_unstable();
    assert_eq!(files, table, "kernels/*.cu files vs cuda::kernels::KERNELS");
    for file in KERNEL_FILES {
        let mut defined = defined_kernels(file.source);
        let mut listed: Vec<String> = KERNELS
            .iter()
            .find(|(f, _)| *f == file.name)
            .map(|(_, n)| n.iter().map(|s| s.to_string()).collect())
            .unwrap();
        defined.sort();
        listed.sort();
        assert_eq!(defined, listed, "kernels/{}.cu definitions vs the table", file.name);
        for name in &defined {
            assert!(name.ends_with("_fwd_f32") || name.ends_with("_bwd_f32"), "{name}: not <op>_<fwd|bwd>_f32");
            // Each kernel has a header comment naming it (what it computes and why).
            assert!(file.source.contains(&format!("// {name}")), "{name}: no header comment");
        }
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

#[test]
fn mi_partition_depends_on_sizes_only() {
    assert_eq!(k::mi_rows_per_part(1, 10), 256);
    assert_eq!(k::mi_rows_per_part(65_536, 10), 256);
    assert_eq!(k::mi_rows_per_part(65_536, 1000), 8192);
    assert!(k::bn_splits(1, 1) == 1 && k::bn_splits(576, 784) <= 256);
}

// ---------------------------------------------------------------------------------------------
// softmax.cu

#[test]
fn softmax_and_log_softmax_match_cpu() {
    with_gpu("softmax_and_log_softmax_match_cpu", |gpu| {
        for (t, &(n, c)) in
            [(1usize, 3usize), (37, 10), (1000, 3), (33, 1000), (5, 1025), (3, 2000), (64, 100)].iter().enumerate()
        {
            let what = format!("n {n} C {c}");
            let x = awkward_logits(n, c, 10 + t as u64);
            let dy = randv(n * c, 1.0, 20 + t as u64);
            let (xd, dyd) = (up(gpu, &x), up(gpu, &dy));
            let mut y = zeros(gpu, n * c);
            let mut dx = zeros(gpu, n * c);

            // Probabilities: 1e-5 relative (exp is within 2 ulp on both sides; only the order of
            // the f32 row sum differs, ~1e-6 relative at C = 2000); atol 1e-37 for denormal
            // results, whose relative precision is lower.
            let mut want = vec![0.0; n * c];
            cpu::softmax::softmax_forward(&x, c, &mut want);
            k::softmax_fwd(gpu, &xd, &mut y, n, c).unwrap();
            let yv = down(gpu, &y);
            assert_close(&format!("softmax {what}"), &yv, &want, 1e-5, 1e-37);
            // Backward from the CPU's y (so only the kernel differs): dy - <y, dy> cancels, so the
            // error is measured against the largest gradient: 1e-5.
            let yc = up(gpu, &want);
            let mut wantd = vec![0.0; n * c];
            cpu::softmax::softmax_backward(&want, &dy, c, &mut wantd);
            k::softmax_bwd(gpu, &yc, &dyd, &mut dx, n, c).unwrap();
            assert_scaled(&format!("softmax backward {what}"), &down(gpu, &dx), &wantd, 1e-5);

            // Log-softmax: values up to 160 in magnitude; one ulp of 160 is 1.5e-5, so 1e-6
            // relative plus 2e-5 absolute.
            cpu::softmax::log_softmax_forward(&x, c, &mut want);
            k::log_softmax_fwd(gpu, &xd, &mut y, n, c).unwrap();
            assert_close(&format!("log_softmax {what}"), &down(gpu, &y), &want, 1e-6, 2e-5);
            let yc = up(gpu, &want);
            cpu::softmax::log_softmax_backward(&want, &dy, c, &mut wantd);
            k::log_softmax_bwd(gpu, &yc, &dyd, &mut dx, n, c).unwrap();
            assert_scaled(&format!("log_softmax backward {what}"), &down(gpu, &dx), &wantd, 1e-5);
        }
    });
}

#[test]
fn cross_entropy_hard_matches_cpu() {
    with_gpu("cross_entropy_hard_matches_cpu", |gpu| {
        for (t, &(n, c)) in [(1usize, 3usize), (37, 10), (1000, 10), (33, 1000), (5, 1025)].iter().enumerate() {
            let what = format!("n {n} C {c}");
            let x = awkward_logits(n, c, 30 + t as u64);
            let mut r = Rng::new(40 + t as u64, 1);
            let labels: Vec<usize> = (0..n).map(|_| r.below(c as u32) as usize).collect();
            let mut want_grad = vec![0.0; n * c];
            let want = cpu::softmax::cross_entropy_hard(&x, &labels, c, &mut want_grad);
            let li: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
            let (xd, ld) = (up(gpu, &x), up(gpu, &li));
            let mut grad = zeros(gpu, n * c);
            let loss = down(gpu, &k::cross_entropy_hard(gpu, &xd, &ld, &mut grad, n, c).unwrap())[0];
            // Both sum the row losses in f64; each row's logsumexp l may differ by an ulp (7.6e-6
            // at |l| = 80): 1e-5 relative to max(1, |loss|).
            assert!((loss - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}: loss {loss} vs cpu {want}");
            // exp(x - l) inherits l's ulp as a relative error (7.6e-6 at 80): 1e-4 of the largest
            // gradient entry.
            assert_scaled(&format!("grad {what}"), &down(gpu, &grad), &want_grad, 1e-4);
        }
        // A label outside [0, C) cannot be checked on the host without a copy: the loss says NaN.
        let (xd, ld) = (up(gpu, &[0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0]), up(gpu, &[1i32, 3]));
        let mut grad = zeros(gpu, 6);
        let loss = down(gpu, &k::cross_entropy_hard(gpu, &xd, &ld, &mut grad, 2, 3).unwrap())[0];
        assert!(loss.is_nan(), "out-of-range label gave loss {loss}");
    });
}

#[test]
fn cross_entropy_soft_matches_cpu() {
    with_gpu("cross_entropy_soft_matches_cpu", |gpu| {
        for (t, &(n, c)) in [(1usize, 3usize), (37, 10), (1000, 10), (33, 1000), (5, 1025)].iter().enumerate() {
            let what = format!("n {n} C {c}");
            let x = awkward_logits(n, c, 50 + t as u64);
            // Targets: softmax rows of random logits, every third row scaled by 0.7 (weights that
            // do not sum to 1 exercise the sum(q) factor of the gradient).
            let mut q = vec![0.0; n * c];
            cpu::softmax::softmax_forward(&randv(n * c, 2.0, 60 + t as u64), c, &mut q);
            for (i, row) in q.chunks_mut(c).enumerate() {
                if i % 3 == 2 {
                    row.iter_mut().for_each(|v| *v *= 0.7);
                }
            }
            let mut want_grad = vec![0.0; n * c];
            let want = cpu::softmax::cross_entropy_soft(&x, &q, c, &mut want_grad);
            let (xd, qd) = (up(gpu, &x), up(gpu, &q));
            let mut grad = zeros(gpu, n * c);
            let loss = down(gpu, &k::cross_entropy_soft(gpu, &xd, &qd, &mut grad, n, c).unwrap())[0];
            // As for hard labels (same logsumexp, f64 loss sums on both sides).
            assert!((loss - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}: loss {loss} vs cpu {want}");
            assert_scaled(&format!("grad {what}"), &down(gpu, &grad), &want_grad, 1e-4);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// mutual_info.cu

/// Runs the GPU MI forward + backward and checks it against the CPU twin (and, when `reference`,
/// the independent f64 reference `mi_loss_f64`). Tolerances: the joint J is summed in a
/// different order (f32 within parts of 256+ rows, f64 across) than on the CPU, so P differs by
/// ~1e-6 relative and the loss by far less (its errors average out): 1e-5 relative to
/// max(1, |L|); the gradients are f32 products with G^ through a cancelling softmax backward,
/// checked at 1e-4 of their largest entry, as the CPU kernel is checked against f64.
fn check_mi(gpu: &Gpu, a: &[f32], b: &[f32], n: usize, c: usize, lambda: f32, reference: bool, what: &str) {
    let cpu_f = cpu::mutual_info::forward(a, b, n, c, lambda);
    let (mut ca, mut cb) = (vec![0.0; n * c], vec![0.0; n * c]);
    cpu::mutual_info::backward(&cpu_f, n, c, 1.0, &mut ca, &mut cb);

    let (ad, bd) = (up(gpu, a), up(gpu, b));
    let f = k::mi_fwd(gpu, &ad, &bd, n, c, lambda).unwrap_or_else(|e| panic!("{what}: {e}"));
    let (mut ga, mut gb) = (zeros(gpu, n * c), zeros(gpu, n * c));
    k::mi_bwd(gpu, &f, 1.0, &mut ga, &mut gb).unwrap_or_else(|e| panic!("{what}: {e}"));
    let s = f.scalars(gpu).unwrap();
    let loss32 = down(gpu, &f.loss)[0];

    let want = cpu_f.loss as f64;
    assert!((s.loss - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}: loss {} vs cpu {want}", s.loss);
    assert_eq!(loss32, s.loss as f32, "{what}: f32 loss is the f64 loss rounded");
    assert!((s.s - cpu_f.s).abs() <= 1e-5 * cpu_f.s, "{what}: s {} vs cpu {}", s.s, cpu_f.s);
    assert!((s.joint_entropy - cpu_f.joint_entropy).abs() <= 1e-5 * cpu_f.joint_entropy.abs().max(1.0), "{what}: H(P)");
    assert!(
        (s.marginal_entropy - cpu_f.marginal_entropy).abs() <= 1e-5 * cpu_f.marginal_entropy.abs().max(1.0),
        "{what}: H(m)"
    );
    assert_eq!((s.clamped, s.clamped_marginals), (cpu_f.clamped, cpu_f.clamped_marginals), "{what}: clamp counts");

    // z, w: the softmax, as in softmax_and_log_softmax_match_cpu.
    assert_close(&format!("{what}: z"), &down(gpu, &f.z), &cpu_f.z_rows(), 1e-5, 1e-37);
    assert_close(&format!("{what}: w"), &down(gpu, &f.w), &cpu_f.w_rows(), 1e-5, 1e-37);
    // P: 1e-5 relative; entries below 1e-14 (sums of products of underflowing probabilities, far
    // under the EPS clamp, so only their clamped-ness matters) are compared absolutely.
    let p = down(gpu, &f.p);
    for (i, (&g, &w)) in p.iter().zip(&cpu_f.p).enumerate() {
        assert!((g - w).abs() <= 1e-5 * w.abs() + 1e-14, "{what}: P[{i}] {g:e} vs cpu {w:e}");
    }
    // G^ entries are -ln P + O(1): an error of 1e-6 relative in P moves them by 1e-6 absolute.
    assert_scaled(&format!("{what}: G^"), &down(gpu, &f.g_hat), &cpu_f.g_hat, 1e-4);
    assert_scaled(&format!("{what}: G0"), &down(gpu, &f.g0), &cpu_f.g0, 1e-4);

    let (gav, gbv) = (down(gpu, &ga), down(gpu, &gb));
    assert_scaled(&format!("{what}: grad a"), &gav, &ca, 1e-4);
    assert_scaled(&format!("{what}: grad b"), &gbv, &cb, 1e-4);
    if reference {
        let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let (l, ra, rb) = cpu::mutual_info::mi_loss_f64(&a64, &b64, n, c, lambda as f64);
        assert!((s.loss - l).abs() <= 1e-5 * l.abs().max(1.0), "{what}: loss {} vs f64 reference {l}", s.loss);
        for (name, got, r) in [("a", &gav, &ra), ("b", &gbv, &rb)] {
            let scale = r.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let err = got.iter().zip(r.iter()).fold(0.0f64, |m, (g, r)| m.max((*g as f64 - r).abs()));
            assert!(
                err <= 1e-4 * scale + 1e-7,
                "{what}: grad {name} off the f64 reference by {err:.3e} (max {scale:.3e})"
            );
        }
    }
}

#[test]
fn mi_matches_cpu_and_f64_reference() {
    with_gpu("mi_matches_cpu_and_f64_reference", |gpu| {
        // C <= 32 runs the fused kernels, C > 32 the tiled ones; n = 4099 spans 17 parts; C = 1000
        // at n = 2500 spans 3 parts of 64 x 64 tiles with ragged edges.
        let cases = [
            (1usize, 2usize, true),
            (1, 3, true),
            (5, 3, true),
            (37, 10, true),
            (1000, 10, true),
            (4099, 10, false),
            (40, 32, true),
            (300, 33, true),
            (1000, 100, true),
            (77, 257, true),
            (2500, 1000, false),
        ];
        for (t, &(n, c, reference)) in cases.iter().enumerate() {
            let a = randv(n * c, 2.0, 100 + t as u64);
            let b = randv(n * c, 2.0, 500 + t as u64);
            for lambda in [1.0f32, 1.5] {
                check_mi(gpu, &a, &b, n, c, lambda, reference, &format!("n {n} C {c} lambda {lambda}"));
            }
        }
    });
}

#[test]
fn mi_with_extreme_logits_and_active_clamp_matches_cpu() {
    with_gpu("mi_with_extreme_logits_and_active_clamp_matches_cpu", |gpu| {
        // Classes 3, 4, 5 sit at logits -40, -25, -12 (the CPU module's clamp test): P entries
        // among them underflow below EPS and class 3's marginal is clamped too.
        let (n, c) = (12, 6);
        let mut r = Rng::new(5, 3);
        let mut make = || -> Vec<f32> {
            let mut v = vec![0.0f32; n * c];
            for i in 0..n {
                for x in 0..c {
                    let bias = [0.0, 0.0, 0.0, -40.0, -25.0, -12.0][x];
                    let lead = if x == i % 3 { 2.0 } else { 0.0 };
                    v[i * c + x] = bias + lead + 1.5 * r.normal();
                }
            }
            v
        };
        let (a, b) = (make(), make());
        for lambda in [1.0f32, 1.5] {
            check_mi(gpu, &a, &b, n, c, lambda, true, &format!("clamp lambda {lambda}"));
        }
        // One-hot logits at 80 (P = I / C: every off-diagonal entry clamped), and +-80 rows, for
        // the fused (C = 10) and tiled (C = 40) paths.
        for &(n, c) in &[(30usize, 10usize), (80, 40)] {
            let mut a = vec![-80.0f32; n * c];
            for i in 0..n {
                a[i * c + i % c] = 80.0;
            }
            let f = k::mi_fwd(gpu, &up(gpu, &a), &up(gpu, &a), n, c, 1.0).unwrap();
            let s = f.scalars(gpu).unwrap();
            assert!((s.loss + (c as f64).ln()).abs() < 1e-5, "P = I/C, C {c}: loss {} vs -ln C", s.loss);
            assert_eq!(s.clamped, c * c - c);
            let b = awkward_logits(n, c, 77);
            let a = awkward_logits(n, c, 78);
            check_mi(gpu, &a, &b, n, c, 1.0, true, &format!("+-80 logits C {c}"));
        }
    });
}

#[test]
fn mi_uniform_outputs_give_the_known_loss_and_zero_gradient() {
    with_gpu("mi_uniform_outputs_give_the_known_loss_and_zero_gradient", |gpu| {
        for &(n, c) in &[(24usize, 10usize), (70, 50)] {
            let (a, b) = (vec![0.7f32; n * c], vec![-1.3f32; n * c]);
            for lambda in [1.0f32, 1.5] {
                let f = k::mi_fwd(gpu, &up(gpu, &a), &up(gpu, &b), n, c, lambda).unwrap();
                let (mut ga, mut gb) = (zeros(gpu, n * c), zeros(gpu, n * c));
                k::mi_bwd(gpu, &f, 1.0, &mut ga, &mut gb).unwrap();
                let s = f.scalars(gpu).unwrap();
                let want = 2.0 * (1.0 - lambda as f64) * (c as f64).ln();
                assert!((s.loss - want).abs() < 1e-6, "C {c} lambda {lambda}: loss {} vs {want}", s.loss);
                // Zero in exact arithmetic; f32 rows that do not sum to exactly 1 leave ~1e-7.
                let m = max_abs(&down(gpu, &ga)).max(max_abs(&down(gpu, &gb)));
                assert!(m < 1e-6, "C {c} lambda {lambda}: gradient {m}");
            }
        }
    });
}

#[test]
fn mi_is_deterministic_and_scales_with_upstream() {
    with_gpu("mi_is_deterministic_and_scales_with_upstream", |gpu| {
        for &(n, c) in &[(3000usize, 10usize), (1000, 100)] {
            let (a, b) = (up(gpu, &randv(n * c, 2.0, 1)), up(gpu, &randv(n * c, 2.0, 2)));
            let run = |upstream: f32| {
                let f = k::mi_fwd(gpu, &a, &b, n, c, 1.5).unwrap();
                let (mut ga, mut gb) = (zeros(gpu, n * c), zeros(gpu, n * c));
                k::mi_bwd(gpu, &f, upstream, &mut ga, &mut gb).unwrap();
                (down(gpu, &f.stats), down(gpu, &ga), down(gpu, &gb))
            };
            let (s1, a1, b1) = run(1.0);
            let (s2, a2, b2) = run(1.0);
            // Fixed partition and reduction order, no atomics: the same bits every time.
            assert!(s1.iter().zip(&s2).all(|(x, y)| x.to_bits() == y.to_bits()), "C {c}: stats differ between runs");
            assert_bits(&format!("C {c}: grad a rerun"), &a2, &a1);
            assert_bits(&format!("C {c}: grad b rerun"), &b2, &b1);
            // upstream = -2.5: scale = upstream / s is one f32 rounding away from -2.5 / s.
            let (_, a3, b3) = run(-2.5);
            let want: Vec<f32> = a1.iter().chain(&b1).map(|v| -2.5 * v).collect();
            let got: Vec<f32> = a3.iter().chain(&b3).copied().collect();
            assert_scaled(&format!("C {c}: upstream -2.5"), &got, &want, 1e-6);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// elementwise.cu

#[test]
fn leaky_relu_add_scale_match_cpu_bitwise() {
    with_gpu("leaky_relu_add_scale_match_cpu_bitwise", |gpu| {
        // One IEEE operation per element on both sides: equal bits.
        for &n in &[1usize, 31, 1000, 100_003] {
            let x = randv(n, 1.0, 3);
            let dy = randv(n, 1.0, 4);
            let (xd, dyd) = (up(gpu, &x), up(gpu, &dy));
            let mut out = zeros(gpu, n);
            let mut want = vec![0.0; n];
            for slope in [0.0f32, 0.1] {
                cpu::activation::leaky_relu_forward(&x, slope, &mut want);
                k::leaky_relu_fwd(gpu, &xd, &mut out, n, slope).unwrap();
                assert_bits(&format!("leaky_relu n {n} slope {slope}"), &down(gpu, &out), &want);
                cpu::activation::leaky_relu_backward(&x, &dy, slope, &mut want);
                k::leaky_relu_bwd(gpu, &xd, &dyd, &mut out, n, slope).unwrap();
                assert_bits(&format!("leaky_relu backward n {n} slope {slope}"), &down(gpu, &out), &want);
            }
            cpu::activation::add(&x, &dy, &mut want);
            k::add_fwd(gpu, &xd, &dyd, &mut out, n).unwrap();
            assert_bits(&format!("add n {n}"), &down(gpu, &out), &want);
            cpu::activation::scale(&x, -0.37, &mut want);
            k::scale_fwd(gpu, &xd, &mut out, n, -0.37).unwrap();
            assert_bits(&format!("scale n {n}"), &down(gpu, &out), &want);
        }
    });
}

#[test]
fn dropout_mask_matches_cpu_bitwise() {
    with_gpu("dropout_mask_matches_cpu_bitwise", |gpu| {
        for &(seed, stream) in &[(7u64, 1u64), (0x1234_5678_9abc_def0, u64::MAX - 5)] {
            for &n in &[1usize, 3, 4, 5, 1023, 100_003] {
                for &p in &[0.0f32, 0.1, 0.5, 0.9] {
                    let what = format!("n {n} p {p} seed {seed:#x}");
                    let x = randv(n, 1.0, 8);
                    let xd = up(gpu, &x);
                    let (mut y, mut mask) = (zeros(gpu, n), zeros(gpu, n));
                    k::dropout_fwd(gpu, &xd, &mut y, &mut mask, n, p, seed, stream).unwrap();
                    let want_mask = k::dropout_mask_host(n, p, seed, stream);
                    assert_bits(&format!("mask {what}"), &down(gpu, &mask), &want_mask);
                    let want_y: Vec<f32> = x.iter().zip(&want_mask).map(|(a, m)| a * m).collect();
                    assert_bits(&format!("y {what}"), &down(gpu, &y), &want_y);
                    let mut dx = zeros(gpu, n);
                    k::dropout_bwd(gpu, &xd, &mask, &mut dx, n).unwrap();
                    assert_bits(&format!("backward {what}"), &down(gpu, &dx), &want_y);
                    if p > 0.0 && n > 1000 {
                        let dropped = want_mask.iter().filter(|&&m| m == 0.0).count() as f32 / n as f32;
                        assert!((dropped - p).abs() < 0.05, "{what}: dropped {dropped}");
                    }
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// batchnorm.cu

#[test]
fn batchnorm_train_matches_cpu() {
    with_gpu("batchnorm_train_matches_cpu", |gpu| {
        let eps = 1e-5f32;
        for (t, &(n, c, hw)) in
            [(1usize, 3usize, 1usize), (2, 3, 5), (7, 16, 49), (3, 5, 4099), (64, 32, 196)].iter().enumerate()
        {
            // |mean| >> std in channel 0 exercises the shifted one-pass variance.
            let mut x = randv(n * c * hw, 2.0, 200 + t as u64);
            for (i, v) in x.iter_mut().enumerate() {
                if (i / hw) % c == 0 {
                    *v = 10.0 + 0.1 * *v;
                }
            }
            let gamma: Vec<f32> = randv(c, 0.5, 300 + t as u64).iter().map(|v| 1.0 + v).collect();
            let beta = randv(c, 0.5, 400 + t as u64);
            let dy = randv(n * c * hw, 1.0, 500 + t as u64);
            let (xd, gd, bd, dyd) = (up(gpu, &x), up(gpu, &gamma), up(gpu, &beta), up(gpu, &dy));
            for slope in [None, Some(0.1f32)] {
                let what = format!("n {n} C {c} hw {hw} slope {slope:?}");
                let mut want_y = vec![0.0; x.len()];
                let st = cpu::batchnorm::forward_train(&x, n, c, hw, &gamma, &beta, eps, slope, &mut want_y);
                let mut y = zeros(gpu, x.len());
                let gs = k::batchnorm_train_fwd(gpu, &xd, n, c, hw, &gd, &bd, eps, slope, &mut y).unwrap();
                // Statistics: f64 sums on the GPU, f32 lanes then f64 on the CPU: 1e-5 relative
                // (mean against its scale plus the spread, var and invstd elementwise).
                let mean = down(gpu, &gs.mean);
                for (ch, (&got, (&want, &var))) in mean.iter().zip(st.mean.iter().zip(&st.var)).enumerate() {
                    let tol = 1e-5 * (want.abs() + var.sqrt()) + 1e-7;
                    assert!((got - want).abs() <= tol, "{what}: mean[{ch}] {got} vs cpu {want}");
                }
                assert_close(&format!("{what}: var"), &down(gpu, &gs.var), &st.var, 1e-4, 1e-9);
                assert_close(&format!("{what}: invstd"), &down(gpu, &gs.invstd), &st.invstd, 1e-4, 0.0);
                // y: the folded scale and shift may differ in the last bits: 1e-5 of max |y|.
                assert_scaled(&format!("{what}: y"), &down(gpu, &y), &want_y, 1e-5);

                // Backward from the CPU's statistics, so that xhat and the activation mask are
                // the same bits on both sides (a flipped mask at z = 0 would be an O(1) error for
                // reasons of rounding, not of the kernel); only the sums' order differs: 1e-4 of
                // the largest entry.
                let cs = BatchStatsGpu {
                    mean: up(gpu, &st.mean),
                    var: up(gpu, &st.var),
                    invstd: up(gpu, &st.invstd),
                    scale: zeros(gpu, c),
                    shift: zeros(gpu, c),
                };
                let (mut want_dx, mut want_dg, mut want_db) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
                cpu::batchnorm::backward_train(
                    &x,
                    &dy,
                    n,
                    c,
                    hw,
                    &gamma,
                    &beta,
                    slope,
                    &st,
                    Some(&mut want_dx),
                    &mut want_dg,
                    &mut want_db,
                );
                let (mut dx, mut dg, mut db) = (zeros(gpu, x.len()), zeros(gpu, c), zeros(gpu, c));
                k::batchnorm_train_bwd(gpu, &xd, &dyd, n, c, hw, &gd, &bd, slope, &cs, Some(&mut dx), &mut dg, &mut db)
                    .unwrap();
                assert_scaled(&format!("{what}: dx"), &down(gpu, &dx), &want_dx, 1e-4);
                assert_scaled(&format!("{what}: dgamma"), &down(gpu, &dg), &want_dg, 1e-4);
                assert_scaled(&format!("{what}: dbeta"), &down(gpu, &db), &want_db, 1e-4);
                // Without dx: the parameter gradients alone.
                let (mut dg2, mut db2) = (zeros(gpu, c), zeros(gpu, c));
                k::batchnorm_train_bwd(gpu, &xd, &dyd, n, c, hw, &gd, &bd, slope, &cs, None, &mut dg2, &mut db2)
                    .unwrap();
                assert_bits(&format!("{what}: dgamma without dx"), &down(gpu, &dg2), &down(gpu, &dg));
            }
        }
    });
}

#[test]
fn batchnorm_eval_matches_cpu_bitwise() {
    with_gpu("batchnorm_eval_matches_cpu_bitwise", |gpu| {
        // The same f32 operations in the same order, none contracted: equal bits.
        let (n, c, hw) = (5usize, 7usize, 33usize);
        let x = randv(n * c * hw, 2.0, 600);
        let gamma = randv(c, 1.0, 601);
        let beta = randv(c, 1.0, 602);
        let mean = randv(c, 1.0, 603);
        let var: Vec<f32> = randv(c, 1.0, 604).iter().map(|v| v * v + 0.01).collect();
        let d: Vec<CudaSlice<f32>> = [&x, &gamma, &beta, &mean, &var].iter().map(|v| up(gpu, v)).collect();
        for slope in [None, Some(0.1f32)] {
            let mut want = vec![0.0; x.len()];
            cpu::batchnorm::forward_eval(&x, c, hw, &gamma, &beta, &mean, &var, 1e-5, slope, &mut want);
            let mut y = zeros(gpu, x.len());
            k::batchnorm_eval_fwd(gpu, &d[0], n, c, hw, &d[1], &d[2], &d[3], &d[4], 1e-5, slope, &mut y).unwrap();
            assert_bits(&format!("eval slope {slope:?}"), &down(gpu, &y), &want);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// pool.cu

#[test]
fn maxpool2_matches_cpu_with_ties_and_nan() {
    with_gpu("maxpool2_matches_cpu_with_ties_and_nan", |gpu| {
        for &(planes, h, w) in &[(1usize, 2usize, 2usize), (3, 7, 6), (5, 9, 11), (64 * 32, 28, 28)] {
            let what = format!("{planes} x {h} x {w}");
            // Few distinct values (ties everywhere) and some NaNs: the first maximum in row-major
            // window order wins, and a NaN wins over numbers.
            let mut x: Vec<f32> = (0..planes * h * w).map(|i| ((i * 7919) % 13) as f32).collect();
            for i in (5..x.len()).step_by(97) {
                x[i] = f32::NAN;
            }
            let (ho, wo) = (h / 2, w / 2);
            let out = planes * ho * wo;
            let (mut want_y, mut want_a) = (vec![0.0; out], vec![0u8; out]);
            cpu::pool::maxpool_forward(&x, planes, h, w, 2, &mut want_y, &mut want_a);
            let xd = up(gpu, &x);
            let mut y = zeros(gpu, out);
            let mut arg = gpu.zeros::<u8>(out).unwrap();
            k::maxpool2_fwd(gpu, &xd, planes, h, w, &mut y, &mut arg).unwrap();
            assert_bits(&format!("{what}: y"), &down(gpu, &y), &want_y);
            assert_eq!(down(gpu, &arg), want_a, "{what}: argmax");
            let dy = randv(out, 1.0, 9);
            let mut want_dx = vec![0.0; planes * h * w];
            cpu::pool::maxpool_backward(&dy, &want_a, planes, h, w, 2, &mut want_dx);
            let mut dx = zeros(gpu, planes * h * w);
            k::maxpool2_bwd(gpu, &up(gpu, &dy), &arg, planes, h, w, &mut dx).unwrap();
            // Values, not bits: the CPU writes 0 + dy, the GPU dy (they differ only for -0.0).
            assert_close(&format!("{what}: dx"), &down(gpu, &dx), &want_dx, 0.0, 0.0);
        }
    });
}

#[test]
fn avgpool_matches_cpu() {
    with_gpu("avgpool_matches_cpu", |gpu| {
        for &(planes, hw) in &[(1usize, 1usize), (3, 7), (37, 49), (576 * 64, 49), (10, 4099)] {
            let what = format!("{planes} x {hw}");
            let x = randv(planes * hw, 1.0, 11);
            let mut want = vec![0.0; planes];
            cpu::pool::avgpool_forward(&x, hw, &mut want);
            let mut y = zeros(gpu, planes);
            k::avgpool_fwd(gpu, &up(gpu, &x), planes, hw, &mut y).unwrap();
            // Sequential f32 sum on the CPU, a shuffle tree on the GPU: both within hw ulps of the
            // sum, i.e. ~1e-7 of max |x| after the division: 1e-6 of max |x|.
            let tol = 1e-6 * max_abs(&x);
            assert_close(&format!("{what}: y"), &down(gpu, &y), &want, 0.0, tol);
            let dy = randv(planes, 1.0, 12);
            let mut want_dx = vec![0.0; planes * hw];
            cpu::pool::avgpool_backward(&dy, hw, &mut want_dx);
            let mut dx = zeros(gpu, planes * hw);
            k::avgpool_bwd(gpu, &up(gpu, &dy), planes, hw, &mut dx).unwrap();
            assert_bits(&format!("{what}: dx"), &down(gpu, &dx), &want_dx);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// optim.cu

#[test]
fn adam_and_adamw_match_cpu_bitwise() {
    with_gpu("adam_and_adamw_match_cpu_bitwise", |gpu| {
        // The same operations in the same order with the same roundings (no FMA contraction):
        // equal bits after every step.
        let n = 4099;
        let configs = [
            (2e-3f32, 0.9f32, 0.999f32, 1e-8f32, 5e-4f32, true),
            (1e-2, 0.9, 0.999, 1e-8, 0.1, false),
            (1e-3, 0.3, 0.99, 1e-6, 0.0, true), // 1 - beta1 = 0.7 >= 0.5: lerp's other branch
        ];
        for (t, &(lr, b1, b2, eps, wd, decoupled)) in configs.iter().enumerate() {
            let mut p = randv(n, 1.0, 700 + t as u64);
            let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
            let (mut pd, mut md, mut vd) = (up(gpu, &p), zeros(gpu, n), zeros(gpu, n));
            for step in 1..=5u64 {
                let g = randv(n, 0.1, 800 + step);
                let s = AdamScalars::new(lr, b1, b2, eps, wd, decoupled, step);
                cpu::optim::adam_step(&mut p, &g, &mut m, &mut v, &s);
                k::adam_step(gpu, &mut pd, &up(gpu, &g), &mut md, &mut vd, n, &s).unwrap();
                let what = format!("config {t} step {step}");
                assert_bits(&format!("{what}: param"), &down(gpu, &pd), &p);
                assert_bits(&format!("{what}: exp_avg"), &down(gpu, &md), &m);
                assert_bits(&format!("{what}: exp_avg_sq"), &down(gpu, &vd), &v);
            }
        }
    });
}

#[test]
fn sgd_and_ema_match_cpu_bitwise() {
    with_gpu("sgd_and_ema_match_cpu_bitwise", |gpu| {
        let n = 1003;
        let configs = [(0.1f32, 0.0f32, 0.0f32, false), (0.05, 0.9, 5e-4, false), (0.05, 0.9, 5e-4, true)];
        for (t, &(lr, momentum, weight_decay, nesterov)) in configs.iter().enumerate() {
            let s = SgdScalars { lr, momentum, weight_decay, nesterov };
            let mut p = randv(n, 1.0, 900 + t as u64);
            let mut buf = vec![0.0f32; n];
            let (mut pd, mut bd) = (up(gpu, &p), zeros(gpu, n));
            for step in 0..3u64 {
                let g = randv(n, 0.1, 950 + step);
                let gd = up(gpu, &g);
                if momentum == 0.0 {
                    cpu::optim::sgd_step(&mut p, &g, None, &s);
                    k::sgd_step(gpu, &mut pd, &gd, None, n, &s).unwrap();
                } else {
                    cpu::optim::sgd_step(&mut p, &g, Some(&mut buf), &s);
                    k::sgd_step(gpu, &mut pd, &gd, Some(&mut bd), n, &s).unwrap();
                    assert_bits(&format!("sgd {t} step {step}: buffer"), &down(gpu, &bd), &buf);
                }
                assert_bits(&format!("sgd {t} step {step}: param"), &down(gpu, &pd), &p);
            }
        }
        let mut avg = randv(n, 1.0, 990);
        let mut ad = up(gpu, &avg);
        for (t, decay) in [0.999f32, 0.5, (1.0 + 3.0) / (10.0 + 3.0)].into_iter().enumerate() {
            let value = randv(n, 1.0, 991 + t as u64);
            cpu::optim::ema_update(&mut avg, &value, decay);
            k::ema_update(gpu, &mut ad, &up(gpu, &value), n, decay).unwrap();
            assert_bits(&format!("ema decay {decay}"), &down(gpu, &ad), &avg);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// cuBLAS

#[test]
fn sgemm_matches_reference_for_every_transpose() {
    with_gpu("sgemm_matches_reference_for_every_transpose", |gpu| {
        if let Err(e) = gpu.blas() {
            if std::env::var("REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("REQUIRE_GPU=1 but {e}");
            }
            skip("sgemm_matches_reference_for_every_transpose", e.message());
            return;
        }
        for &(m, n, kk) in &[(1usize, 1usize, 1usize), (3, 5, 7), (64, 33, 100), (130, 70, 257)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let what = format!("{m} x {n} x {kk} trans {ta} {tb}");
                let a = randv(m * kk, 1.0, 1);
                let b = randv(kk * n, 1.0, 2);
                let c0 = randv(m * n, 1.0, 3);
                let at = |i: usize, l: usize| if ta { a[l * m + i] } else { a[i * kk + l] };
                let bt = |l: usize, j: usize| if tb { b[j * kk + l] } else { b[l * n + j] };
                let want: Vec<f32> = (0..m * n)
                    .map(|e| {
                        let (i, j) = (e / n, e % n);
                        let dot: f64 = (0..kk).map(|l| at(i, l) as f64 * bt(l, j) as f64).sum();
                        (1.5 * dot + 0.5 * c0[e] as f64) as f32
                    })
                    .collect();
                let mut c = up(gpu, &c0);
                k::sgemm(gpu, m, n, kk, &up(gpu, &a), ta, &up(gpu, &b), tb, &mut c, 1.5, 0.5).unwrap();
                // f32 accumulation over k <= 257 terms against an f64 reference: 1e-5 of the
                // largest entry.
                assert_scaled(&what, &down(gpu, &c), &want, 1e-5);
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Timings (opt-in: `main gpu::kernel_timings --ignored --nocapture`, as scripts/gpu-check.sh
// runs it). Prints, asserts nothing about speed.

/// Mean wall time per call of `f` over `iters` calls after 3 warm-up calls, in microseconds.
fn time_us(gpu: &Gpu, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    gpu.synchronize().unwrap();
    let t = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    gpu.synchronize().unwrap();
    t.elapsed().as_secs_f64() * 1e6 / iters as f64
}

#[test]
#[ignore = "timing report for a GPU machine (scripts/gpu-check.sh)"]
fn kernel_timings_against_the_floor() {
    with_gpu("kernel_timings_against_the_floor", |gpu| {
        let bw = 3e12; // bytes/s: the floor of kernels/README.md
        let mut out = std::io::stderr().lock();
        let _ = writeln!(out, "gpu: {}", gpu.info());
        let _ = writeln!(out, "| op | n | C | us per call | floor us (3 TB/s) |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        let n = 65_536;
        for c in [10usize, 100] {
            let a = up(gpu, &randv(n * c, 2.0, 1));
            let b = up(gpu, &randv(n * c, 2.0, 2));
            let labels: Vec<i32> = (0..n).map(|i| (i % c) as i32).collect();
            let ld = up(gpu, &labels);
            let mut grad = zeros(gpu, n * c);
            let t = time_us(gpu, 50, || {
                k::cross_entropy_hard(gpu, &a, &ld, &mut grad, n, c).unwrap();
            });
            let floor = (8 * n * c + 12 * n) as f64 / bw * 1e6;
            let _ = writeln!(out, "| softmax-CE hard (fwd+grad) | {n} | {c} | {t:.1} | {floor:.1} |");
            let t = time_us(gpu, 50, || {
                k::mi_fwd(gpu, &a, &b, n, c, 1.0).unwrap();
            });
            let parts = n.div_ceil(k::mi_rows_per_part(n, c));
            let fwd_bytes = if c <= k::MI_FUSED_MAX_C { 16 * n * c } else { 24 * n * c } + 8 * parts * c * c;
            let _ = writeln!(out, "| MI forward | {n} | {c} | {t:.1} | {:.1} |", fwd_bytes as f64 / bw * 1e6);
            let f = k::mi_fwd(gpu, &a, &b, n, c, 1.0).unwrap();
            let (mut ga, mut gb) = (zeros(gpu, n * c), zeros(gpu, n * c));
            let t = time_us(gpu, 50, || {
                k::mi_bwd(gpu, &f, 1.0, &mut ga, &mut gb).unwrap();
            });
            let bwd_bytes = if c <= k::MI_FUSED_MAX_C { 16 * n * c } else { 40 * n * c };
            let _ = writeln!(out, "| MI backward | {n} | {c} | {t:.1} | {:.1} |", bwd_bytes as f64 / bw * 1e6);
        }
        // A BN layer of the default recipe's first block: 576 images, 32 channels, 28 x 28.
        let (bn_n, bn_c, hw) = (576usize, 32usize, 784usize);
        let x = up(gpu, &randv(bn_n * bn_c * hw, 1.0, 3));
        let (g, be) = (up(gpu, &vec![1.0f32; bn_c]), up(gpu, &vec![0.0f32; bn_c]));
        let mut y = zeros(gpu, bn_n * bn_c * hw);
        let t = time_us(gpu, 20, || {
            k::batchnorm_train_fwd(gpu, &x, bn_n, bn_c, hw, &g, &be, 1e-5, Some(0.1), &mut y).unwrap();
        });
        let floor = (3 * 4 * bn_n * bn_c * hw) as f64 / bw * 1e6;
        let _ = writeln!(out, "| BN+LReLU train fwd | {bn_n}x{hw} | {bn_c} | {t:.1} | {floor:.1} |");
        let p = 1_467_610usize; // wrn-28-2's parameters
        let (mut pd, gd) = (up(gpu, &randv(p, 1.0, 4)), up(gpu, &randv(p, 0.1, 5)));
        let (mut md, mut vd) = (zeros(gpu, p), zeros(gpu, p));
        let s = AdamScalars::new(2e-3, 0.9, 0.999, 1e-8, 5e-4, true, 10);
        let t = time_us(gpu, 50, || {
            k::adam_step(gpu, &mut pd, &gd, &mut md, &mut vd, p, &s).unwrap();
        });
        let _ = writeln!(out, "| AdamW step | {p} | - | {t:.1} | {:.1} |", (28 * p) as f64 / bw * 1e6);
    });
}

// ---------------------------------------------------------------------------------------------
// The dense layer's bias kernels and the device-scalar scale.

#[test]
fn bias_and_device_scale_kernels_match_cpu_bitwise() {
    with_gpu("bias_and_device_scale_kernels_match_cpu_bitwise", |gpu| {
        // Column sums run in row order on both sides, and a broadcast and a product are single
        // IEEE operations: equal bits.
        for &(rows, cols) in &[(1usize, 1usize), (3, 10), (577, 128), (64, 1000)] {
            let b = randv(cols, 1.0, 11 + cols as u64);
            let g = randv(rows * cols, 1.0, 12 + rows as u64);
            let mut want_y = vec![0.0; rows * cols];
            cpu::bias::broadcast_rows(&b, &mut want_y);
            let mut y = zeros(gpu, rows * cols);
            k::bias_rows_fwd(gpu, &up(gpu, &b), &mut y, rows, cols).expect("bias_rows_fwd");
            assert_bits(&format!("bias rows {rows} x {cols}"), &down(gpu, &y), &want_y);
            let mut want_db = vec![0.0; cols];
            cpu::bias::column_sums(&g, &mut want_db);
            let mut db = zeros(gpu, cols);
            k::bias_grad_bwd(gpu, &up(gpu, &g), &mut db, rows, cols).expect("bias_grad_bwd");
            assert_bits(&format!("bias grad {rows} x {cols}"), &down(gpu, &db), &want_db);
        }
        for &n in &[1usize, 1000, 70_001] {
            let x = randv(n, 2.0, 13);
            let mut want = vec![0.0; n];
            cpu::activation::scale(&x, 0.37, &mut want);
            let mut y = zeros(gpu, n);
            k::scale_dev_fwd(gpu, &up(gpu, &x), &mut y, n, &up(gpu, &[0.37f32])).expect("scale_dev_fwd");
            assert_bits(&format!("scale_dev n {n}"), &down(gpu, &y), &want);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// cuDNN convolution against the CPU's im2col + GEMM.

#[cfg(feature = "cudnn")]
#[test]
fn cudnn_convolution_matches_the_cpu_conv() {
    use muscle::cpu::conv::{conv2d_backward, conv2d_forward, ConvShape};
    use muscle::cuda::cudnn;
    with_gpu("cudnn_convolution_matches_the_cpu_conv", |gpu| {
        // Both sides sum in f32 in different orders (cuDNN's algorithm vs im2col + GEMM); FMA math
        // only (no TF32), so 1e-4 of the largest magnitude covers sums of up to ~10^4 terms.
        for &(n, stride, pad) in
            &[(1, 1, 0), (1, 1, 1), (1, 2, 0), (1, 2, 1), (64, 1, 0), (64, 1, 1), (64, 2, 0), (64, 2, 1)]
        {
            let s = ConvShape { n, ci: 3, h: 13, w: 11, co: 5, kh: 3, kw: 3, stride, pad };
            let what = format!("conv n {n} stride {stride} pad {pad}");
            let x = randv(n * s.ci * s.h * s.w, 1.0, 21);
            let w = randv(s.co * s.ci * s.kh * s.kw, 0.5, 22);
            let dy = randv(n * s.co * s.p(), 1.0, 23);
            let mut y = vec![0.0; n * s.co * s.p()];
            conv2d_forward(&s, &x, &w, &mut y);
            let (mut dw, mut dx) = (vec![0.0; w.len()], vec![0.0; x.len()]);
            conv2d_backward(&s, &x, &w, &dy, &mut dw, Some(&mut dx));

            let (xg, wg, dyg) = (up(gpu, &x), up(gpu, &w), up(gpu, &dy));
            let mut yg = zeros(gpu, y.len());
            cudnn::conv_forward(gpu, &s, &xg, &wg, &mut yg).expect("cudnn forward");
            assert_scaled(&format!("{what}: y"), &down(gpu, &yg), &y, 1e-4);
            let mut dxg = zeros(gpu, dx.len());
            cudnn::conv_backward_data(gpu, &s, &wg, &dyg, &mut dxg).expect("cudnn backward-data");
            assert_scaled(&format!("{what}: dx"), &down(gpu, &dxg), &dx, 1e-4);
            let mut dwg = zeros(gpu, dw.len());
            cudnn::conv_backward_filter(gpu, &s, &xg, &dyg, &mut dwg).expect("cudnn backward-filter");
            assert_scaled(&format!("{what}: dw"), &down(gpu, &dwg), &dw, 1e-4);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The tensor ops on CUDA tensors: one MUSCLE-style step of a real model on both devices.

/// What one step produced: logits, loss, and per tensor (name, gradient or buffer value).
#[cfg(feature = "cudnn")]
type StepOutputs = (Vec<f32>, f32, Vec<(String, Vec<f32>)>);

/// Logits, loss, every parameter's gradient and the BN running estimates after one training
/// forward + backward of `model` (CE on rows 16.., IIC between rows 0..8 and 8..16).
#[cfg(feature = "cudnn")]
fn one_step(model: &mut muscle::nn::Model, x: &Tensor) -> StepOutputs {
    use muscle::nn::{ForwardCtx, Module};
    use muscle::ops;
    let tape = Tape::new();
    let logits = model.forward(&tape, x, &ForwardCtx::train(7, 3)).expect("forward");
    let a = ops::narrow_rows(&tape, &logits, 0, 8).expect("narrow");
    let b = ops::narrow_rows(&tape, &logits, 8, 8).expect("narrow");
    let l = ops::narrow_rows(&tape, &logits, 16, 8).expect("narrow");
    let ce = ops::cross_entropy(&tape, &l, &[0, 1, 2, 3, 4, 5, 6, 7]).expect("ce");
    let mi = ops::mutual_info_loss(&tape, &a, &b, 1.0).expect("mi");
    let loss = ops::add(&tape, &ce, &ops::scale(&tape, &mi, 0.5).expect("scale")).expect("add");
    let value = loss.item().expect("item");
    let grads = tape.backward(&loss).expect("backward");
    let mut out = Vec::new();
    model.visit(&mut |name, role, t| {
        let v = if role.is_trainable() { grads.get(t).expect("a gradient").to_vec() } else { t.to_vec() };
        out.push((name.to_string(), v.expect("to_vec")));
    });
    (logits.to_vec().expect("logits"), value, out)
}

#[cfg(feature = "cudnn")]
#[test]
fn a_training_step_on_the_gpu_matches_the_cpu() {
    use muscle::nn::{ForwardCtx, Model, ModelKind, ModelSpec};
    use muscle::Device;
    with_gpu("a_training_step_on_the_gpu_matches_the_cpu", |_| {
        let spec =
            ModelSpec { kind: ModelKind::ConvNet { width: 8 }, in_channels: 1, height: 28, width: 28, classes: 10 };
        let mut on_cpu = Model::new(spec, 3).expect("model");
        let mut on_gpu = on_cpu.clone();
        on_gpu.to_device(Device::Cuda(0)).expect("to cuda");
        let x = Tensor::from_vec(randv(24 * 784, 1.0, 31), &[24, 1, 28, 28]).expect("x");
        let (lc, vc, gc) = one_step(&mut on_cpu, &x);
        let (lg, vg, gg) = one_step(&mut on_gpu, &x);
        // Convolutions and reductions sum in other orders on the GPU: relative tolerances.
        assert_scaled("logits", &lg, &lc, 1e-4);
        assert!((vg - vc).abs() <= 1e-4 * vc.abs().max(1.0), "loss: gpu {vg} vs cpu {vc}");
        for ((name, g), (_, c)) in gg.iter().zip(&gc) {
            assert_scaled(name, g, c, 2e-3);
        }
        // Evaluation mode after the running estimates moved.
        let t = Tape::no_grad();
        let ec = on_cpu.forward(&t, &x, &ForwardCtx::eval()).and_then(|y| y.to_vec()).expect("eval cpu");
        let eg = on_gpu.forward(&t, &x, &ForwardCtx::eval()).and_then(|y| y.to_vec()).expect("eval gpu");
        assert_scaled("eval logits", &eg, &ec, 1e-4);
    });
}

#[test]
fn bn_running_update_matches_cpu_bitwise() {
    with_gpu("bn_running_update_matches_cpu_bitwise", |gpu| {
        // Two roundings per product and one per sum, in the CPU's order on both sides.
        for &(n, momentum, factor) in
            &[(1usize, 0.1f32, 1.0f32), (32, 0.1, 577.0 / 576.0), (1000, 0.001, 1.0), (4099, 0.3, 1.5)]
        {
            let (r0, b) = (randv(n, 1.0, 41), randv(n, 2.0, 42));
            let mut want = r0.clone();
            cpu::batchnorm::running_update(&mut want, &b, momentum, factor);
            let mut r = up(gpu, &r0);
            k::bn_running_update(gpu, &mut r, &up(gpu, &b), n, momentum, factor).expect("bn_running_update");
            assert_bits(&format!("running n {n} momentum {momentum}"), &down(gpu, &r), &want);
        }
    });
}
