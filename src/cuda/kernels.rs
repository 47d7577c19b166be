//! One safe function per kernel of `kernels/*.cu`: sizes are checked here (a buffer shorter than
//! the kernel will touch is an error, never an out-of-bounds access), the launch shape is chosen
//! here, and a launch failure is an [`Error`] naming the kernel. Buffers may be longer than
//! needed (pooled buffers); element counts are explicit arguments.
//!
//! Every function's CPU twin is named in its docs; tests/gpu.rs holds the parity tests.
//! Launches are asynchronous: an error inside a kernel surfaces at the next synchronising call
//! ([`Gpu::download`], [`Gpu::synchronize`]).

use super::device::Gpu;
use crate::cpu::optim::{AdamScalars, SgdScalars};
use crate::error::{Error, Result};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// Every kernel, by file (stem of `kernels/<file>.cu`). [`Gpu::new`] loads exactly these; a test
/// checks the list against the `extern "C"` definitions in the sources.
pub const KERNELS: &[(&str, &[&str])] = &[
    (
        "batchnorm",
        &[
            "batchnorm_stats_fwd_f32",
            "batchnorm_finish_fwd_f32",
            "batchnorm_norm_fwd_f32",
            "batchnorm_eval_fwd_f32",
            "batchnorm_reduce_bwd_f32",
            "batchnorm_finish_bwd_f32",
            "batchnorm_dx_bwd_f32",
            "bn_running_fwd_f32",
        ],
    ),
    (
        "elementwise",
        &[
            "leaky_relu_fwd_f32",
            "leaky_relu_bwd_f32",
            "add_fwd_f32",
            "scale_fwd_f32",
            "scale_dev_fwd_f32",
            "dropout_fwd_f32",
            "dropout_bwd_f32",
            "bias_rows_fwd_f32",
            "bias_grad_bwd_f32",
        ],
    ),
    (
        "mutual_info",
        &[
            "mi_softmax_joint_fwd_f32",
            "mi_softmax_fwd_f32",
            "mi_joint_fwd_f32",
            "mi_reduce_fwd_f32",
            "mi_finish_fwd_f32",
            "mi_bwd_f32",
            "mi_project_bwd_f32",
            "mi_softmax_bwd_f32",
        ],
    ),
    ("optim", &["adam_step_fwd_f32", "sgd_step_fwd_f32", "sgd_momentum_step_fwd_f32", "ema_update_fwd_f32"]),
    ("pool", &["maxpool2_fwd_f32", "maxpool2_bwd_f32", "avgpool_fwd_f32", "avgpool_bwd_f32"]),
    (
        "softmax",
        &[
            "softmax_fwd_f32",
            "softmax_bwd_f32",
            "log_softmax_fwd_f32",
            "log_softmax_bwd_f32",
            "cross_entropy_hard_fwd_f32",
            "cross_entropy_soft_fwd_f32",
            "reduce_mean_fwd_f32",
        ],
    ),
];

/// Threads per block of every kernel (8 warps).
const BLOCK: u32 = 256;
/// Rows per block of the one-warp-per-row kernels.
const ROWS_PER_BLOCK: usize = (BLOCK / 32) as usize;
/// Cap on the blocks of the grid-stride kernels (about 8 waves of an H100's 132 SMs at 8 blocks
/// each): more blocks would only add scheduling work.
const MAX_FLAT_BLOCKS: usize = 8192;

/// Largest C handled by the fused mutual-information kernels (one class per lane).
pub const MI_FUSED_MAX_C: usize = 32;
/// Largest C the mutual-information kernels accept (64 x 64 tiles: the tile grid's y extent).
pub const MI_MAX_C: usize = 64 * 255;
/// Fewest rows in one partial C x C sum of the MI forward.
const MI_MIN_ROWS_PER_PART: usize = 256;
/// Upper bound on the f32 elements of all partial C x C sums together (32 MiB).
const MI_MAX_PARTIAL_ELEMS: usize = 1 << 23;

/// Launches `$name` on `$gpu`'s stream with the given arguments (each a reference that outlives
/// the launch). The caller has checked every buffer against the sizes the kernel uses.
macro_rules! launch {
    ($gpu:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let name: &str = $name;
        let func = $gpu.function(name)?;
        let mut builder = $gpu.stream().launch_builder(func);
        $( builder.arg($arg); )+
        // SAFETY: the arguments match the kernel's parameter list in kernels/*.cu in order and
        // type (i32 = int, i64 = long long, u32 = unsigned int, f32 = float, f64 = double, slices
        // = pointers), and every buffer holds at least the elements the kernel addresses for these
        // sizes (checked by the caller).
        unsafe { builder.launch($cfg) }.map(|_| ()).map_err(|e| Error::device(format!("{name}: {e}")))
    }};
}

fn need(kernel: &str, what: &str, len: usize, want: usize) -> Result<()> {
    if len < want {
        return Err(Error::shape(format!("{kernel}: {what} has {len} elements, the kernel needs {want}")));
    }
    Ok(())
}

fn int(kernel: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(format!("{kernel}: {what} = {v} is beyond the kernel's 32-bit range")))
}

fn long(v: usize) -> i64 {
    v as i64
}

fn nonzero(kernel: &str, sizes: &[(&str, usize)]) -> Result<()> {
    for &(what, v) in sizes {
        if v == 0 {
            return Err(Error::shape(format!("{kernel}: {what} is 0")));
        }
    }
    Ok(())
}

/// n x c with overflow checked.
fn elems(kernel: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::shape(format!("{kernel}: {a} x {b} elements overflow")))
}

fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

fn grid_dim(kernel: &str, blocks: usize) -> Result<u32> {
    u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::shape(format!("{kernel}: {blocks} blocks exceed the grid limit")))
}

/// One warp per row: ceil(rows / 8) blocks of 256.
fn rows_cfg(kernel: &str, rows: usize) -> Result<LaunchConfig> {
    Ok(cfg((grid_dim(kernel, rows.div_ceil(ROWS_PER_BLOCK))?, 1, 1), BLOCK))
}

/// Grid-stride loop over `n` items.
fn flat_cfg(n: usize) -> LaunchConfig {
    cfg((n.div_ceil(BLOCK as usize).clamp(1, MAX_FLAT_BLOCKS) as u32, 1, 1), BLOCK)
}

// ---------------------------------------------------------------------------------------------
// softmax.cu

fn row_checks(kernel: &str, n: usize, c: usize, bufs: &[(&str, usize)]) -> Result<(i32, i32)> {
    nonzero(kernel, &[("rows", n), ("columns", c)])?;
    let nc = elems(kernel, n, c)?;
    for &(what, len) in bufs {
        need(kernel, what, len, nc)?;
    }
    Ok((int(kernel, "rows", n)?, int(kernel, "columns", c)?))
}

/// Row softmax of `x` (n x c) into `y`. CPU twin: `cpu::softmax::softmax_forward`.
pub fn softmax_fwd(gpu: &Gpu, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize, c: usize) -> Result<()> {
    let k = "softmax_fwd_f32";
    let (ni, ci) = row_checks(k, n, c, &[("x", x.len()), ("y", y.len())])?;
    launch!(gpu, k, rows_cfg(k, n)?, x, y, &ni, &ci)
}

/// dx = y * (dy - <y, dy>) per row. CPU twin: `cpu::softmax::softmax_backward`.
pub fn softmax_bwd(
    gpu: &Gpu,
    y: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    n: usize,
    c: usize,
) -> Result<()> {
    let k = "softmax_bwd_f32";
    let (ni, ci) = row_checks(k, n, c, &[("y", y.len()), ("dy", dy.len()), ("dx", dx.len())])?;
    launch!(gpu, k, rows_cfg(k, n)?, y, dy, dx, &ni, &ci)
}

/// Row log-softmax. CPU twin: `cpu::softmax::log_softmax_forward`.
pub fn log_softmax_fwd(gpu: &Gpu, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize, c: usize) -> Result<()> {
    let k = "log_softmax_fwd_f32";
    let (ni, ci) = row_checks(k, n, c, &[("x", x.len()), ("y", y.len())])?;
    launch!(gpu, k, rows_cfg(k, n)?, x, y, &ni, &ci)
}

/// dx = dy - exp(y) * sum(dy) per row, y the log-softmax output. CPU twin:
/// `cpu::softmax::log_softmax_backward`.
pub fn log_softmax_bwd(
    gpu: &Gpu,
    y: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    n: usize,
    c: usize,
) -> Result<()> {
    let k = "log_softmax_bwd_f32";
    let (ni, ci) = row_checks(k, n, c, &[("y", y.len()), ("dy", dy.len()), ("dx", dx.len())])?;
    launch!(gpu, k, rows_cfg(k, n)?, y, dy, dx, &ni, &ci)
}

/// Deterministic f64 mean of `v[..n]` into a new one-element buffer.
fn reduce_mean(gpu: &Gpu, v: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<f32>> {
    let k = "reduce_mean_fwd_f32";
    need(k, "v", v.len(), n)?;
    let ni = int(k, "n", n)?;
    let mut out = gpu.zeros::<f32>(1)?;
    launch!(gpu, k, cfg((1, 1, 1), 1024), v, &mut out, &ni)?;
    Ok(out)
}

/// Mean cross-entropy of logits `x` (n x c) against class indices `labels` (n, as i32), and in
/// the same pass `grad` = d(mean loss)/d logits (the backward is a scale by the upstream
/// gradient: [`scale_fwd`]). Returns the mean loss as a one-element device buffer; a label
/// outside [0, c) makes it NaN. CPU twin: `cpu::softmax::cross_entropy_hard`.
pub fn cross_entropy_hard(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    labels: &CudaSlice<i32>,
    grad: &mut CudaSlice<f32>,
    n: usize,
    c: usize,
) -> Result<CudaSlice<f32>> {
    let k = "cross_entropy_hard_fwd_f32";
    let (ni, ci) = row_checks(k, n, c, &[("x", x.len()), ("grad", grad.len())])?;
    need(k, "labels", labels.len(), n)?;
    let mut rows = gpu.zeros::<f32>(n)?;
    launch!(gpu, k, rows_cfg(k, n)?, x, labels, &mut rows, grad, &ni, &ci)?;
    reduce_mean(gpu, &rows, n)
}

/// Mean over rows of -sum_c q_c log softmax(x)_c for target rows `q` (n x c), and `grad` as in
/// [`cross_entropy_hard`]. CPU twin: `cpu::softmax::cross_entropy_soft`.
pub fn cross_entropy_soft(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    q: &CudaSlice<f32>,
    grad: &mut CudaSlice<f32>,
    n: usize,
    c: usize,
) -> Result<CudaSlice<f32>> {
    let k = "cross_entropy_soft_fwd_f32";
    let (ni, ci) = row_checks(k, n, c, &[("x", x.len()), ("q", q.len()), ("grad", grad.len())])?;
    let mut rows = gpu.zeros::<f32>(n)?;
    launch!(gpu, k, rows_cfg(k, n)?, x, q, &mut rows, grad, &ni, &ci)?;
    reduce_mean(gpu, &rows, n)
}

// ---------------------------------------------------------------------------------------------
// mutual_info.cu

/// Rows per partial C x C sum of the MI forward: a function of (n, c) only, never of the GPU, so
/// the f64 reduction order (and the result) is the same on every device. At least 256 rows;
/// more when the partials of all parts would exceed 2^23 floats (C >= 182 at large n).
pub fn mi_rows_per_part(n: usize, c: usize) -> usize {
    let max_parts = (MI_MAX_PARTIAL_ELEMS / (c * c).max(1)).max(1);
    MI_MIN_ROWS_PER_PART.max(n.div_ceil(max_parts))
}

/// What the MI forward leaves on the device for the backward and for logging.
/// Mirrors `cpu::mutual_info::MiForward`.
pub struct MiForwardGpu {
    /// Rows.
    pub n: usize,
    /// Classes.
    pub c: usize,
    /// softmax(logits_a), n x c.
    pub z: CudaSlice<f32>,
    /// softmax(logits_b), n x c.
    pub w: CudaSlice<f32>,
    /// The joint P = S / s before the clamp, c x c, f64.
    pub p: CudaSlice<f64>,
    /// G - (2 lambda - 1), c x c.
    pub g0: CudaSlice<f32>,
    /// G^ = G - <P, G>, c x c.
    pub g_hat: CudaSlice<f32>,
    /// [loss, H(P'), marginal entropy, s, #clamped P, #clamped m, <P, G>] in f64.
    pub stats: CudaSlice<f64>,
    /// The loss as a one-element f32 buffer.
    pub loss: CudaSlice<f32>,
}

/// The scalars of an MI forward, copied to the host (for logging and tests).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MiScalars {
    /// L_mi(lambda).
    pub loss: f64,
    /// H(P') over the clamped joint.
    pub joint_entropy: f64,
    /// -sum_c r_c ln m'_c.
    pub marginal_entropy: f64,
    /// Sum of the symmetrised joint counts (= n up to rounding).
    pub s: f64,
    /// Entries of P below EPS.
    pub clamped: usize,
    /// Marginals below EPS.
    pub clamped_marginals: usize,
}

impl MiForwardGpu {
    /// Copies the forward's scalars to the host (waits for the GPU).
    pub fn scalars(&self, gpu: &Gpu) -> Result<MiScalars> {
        let s = gpu.download(&self.stats)?;
        Ok(MiScalars {
            loss: s[0],
            joint_entropy: s[1],
            marginal_entropy: s[2],
            s: s[3],
            clamped: s[4] as usize,
            clamped_marginals: s[5] as usize,
        })
    }
}

/// The IIC loss L_mi(lambda) of two views' logits (n x c each) and everything its backward needs.
/// CPU twin: `cpu::mutual_info::forward` (same clamp semantics; the loss is a sum, not a mean).
pub fn mi_fwd(
    gpu: &Gpu,
    logits_a: &CudaSlice<f32>,
    logits_b: &CudaSlice<f32>,
    n: usize,
    c: usize,
    lambda: f32,
) -> Result<MiForwardGpu> {
    let k = "mi_fwd";
    let (ni, ci) = row_checks(k, n, c, &[("logits_a", logits_a.len()), ("logits_b", logits_b.len())])?;
    if c > MI_MAX_C {
        return Err(Error::shape(format!("{k}: {c} classes, at most {MI_MAX_C} supported")));
    }
    let cc = c * c;
    let rows_per_part = mi_rows_per_part(n, c);
    let parts = n.div_ceil(rows_per_part);
    let rpp = int(k, "rows per part", rows_per_part)?;
    let mut z = gpu.zeros::<f32>(n * c)?;
    let mut w = gpu.zeros::<f32>(n * c)?;
    let mut partials = gpu.zeros::<f32>(parts * cc)?;
    if c <= MI_FUSED_MAX_C {
        let kf = "mi_softmax_joint_fwd_f32";
        let grid = (grid_dim(kf, parts)?, 1, 1);
        launch!(gpu, kf, cfg(grid, BLOCK), logits_a, logits_b, &mut z, &mut w, &mut partials, &ni, &ci, &rpp)?;
    } else {
        let ks = "mi_softmax_fwd_f32";
        launch!(gpu, ks, rows_cfg(ks, n)?, logits_a, logits_b, &mut z, &mut w, &ni, &ci)?;
        let kj = "mi_joint_fwd_f32";
        let tiles = c.div_ceil(64);
        let grid = (grid_dim(kj, parts)?, (tiles * tiles) as u32, 1);
        launch!(gpu, kj, cfg(grid, BLOCK), &z, &w, &mut partials, &ni, &ci, &rpp)?;
    }
    let kr = "mi_reduce_fwd_f32";
    let mut j = gpu.zeros::<f64>(cc)?;
    let (parts_i, cc_i) = (int(kr, "parts", parts)?, int(kr, "C^2", cc)?);
    launch!(
        gpu,
        kr,
        cfg((grid_dim(kr, cc.div_ceil(BLOCK as usize))?, 1, 1), BLOCK),
        &partials,
        &mut j,
        &parts_i,
        &cc_i
    )?;
    let kf = "mi_finish_fwd_f32";
    let mut p = gpu.zeros::<f64>(cc)?;
    let mut vec = gpu.zeros::<f64>(3 * c)?;
    let mut g0 = gpu.zeros::<f32>(cc)?;
    let mut g_hat = gpu.zeros::<f32>(cc)?;
    let mut stats = gpu.zeros::<f64>(8)?;
    let mut loss = gpu.zeros::<f32>(1)?;
    launch!(
        gpu,
        kf,
        cfg((1, 1, 1), 1024),
        &mut j,
        &mut p,
        &mut vec,
        &mut g0,
        &mut g_hat,
        &mut stats,
        &mut loss,
        &ci,
        &lambda
    )?;
    Ok(MiForwardGpu { n, c, z, w, p, g0, g_hat, stats, loss })
}

/// Gradients of `upstream * L_mi` with respect to both views' logits (n x c each, overwritten).
/// CPU twin: `cpu::mutual_info::backward`.
pub fn mi_bwd(
    gpu: &Gpu,
    fwd: &MiForwardGpu,
    upstream: f32,
    grad_a: &mut CudaSlice<f32>,
    grad_b: &mut CudaSlice<f32>,
) -> Result<()> {
    let k = "mi_bwd";
    let (n, c) = (fwd.n, fwd.c);
    let (ni, ci) = row_checks(k, n, c, &[("grad_a", grad_a.len()), ("grad_b", grad_b.len())])?;
    if c <= MI_FUSED_MAX_C {
        let kb = "mi_bwd_f32";
        launch!(gpu, kb, rows_cfg(kb, n)?, &fwd.z, &fwd.w, &fwd.g_hat, &fwd.stats, &upstream, grad_a, grad_b, &ni, &ci)
    } else {
        let kp = "mi_project_bwd_f32";
        let grid = (grid_dim(kp, n.div_ceil(64))?, c.div_ceil(64) as u32, 2);
        launch!(gpu, kp, cfg(grid, BLOCK), &fwd.z, &fwd.w, &fwd.g_hat, &mut *grad_a, &mut *grad_b, &ni, &ci)?;
        let ks = "mi_softmax_bwd_f32";
        launch!(gpu, ks, rows_cfg(ks, n)?, &fwd.z, &fwd.w, &fwd.stats, &upstream, grad_a, grad_b, &ni, &ci)
    }
}

// ---------------------------------------------------------------------------------------------
// elementwise.cu

fn flat_checks(kernel: &str, n: usize, bufs: &[(&str, usize)]) -> Result<i64> {
    nonzero(kernel, &[("n", n)])?;
    for &(what, len) in bufs {
        need(kernel, what, len, n)?;
    }
    Ok(long(n))
}

/// y = x > 0 ? x : slope x on the first `n` elements. CPU twin:
/// `cpu::activation::leaky_relu_forward`.
pub fn leaky_relu_fwd(gpu: &Gpu, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize, slope: f32) -> Result<()> {
    let k = "leaky_relu_fwd_f32";
    let nl = flat_checks(k, n, &[("x", x.len()), ("y", y.len())])?;
    launch!(gpu, k, flat_cfg(n), x, y, &nl, &slope)
}

/// dx = x > 0 ? dy : slope dy. CPU twin: `cpu::activation::leaky_relu_backward`.
pub fn leaky_relu_bwd(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    n: usize,
    slope: f32,
) -> Result<()> {
    let k = "leaky_relu_bwd_f32";
    let nl = flat_checks(k, n, &[("x", x.len()), ("dy", dy.len()), ("dx", dx.len())])?;
    launch!(gpu, k, flat_cfg(n), x, dy, dx, &nl, &slope)
}

/// y = a + b. CPU twin: `cpu::activation::add`.
pub fn add_fwd(gpu: &Gpu, a: &CudaSlice<f32>, b: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize) -> Result<()> {
    let k = "add_fwd_f32";
    let nl = flat_checks(k, n, &[("a", a.len()), ("b", b.len()), ("y", y.len())])?;
    launch!(gpu, k, flat_cfg(n), a, b, y, &nl)
}

/// y = s x. CPU twin: `cpu::activation::scale`.
pub fn scale_fwd(gpu: &Gpu, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>, n: usize, s: f32) -> Result<()> {
    let k = "scale_fwd_f32";
    let nl = flat_checks(k, n, &[("x", x.len()), ("y", y.len())])?;
    launch!(gpu, k, flat_cfg(n), x, y, &nl, &s)
}

/// y = s[0] x, the factor read on the device. CPU twin: `cpu::activation::scale`.
pub fn scale_dev_fwd(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    n: usize,
    s: &CudaSlice<f32>,
) -> Result<()> {
    let k = "scale_dev_fwd_f32";
    let nl = flat_checks(k, n, &[("x", x.len()), ("y", y.len())])?;
    need(k, "s", s.len(), 1)?;
    launch!(gpu, k, flat_cfg(n), x, y, &nl, s)
}

/// y[r, j] = b[j] for an rows x cols `y`: the bias a dense layer's GEMM then accumulates onto.
/// CPU twin: `cpu::bias::broadcast_rows`.
pub fn bias_rows_fwd(gpu: &Gpu, b: &CudaSlice<f32>, y: &mut CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
    let k = "bias_rows_fwd_f32";
    nonzero(k, &[("rows", rows), ("columns", cols)])?;
    need(k, "b", b.len(), cols)?;
    need(k, "y", y.len(), elems(k, rows, cols)?)?;
    let (rl, ci) = (long(rows), int(k, "columns", cols)?);
    launch!(gpu, k, flat_cfg(rows * cols), b, y, &rl, &ci)
}

/// db[j] = sum over the rows of g[r, j] (row order, as the CPU). CPU twin: `cpu::bias::column_sums`.
pub fn bias_grad_bwd(gpu: &Gpu, g: &CudaSlice<f32>, db: &mut CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
    let k = "bias_grad_bwd_f32";
    nonzero(k, &[("rows", rows), ("columns", cols)])?;
    need(k, "g", g.len(), elems(k, rows, cols)?)?;
    need(k, "db", db.len(), cols)?;
    let (ri, ci) = (int(k, "rows", rows)?, int(k, "columns", cols)?);
    launch!(gpu, k, cfg((grid_dim(k, cols.div_ceil(BLOCK as usize))?, 1, 1), BLOCK), g, db, &ri, &ci)
}

/// Inverted dropout: `mask` = 0 with probability `p`, else 1 / (1 - p); y = x * mask. The mask
/// is the one `ops::dropout::dropout` draws for the same (`seed`, `stream`), bit for bit
/// ([`dropout_mask_host`] is the kernel's indexing in Rust).
pub fn dropout_fwd(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    mask: &mut CudaSlice<f32>,
    n: usize,
    p: f32,
    seed: u64,
    stream: u64,
) -> Result<()> {
    let k = "dropout_fwd_f32";
    if !(0.0..1.0).contains(&p) {
        return Err(Error::usage(format!("dropout: probability {p} is not in [0, 1)")));
    }
    let nl = flat_checks(k, n, &[("x", x.len()), ("y", y.len()), ("mask", mask.len())])?;
    let keep = 1.0f32 / (1.0 - p);
    let (seed_lo, seed_hi, stream_lo, stream_hi) =
        (seed as u32, (seed >> 32) as u32, stream as u32, (stream >> 32) as u32);
    launch!(gpu, k, flat_cfg(n.div_ceil(4)), x, y, mask, &nl, &p, &keep, &seed_lo, &seed_hi, &stream_lo, &stream_hi)
}

/// dx = dy * mask (the mask of [`dropout_fwd`]).
pub fn dropout_bwd(
    gpu: &Gpu,
    dy: &CudaSlice<f32>,
    mask: &CudaSlice<f32>,
    dx: &mut CudaSlice<f32>,
    n: usize,
) -> Result<()> {
    let k = "dropout_bwd_f32";
    let nl = flat_checks(k, n, &[("dy", dy.len()), ("mask", mask.len()), ("dx", dx.len())])?;
    launch!(gpu, k, flat_cfg(n), dy, mask, dx, &nl)
}

/// The dropout kernel's mask computed on the host with the kernel's indexing: element i takes
/// word i % 4 of Philox block i / 4 of stream (`seed`, `stream`), as `(u32 >> 8) * 2^-24`.
/// Because `Rng::uniform` consumes one u32 per call and numbers its blocks by a counter, this is
/// exactly the sequence `ops::dropout::dropout` draws (a CPU-only test checks it).
pub fn dropout_mask_host(n: usize, p: f32, seed: u64, stream: u64) -> Vec<f32> {
    let keep = 1.0f32 / (1.0 - p);
    let key = [seed as u32, (seed >> 32) as u32];
    (0..n.div_ceil(4))
        .flat_map(|blk| {
            let b = blk as u64;
            crate::rng::philox4x32([b as u32, (b >> 32) as u32, stream as u32, (stream >> 32) as u32], key)
        })
        .take(n)
        .map(|word| {
            let u = (word >> 8) as f32 * (1.0 / 16_777_216.0);
            if u < p {
                0.0
            } else {
                keep
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// batchnorm.cu

/// Per-channel statistics of a training forward, on the device (f32, c each).
pub struct BatchStatsGpu {
    /// Batch mean.
    pub mean: CudaSlice<f32>,
    /// Biased batch variance.
    pub var: CudaSlice<f32>,
    /// 1 / sqrt(var + eps).
    pub invstd: CudaSlice<f32>,
    /// gamma * invstd (the folded affine map).
    pub scale: CudaSlice<f32>,
    /// beta - mean * gamma * invstd.
    pub shift: CudaSlice<f32>,
}

/// Blocks per channel of the BN reductions: from (n, hw) only (so results do not depend on the
/// GPU), about 4096 elements per block, at most 256.
pub fn bn_splits(n: usize, hw: usize) -> usize {
    (n * hw).div_ceil(4096).clamp(1, 256)
}

struct BnSizes {
    n: i32,
    c: i32,
    hw: i32,
    splits: i32,
    total: i64,
    grid: (u32, u32, u32),
}

fn bn_checks(
    kernel: &str,
    n: usize,
    c: usize,
    hw: usize,
    bufs: &[(&str, usize)],
    per_ch: &[(&str, usize)],
) -> Result<BnSizes> {
    nonzero(kernel, &[("batch", n), ("channels", c), ("plane size", hw)])?;
    let total = elems(kernel, elems(kernel, n, c)?, hw)?;
    for &(what, len) in bufs {
        need(kernel, what, len, total)?;
    }
    for &(what, len) in per_ch {
        need(kernel, what, len, c)?;
    }
    int(kernel, "batch x plane", elems(kernel, n, hw)?)?;
    let splits = bn_splits(n, hw);
    Ok(BnSizes {
        n: int(kernel, "batch", n)?,
        c: int(kernel, "channels", c)?,
        hw: int(kernel, "plane size", hw)?,
        splits: splits as i32,
        total: long(total),
        grid: (grid_dim(kernel, c)?, splits as u32, 1),
    })
}

/// Training forward of batch norm over (N, H, W) per channel (NCHW, `hw` = H W), with LeakyReLU
/// of `slope` fused when given; returns the batch statistics. CPU twin:
/// `cpu::batchnorm::forward_train`. (The running-statistics update is the op's, not this
/// kernel's.)
pub fn batchnorm_train_fwd(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    n: usize,
    c: usize,
    hw: usize,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    eps: f32,
    slope: Option<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<BatchStatsGpu> {
    let k = "batchnorm_train_fwd";
    let s = bn_checks(k, n, c, hw, &[("x", x.len()), ("y", y.len())], &[("gamma", gamma.len()), ("beta", beta.len())])?;
    let mut part = gpu.zeros::<f64>(c * s.splits as usize * 2)?;
    launch!(gpu, "batchnorm_stats_fwd_f32", cfg(s.grid, BLOCK), x, &mut part, &s.n, &s.c, &s.hw, &s.splits)?;
    let mut st = BatchStatsGpu {
        mean: gpu.zeros(c)?,
        var: gpu.zeros(c)?,
        invstd: gpu.zeros(c)?,
        scale: gpu.zeros(c)?,
        shift: gpu.zeros(c)?,
    };
    launch!(
        gpu,
        "batchnorm_finish_fwd_f32",
        cfg((c.div_ceil(128) as u32, 1, 1), 128),
        x,
        &part,
        gamma,
        beta,
        &mut st.mean,
        &mut st.var,
        &mut st.invstd,
        &mut st.scale,
        &mut st.shift,
        &s.n,
        &s.c,
        &s.hw,
        &s.splits,
        &eps
    )?;
    let a = slope.unwrap_or(1.0);
    let total = s.total as usize;
    launch!(gpu, "batchnorm_norm_fwd_f32", flat_cfg(total), x, &st.scale, &st.shift, y, &s.total, &s.c, &s.hw, &a)?;
    Ok(st)
}

/// Evaluation forward with running statistics `mean`, `var` (then LeakyReLU when given).
/// CPU twin: `cpu::batchnorm::forward_eval`.
pub fn batchnorm_eval_fwd(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    n: usize,
    c: usize,
    hw: usize,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    mean: &CudaSlice<f32>,
    var: &CudaSlice<f32>,
    eps: f32,
    slope: Option<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<()> {
    let k = "batchnorm_eval_fwd_f32";
    let per_ch = [("gamma", gamma.len()), ("beta", beta.len()), ("mean", mean.len()), ("var", var.len())];
    let s = bn_checks(k, n, c, hw, &[("x", x.len()), ("y", y.len())], &per_ch)?;
    let a = slope.unwrap_or(1.0);
    let total = s.total as usize;
    launch!(gpu, k, flat_cfg(total), x, gamma, beta, mean, var, y, &s.total, &s.c, &s.hw, &eps, &a)
}

/// Training backward: `dx` (when given), `dgamma`, `dbeta` (overwritten), from the forward's
/// statistics (`mean`, `invstd` of `stats` are used). With `slope`, `dy` is the gradient of the
/// activation's output. CPU twin: `cpu::batchnorm::backward_train`.
pub fn batchnorm_train_bwd(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    dy: &CudaSlice<f32>,
    n: usize,
    c: usize,
    hw: usize,
    gamma: &CudaSlice<f32>,
    beta: &CudaSlice<f32>,
    slope: Option<f32>,
    stats: &BatchStatsGpu,
    dx: Option<&mut CudaSlice<f32>>,
    dgamma: &mut CudaSlice<f32>,
    dbeta: &mut CudaSlice<f32>,
) -> Result<()> {
    let k = "batchnorm_train_bwd";
    let per_ch = [
        ("gamma", gamma.len()),
        ("beta", beta.len()),
        ("mean", stats.mean.len()),
        ("invstd", stats.invstd.len()),
        ("dgamma", dgamma.len()),
        ("dbeta", dbeta.len()),
    ];
    let dx_len = dx.as_ref().map_or(usize::MAX, |d| d.len());
    let s = bn_checks(k, n, c, hw, &[("x", x.len()), ("dy", dy.len()), ("dx", dx_len)], &per_ch)?;
    let a = slope.unwrap_or(1.0);
    let mut part = gpu.zeros::<f64>(c * s.splits as usize * 2)?;
    launch!(
        gpu,
        "batchnorm_reduce_bwd_f32",
        cfg(s.grid, BLOCK),
        x,
        dy,
        &stats.mean,
        &stats.invstd,
        gamma,
        beta,
        &mut part,
        &s.n,
        &s.c,
        &s.hw,
        &s.splits,
        &a
    )?;
    let mut coef = gpu.zeros::<f32>(2 * c)?;
    launch!(
        gpu,
        "batchnorm_finish_bwd_f32",
        cfg((c.div_ceil(128) as u32, 1, 1), 128),
        &part,
        dgamma,
        dbeta,
        &mut coef,
        &s.n,
        &s.c,
        &s.hw,
        &s.splits
    )?;
    if let Some(dx) = dx {
        let total = s.total as usize;
        launch!(
            gpu,
            "batchnorm_dx_bwd_f32",
            flat_cfg(total),
            x,
            dy,
            &stats.mean,
            &stats.invstd,
            gamma,
            beta,
            &coef,
            dx,
            &s.total,
            &s.c,
            &s.hw,
            &a
        )?;
    }
    Ok(())
}

/// running = (1 - momentum) running + (momentum batch) factor on `n` channels, rounded as the
/// CPU rounds. CPU twin: `cpu::batchnorm::running_update`.
pub fn bn_running_update(
    gpu: &Gpu,
    running: &mut CudaSlice<f32>,
    batch: &CudaSlice<f32>,
    n: usize,
    momentum: f32,
    factor: f32,
) -> Result<()> {
    let k = "bn_running_fwd_f32";
    nonzero(k, &[("channels", n)])?;
    need(k, "running", running.len(), n)?;
    need(k, "batch", batch.len(), n)?;
    let ni = int(k, "channels", n)?;
    let keep = 1.0 - momentum;
    launch!(
        gpu,
        k,
        cfg((grid_dim(k, n.div_ceil(BLOCK as usize))?, 1, 1), BLOCK),
        running,
        batch,
        &ni,
        &keep,
        &momentum,
        &factor
    )
}

// ---------------------------------------------------------------------------------------------
// pool.cu

/// 2 x 2 max-pool (stride 2) of `planes` planes of h x w: `y` and the winner's offset `arg`
/// (planes x h/2 x w/2). CPU twin: `cpu::pool::maxpool_forward` with k = 2.
pub fn maxpool2_fwd(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    planes: usize,
    h: usize,
    w: usize,
    y: &mut CudaSlice<f32>,
    arg: &mut CudaSlice<u8>,
) -> Result<()> {
    let k = "maxpool2_fwd_f32";
    nonzero(k, &[("planes", planes), ("height / 2", h / 2), ("width / 2", w / 2)])?;
    need(k, "x", x.len(), elems(k, planes, elems(k, h, w)?)?)?;
    let out = planes * (h / 2) * (w / 2);
    need(k, "y", y.len(), out)?;
    need(k, "arg", arg.len(), out)?;
    let (hi, wi, pl) = (int(k, "h", h)?, int(k, "w", w)?, long(planes));
    int(k, "plane size", h * w)?;
    launch!(gpu, k, flat_cfg(out), x, y, arg, &pl, &hi, &wi)
}

/// Routes each output gradient to its window's winner; `dx` (planes x h x w) is overwritten,
/// zeros included. CPU twin: `cpu::pool::maxpool_backward` with k = 2.
pub fn maxpool2_bwd(
    gpu: &Gpu,
    dy: &CudaSlice<f32>,
    arg: &CudaSlice<u8>,
    planes: usize,
    h: usize,
    w: usize,
    dx: &mut CudaSlice<f32>,
) -> Result<()> {
    let k = "maxpool2_bwd_f32";
    nonzero(k, &[("planes", planes), ("height / 2", h / 2), ("width / 2", w / 2)])?;
    let total = elems(k, planes, elems(k, h, w)?)?;
    need(k, "dx", dx.len(), total)?;
    let out = planes * (h / 2) * (w / 2);
    need(k, "dy", dy.len(), out)?;
    need(k, "arg", arg.len(), out)?;
    let (hi, wi, pl) = (int(k, "h", h)?, int(k, "w", w)?, long(planes));
    int(k, "plane size", h * w)?;
    launch!(gpu, k, flat_cfg(total), dy, arg, dx, &pl, &hi, &wi)
}

/// Mean of each plane of `hw` elements. CPU twin: `cpu::pool::avgpool_forward`.
pub fn avgpool_fwd(gpu: &Gpu, x: &CudaSlice<f32>, planes: usize, hw: usize, y: &mut CudaSlice<f32>) -> Result<()> {
    let k = "avgpool_fwd_f32";
    nonzero(k, &[("planes", planes), ("plane size", hw)])?;
    need(k, "x", x.len(), elems(k, planes, hw)?)?;
    need(k, "y", y.len(), planes)?;
    let (pl, hwi) = (long(planes), int(k, "plane size", hw)?);
    launch!(gpu, k, rows_cfg(k, planes)?, x, y, &pl, &hwi)
}

/// Spreads each plane's gradient evenly over its `hw` elements. CPU twin:
/// `cpu::pool::avgpool_backward`.
pub fn avgpool_bwd(gpu: &Gpu, dy: &CudaSlice<f32>, planes: usize, hw: usize, dx: &mut CudaSlice<f32>) -> Result<()> {
    let k = "avgpool_bwd_f32";
    nonzero(k, &[("planes", planes), ("plane size", hw)])?;
    let total = elems(k, planes, hw)?;
    need(k, "dx", dx.len(), total)?;
    need(k, "dy", dy.len(), planes)?;
    let (pl, hwi) = (long(planes), int(k, "plane size", hw)?);
    launch!(gpu, k, flat_cfg(total), dy, dx, &pl, &hwi)
}

// ---------------------------------------------------------------------------------------------
// optim.cu

/// One Adam/AdamW step in place on the first `n` elements, with the host-computed scalars of
/// this step. CPU twin: `cpu::optim::adam_step` (bit-identical arithmetic).
pub fn adam_step(
    gpu: &Gpu,
    param: &mut CudaSlice<f32>,
    grad: &CudaSlice<f32>,
    exp_avg: &mut CudaSlice<f32>,
    exp_avg_sq: &mut CudaSlice<f32>,
    n: usize,
    s: &AdamScalars,
) -> Result<()> {
    let k = "adam_step_fwd_f32";
    let bufs =
        [("param", param.len()), ("grad", grad.len()), ("exp_avg", exp_avg.len()), ("exp_avg_sq", exp_avg_sq.len())];
    let nl = flat_checks(k, n, &bufs)?;
    launch!(
        gpu,
        k,
        flat_cfg(n),
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        &nl,
        &s.param_scale,
        &s.grad_decay,
        &s.one_minus_beta1,
        &s.beta2,
        &s.one_minus_beta2,
        &s.step_size,
        &s.bias_correction2_sqrt,
        &s.eps
    )
}

/// One SGD step in place; `momentum_buf` is None when momentum is 0 (no state). CPU twin:
/// `cpu::optim::sgd_step` (bit-identical arithmetic).
pub fn sgd_step(
    gpu: &Gpu,
    param: &mut CudaSlice<f32>,
    grad: &CudaSlice<f32>,
    momentum_buf: Option<&mut CudaSlice<f32>>,
    n: usize,
    s: &SgdScalars,
) -> Result<()> {
    match momentum_buf {
        None => {
            let k = "sgd_step_fwd_f32";
            let nl = flat_checks(k, n, &[("param", param.len()), ("grad", grad.len())])?;
            launch!(gpu, k, flat_cfg(n), param, grad, &nl, &s.lr, &s.weight_decay)
        }
        Some(buf) => {
            let k = "sgd_momentum_step_fwd_f32";
            let nl =
                flat_checks(k, n, &[("param", param.len()), ("grad", grad.len()), ("momentum buffer", buf.len())])?;
            let nesterov = i32::from(s.nesterov);
            launch!(gpu, k, flat_cfg(n), param, grad, buf, &nl, &s.lr, &s.momentum, &s.weight_decay, &nesterov)
        }
    }
}

/// avg = decay avg + (1 - decay) value on the first `n` elements. CPU twin:
/// `cpu::optim::ema_update` (bit-identical arithmetic).
pub fn ema_update(gpu: &Gpu, avg: &mut CudaSlice<f32>, value: &CudaSlice<f32>, n: usize, decay: f32) -> Result<()> {
    let k = "ema_update_fwd_f32";
    let nl = flat_checks(k, n, &[("avg", avg.len()), ("value", value.len())])?;
    launch!(gpu, k, flat_cfg(n), avg, value, &nl, &decay)
}

// ---------------------------------------------------------------------------------------------
// cuBLAS

/// C = alpha op(A) op(B) + beta C for ROW-MAJOR matrices: op(A) is m x k (A is stored m x k, or
/// k x m when `trans_a`), op(B) is k x n (stored k x n, or n x k when `trans_b`), C is m x n.
/// CPU twin: `cpu::gemm::sgemm`.
///
/// cuBLAS is column-major. A row-major r x c matrix is, byte for byte, the column-major c x r
/// matrix of its transpose, so the row-major product C = op(A) op(B) is computed as the
/// column-major C^T = op(B)^T op(A)^T: the operands are swapped (B first), m and n are swapped,
/// and each leading dimension is the row length of the stored row-major matrix. No data moves.
/// Plain FP32 math (no TF32 unless NVIDIA_TF32_OVERRIDE says so), so it matches the CPU GEMM to
/// f32 rounding.
pub fn sgemm(
    gpu: &Gpu,
    m: usize,
    n: usize,
    k: usize,
    a: &CudaSlice<f32>,
    trans_a: bool,
    b: &CudaSlice<f32>,
    trans_b: bool,
    c: &mut CudaSlice<f32>,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let kn = "sgemm";
    nonzero(kn, &[("m", m), ("n", n), ("k", k)])?;
    need(kn, "A", a.len(), elems(kn, m, k)?)?;
    need(kn, "B", b.len(), elems(kn, k, n)?)?;
    need(kn, "C", c.len(), elems(kn, m, n)?)?;
    let (mi, ni, ki) = (int(kn, "m", m)?, int(kn, "n", n)?, int(kn, "k", k)?);
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let config = GemmConfig {
        transa: op(trans_b),
        transb: op(trans_a),
        m: ni,
        n: mi,
        k: ki,
        alpha,
        lda: if trans_b { ki } else { ni },
        ldb: if trans_a { mi } else { ki },
        beta,
        ldc: ni,
    };
    let blas = gpu.blas()?;
    // SAFETY: the three buffers hold at least m k, k n and m n elements (checked above), which is
    // what these dimensions and leading dimensions address.
    unsafe { blas.gemm(config, b, a, c) }.map_err(|e| Error::device(format!("{kn}: {e}")))
}
