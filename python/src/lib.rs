//! `muscle._muscle`: the extension module under the Python package `muscle` (python/muscle/).
//!
//! Arrays cross as (address, shape): the Python side (muscle/__init__.py, muscle/torch.py) checks
//! dtype, contiguity and shape, allocates the outputs, keeps every array alive for the call and
//! passes `arr.ctypes.data` / `tensor.data_ptr()`; this side checks what it can (sizes, alignment,
//! finiteness, label range) and never trusts an address it was not given. That is what lets a
//! torch tensor reach the kernels without a copy, and why these functions are private.
//! Kernels run with the GIL released.

use muscle::error::{Error, ErrorKind};
use muscle::ops::mutual_info::cpu::{mi_bwd, mi_fwd};
use muscle::ops::mutual_info::mi_loss_f64;
use muscle::ops::softmax::cpu::{cross_entropy_f64, cross_entropy_hard_fwd, cross_entropy_soft_fwd};
use muscle::train::checkpoint::{Checkpoint, Values};
use pyo3::exceptions::{PyKeyboardInterrupt, PyMemoryError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use std::collections::BTreeMap;

/// A muscle error as the Python exception its kind calls for.
fn py_err(e: Error) -> PyErr {
    let text = e.to_string();
    match e.kind() {
        ErrorKind::Io => PyOSError::new_err(text),
        ErrorKind::OutOfMemory => PyMemoryError::new_err(text),
        ErrorKind::Interrupted => PyKeyboardInterrupt::new_err(text),
        ErrorKind::Device => PyRuntimeError::new_err(text),
        ErrorKind::Usage | ErrorKind::Shape | ErrorKind::Format | ErrorKind::NonFinite => PyValueError::new_err(text),
    }
}

/// A read-only view of `len` elements at `addr` (an array the caller keeps alive).
///
/// # Safety
/// `addr` must point to `len` initialised, aligned elements of T that stay valid and unwritten
/// for the returned lifetime.
unsafe fn view<'a, T>(name: &str, addr: usize, len: usize) -> PyResult<&'a [T]> {
    check_addr::<T>(name, addr)?;
    Ok(std::slice::from_raw_parts(addr as *const T, len))
}

/// A writable view, as [`view`].
///
/// # Safety
/// As [`view`], and no other reference to the memory may exist for the returned lifetime.
unsafe fn view_mut<'a, T>(name: &str, addr: usize, len: usize) -> PyResult<&'a mut [T]> {
    check_addr::<T>(name, addr)?;
    Ok(std::slice::from_raw_parts_mut(addr as *mut T, len))
}

fn check_addr<T>(name: &str, addr: usize) -> PyResult<()> {
    if addr == 0 || !addr.is_multiple_of(std::mem::align_of::<T>()) {
        return Err(PyValueError::new_err(format!("{name}: address {addr:#x} is null or misaligned")));
    }
    Ok(())
}

/// n x c with n >= 1, c >= 2 and n * c addressable.
fn check_shape(n: usize, c: usize) -> PyResult<usize> {
    if n == 0 || c < 2 {
        return Err(PyValueError::new_err(format!("logits of shape ({n}, {c}): need at least 1 row and 2 columns")));
    }
    n.checked_mul(c).ok_or_else(|| PyValueError::new_err(format!("logits of shape ({n}, {c}) are too large")))
}

/// The first non-finite value of `x` (n x c) as an error naming `name` and its row. The common
/// case (all finite) is one branch-free pass per chunk on every worker, so that the check costs a
/// fraction of the fused kernel it guards (a first-match search took longer than the kernel);
/// the kernels' clamps would otherwise turn a NaN into a finite, wrong loss.
fn check_finite<T: Copy + Into<f64> + Send + Sync>(name: &str, x: &[T], c: usize) -> PyResult<()> {
    use rayon::prelude::*;
    let clean = x.par_chunks(1 << 16).all(|chunk| chunk.iter().fold(true, |ok, &v| ok & v.into().is_finite()));
    if clean {
        return Ok(());
    }
    match x.iter().position(|&v| !v.into().is_finite()) {
        Some(i) => {
            Err(PyValueError::new_err(format!("{name}: row {} has a non-finite value ({})", i / c, x[i].into())))
        }
        None => Ok(()),
    }
}

fn check_lambda(lam: f64) -> PyResult<()> {
    if lam.is_finite() && lam > 0.0 {
        Ok(())
    } else {
        Err(PyValueError::new_err(format!("lam = {lam}: must be a finite value > 0")))
    }
}

/// The two views and their gradients at the given addresses, checked: shape, lambda, alignment,
/// finite logits.
///
/// # Safety
/// The Python caller passes four distinct live C-contiguous arrays of n x c elements of T and
/// keeps them alive and untouched until the kernel returns.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
unsafe fn two_views<'a, T: Copy + Into<f64> + Send + Sync>(
    a: usize,
    b: usize,
    ga: usize,
    gb: usize,
    n: usize,
    c: usize,
    lam: f64,
) -> PyResult<(&'a [T], &'a [T], &'a mut [T], &'a mut [T])> {
    let len = check_shape(n, c)?;
    check_lambda(lam)?;
    let views = (
        view::<T>("logits_a", a, len)?,
        view::<T>("logits_b", b, len)?,
        view_mut::<T>("grad_a", ga, len)?,
        view_mut::<T>("grad_b", gb, len)?,
    );
    check_finite("logits_a", views.0, c)?;
    check_finite("logits_b", views.1, c)?;
    Ok(views)
}

/// IIC loss of two n x c float32 logit matrices; writes both gradients; returns the loss.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn iic_f32(py: Python<'_>, a: usize, b: usize, ga: usize, gb: usize, n: usize, c: usize, lam: f64) -> PyResult<f64> {
    // SAFETY: see two_views; the Python side (muscle/__init__.py, muscle/torch.py) keeps the
    // float32 arrays alive for this call.
    let (a, b, ga, gb) = unsafe { two_views::<f32>(a, b, ga, gb, n, c, lam)? };
    Ok(py.detach(|| {
        let fwd = mi_fwd(a, b, n, c, lam as f32);
        mi_bwd(&fwd, n, c, 1.0, ga, gb);
        fwd.loss as f64
    }))
}

/// The same in float64 through the exact reference (`muscle mi`'s).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn iic_f64(py: Python<'_>, a: usize, b: usize, ga: usize, gb: usize, n: usize, c: usize, lam: f64) -> PyResult<f64> {
    // SAFETY: as in iic_f32, with float64 arrays.
    let (a, b, ga, gb) = unsafe { two_views::<f64>(a, b, ga, gb, n, c, lam)? };
    Ok(py.detach(|| {
        let (loss, da, db) = mi_loss_f64(a, b, n, c, lam);
        ga.copy_from_slice(&da);
        gb.copy_from_slice(&db);
        loss
    }))
}

/// Labels (int64, n of them) as indices below c, or an error naming the first bad one.
fn labels_of(labels: &[i64], c: usize) -> PyResult<Vec<usize>> {
    labels
        .iter()
        .enumerate()
        .map(|(r, &l)| {
            usize::try_from(l)
                .ok()
                .filter(|&l| l < c)
                .ok_or_else(|| PyValueError::new_err(format!("labels: row {r} has label {l}, outside 0..{c}")))
        })
        .collect()
}

/// What a cross-entropy is taken against: class indices or soft target rows.
enum Target<'a, T> {
    Labels(Vec<usize>),
    Soft(&'a [T]),
}

/// The logits, the gradient to write and the target at the given addresses (`labels` != 0 for
/// int64 class indices, else `targets` n x c), checked: shape, alignment, finiteness, labels.
///
/// # Safety
/// The Python caller passes live C-contiguous arrays of the stated sizes (logits and targets
/// n x c of T, labels n int64, grad n x c of T distinct from the others) and keeps them alive and
/// untouched until the kernel returns.
#[allow(clippy::type_complexity)]
unsafe fn cross_entropy_args<'a, T: Copy + Into<f64> + Send + Sync>(
    x: usize,
    labels: usize,
    targets: usize,
    grad: usize,
    n: usize,
    c: usize,
) -> PyResult<(&'a [T], &'a mut [T], Target<'a, T>)> {
    let len = check_shape(n, c)?;
    let (x, g) = (view::<T>("logits", x, len)?, view_mut::<T>("grad", grad, len)?);
    check_finite("logits", x, c)?;
    let target = if labels != 0 {
        Target::Labels(labels_of(view::<i64>("labels", labels, n)?, c)?)
    } else {
        let q = view::<T>("targets", targets, len)?;
        check_finite("targets", q, c)?;
        Target::Soft(q)
    };
    Ok((x, g, target))
}

/// Softmax cross-entropy of n x c logits against int64 labels (`labels` != 0) or n x c targets
/// (`targets` != 0), float32 through the fused kernels; writes the gradient of the mean loss.
#[pyfunction]
fn cross_entropy_f32(
    py: Python<'_>,
    x: usize,
    labels: usize,
    targets: usize,
    grad: usize,
    n: usize,
    c: usize,
) -> PyResult<f64> {
    // SAFETY: see cross_entropy_args; muscle/__init__.py and muscle/torch.py keep the float32
    // arrays alive for this call.
    let (x, g, target) = unsafe { cross_entropy_args::<f32>(x, labels, targets, grad, n, c)? };
    Ok(py.detach(|| match target {
        Target::Labels(l) => cross_entropy_hard_fwd(x, &l, c, g) as f64,
        Target::Soft(q) => cross_entropy_soft_fwd(x, q, c, g) as f64,
    }))
}

/// The same in float64 through the plain-loop reference.
#[pyfunction]
fn cross_entropy_f64_ref(
    py: Python<'_>,
    x: usize,
    labels: usize,
    targets: usize,
    grad: usize,
    n: usize,
    c: usize,
) -> PyResult<f64> {
    // SAFETY: as in cross_entropy_f32, with float64 logits and targets.
    let (x, g, target) = unsafe { cross_entropy_args::<f64>(x, labels, targets, grad, n, c)? };
    let (loss, d) = py.detach(|| match target {
        Target::Labels(l) => cross_entropy_f64(x, Some(&l), None, c),
        Target::Soft(q) => cross_entropy_f64(x, None, Some(q), c),
    });
    g.copy_from_slice(&d);
    Ok(loss)
}

/// `muscle train`'s options, parsed exactly as the command line parses them.
#[derive(clap::Parser)]
#[command(name = "muscle.train", no_binary_name = true)]
struct TrainCli {
    #[command(flatten)]
    args: muscle::app::train::TrainArgs,
}

/// Trains (or resumes, with `--resume DIR`) with command-line style `argv`, calling `progress`
/// with each step's numbers when given; returns summary.json's text. Ctrl-C stops after the
/// current step with KeyboardInterrupt (the run folder resumes from its last checkpoint).
#[pyfunction]
#[pyo3(signature = (argv, progress=None))]
fn train(py: Python<'_>, argv: Vec<String>, progress: Option<Py<PyAny>>) -> PyResult<String> {
    use clap::Parser;
    let cli = TrainCli::try_parse_from(&argv).map_err(|e| {
        if let Some(ours) = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<Error>()) {
            return py_err(ours.clone());
        }
        let text = e.to_string();
        let first = text.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("invalid options").to_string();
        PyValueError::new_err(first.trim_start_matches("error: ").to_string())
    })?;
    let mut pending: Option<PyErr> = None;
    let result = py.detach(|| {
        let mut on_step = |p: &muscle::train::Progress| {
            if pending.is_some() {
                return;
            }
            // The GIL for a moment each step: run Python's signal handlers (Ctrl-C) and the callback.
            let outcome = Python::attach(|py| -> PyResult<()> {
                py.check_signals()?;
                if let Some(f) = &progress {
                    let d = pyo3::types::PyDict::new(py);
                    d.set_item("step", p.step)?;
                    d.set_item("steps", p.steps)?;
                    d.set_item("loss", p.loss)?;
                    d.set_item("loss_supervised", p.sup)?;
                    d.set_item("loss_mi", p.mi)?;
                    d.set_item("images_per_second", p.images_per_second)?;
                    if let Some((raw, ema)) = p.eval {
                        d.set_item("test_accuracy", raw)?;
                        d.set_item("test_accuracy_ema", ema)?;
                    }
                    f.call1(py, (d,))?;
                }
                Ok(())
            });
            if let Err(e) = outcome {
                pending = Some(e);
                muscle::train::request_stop();
            }
        };
        let a = &cli.args;
        match &a.resume {
            Some(dir) => muscle::train::resume(dir, &mut on_step),
            None => muscle::train::train(&a.train.config(), &mut on_step),
        }
    });
    match (result, pending) {
        // The interruption's own exception (KeyboardInterrupt, or the callback's error) wins.
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(py_err(e)),
        (Ok(s), _) => serde_json::to_string(&s).map_err(|e| PyRuntimeError::new_err(e.to_string())),
    }
}

/// A checkpoint's tensors as (name, shape, dtype, bytes) and its metadata.
type Loaded<'py> = (Vec<(String, Vec<usize>, &'static str, Bound<'py, PyBytes>)>, BTreeMap<String, String>);

/// Reads a .safetensors checkpoint written by muscle (or any f32/f64/i64 safetensors file).
#[pyfunction]
fn load_checkpoint(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Loaded<'_>> {
    let ck = py.detach(|| Checkpoint::load(&path)).map_err(py_err)?;
    let tensors = ck
        .entries
        .iter()
        .map(|e| {
            let (dtype, bytes): (&str, &[u8]) = match &e.values {
                Values::F32(v) => ("<f4", bytes_of(v)),
                Values::F64(v) => ("<f8", bytes_of(v)),
                Values::I64(v) => ("<i8", bytes_of(v)),
            };
            (e.name.clone(), e.shape.clone(), dtype, PyBytes::new(py, bytes))
        })
        .collect();
    Ok((tensors, ck.metadata))
}

/// The bytes of a slice of plain numbers (little-endian on every machine muscle builds for).
fn bytes_of<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: f32/f64/i64 have no padding and every byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Sets the worker threads of the kernels (default: all cores).
#[pyfunction]
fn set_threads(n: usize) -> PyResult<()> {
    muscle::cpu::set_threads(n).map_err(py_err)
}

/// The version of the muscle engine this module was built from.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _muscle(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(iic_f32, m)?)?;
    m.add_function(wrap_pyfunction!(iic_f64, m)?)?;
    m.add_function(wrap_pyfunction!(cross_entropy_f32, m)?)?;
    m.add_function(wrap_pyfunction!(cross_entropy_f64_ref, m)?)?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(load_checkpoint, m)?)?;
    m.add_function(wrap_pyfunction!(set_threads, m)?)?;
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
