//! CUDA kernels against their CPU twins (each op family's `cpu.rs`) on seeded random inputs with awkward sizes:
//! one row, C = 3, C = 1000 and C > 1024, rows not a multiple of 32, logits of +-80, probabilities
//! that underflow so that the EPS clamp of the MI loss acts; forward and backward.
//!
//! Without a usable GPU each GPU test prints "skipped: <reason>" (straight to stderr, so it shows
//! even with captured output) and passes, unless REQUIRE_GPU=1, where it fails instead. A few
//! tests need no GPU and always run: the dropout kernel's Philox indexing against the CPU op,
//! the launchers' kernel names against the sources, the embedded PTX, NVRTC on the sources (when
//! libnvrtc is found), and that probing never panics.
//!
//! One module per op family (the family's launchers are `muscle::ops::<family>::cuda`, its CPU
//! twins `muscle::ops::<family>::cpu`), plus the runtime, the timings and a whole training step.
//!
//! Tolerances are stated per test, with the reason. Where the GPU does the CPU's operations in the
//! CPU's order (elementwise, dropout, max-pool, optimizer updates, BN eval) the test demands equal
//! bits; where a sum runs in another order, the tolerance is relative to the size of the quantity.
#![cfg(feature = "cuda")]

use muscle::cuda::{probe, CudaSlice, DeviceElem, Gpu};
use muscle::rng::Rng;
use std::io::Write;
use std::sync::{Mutex, OnceLock};

mod batchnorm;
mod collective;
#[cfg(feature = "cudnn")]
mod conv;
mod elementwise;
mod linear;
mod mixmatch;
mod mutual_info;
mod optim;
mod pool;
mod runtime;
mod softmax;
#[cfg(feature = "cudnn")]
mod step;
mod timings;
#[cfg(feature = "cudnn")]
mod transfers;

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

fn up<T: DeviceElem>(gpu: &Gpu, v: &[T]) -> CudaSlice<T> {
    gpu.upload(v).expect("upload")
}

fn down<T: DeviceElem>(gpu: &Gpu, s: &CudaSlice<T>) -> Vec<T> {
    gpu.download(s).expect("download")
}

fn zeros(gpu: &Gpu, n: usize) -> CudaSlice<f32> {
    gpu.zeros::<f32>(n).expect("alloc")
}

/// The largest |v|; NaN if any element is NaN (f32::max would skip it, and an all-NaN gradient
/// would pass for zero).
fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |a, &b| if a.is_nan() || b.is_nan() { f32::NAN } else { a.max(b.abs()) })
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
