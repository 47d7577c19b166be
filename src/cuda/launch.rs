//! What every launcher shares: the launch macro, the size checks that run before each unsafe
//! launch (a buffer shorter than the kernel will touch is an error, never an out-of-bounds
//! access; a size beyond a kernel's `int` is an error, never a wrap), and the launch shapes.
//! Buffers may be longer than needed (pooled buffers); element counts are explicit arguments.
//!
//! Each op family's launchers live in its folder (`src/ops/<family>/cuda.rs`, `src/optim/cuda.rs`,
//! `src/tensor/cuda.rs`), one safe function per kernel of its `kernels/<family>.cu`, with its CPU
//! twin named in the docs. Launches are asynchronous: an error inside a kernel surfaces at the
//! next synchronising call ([`Gpu::download`], [`Gpu::synchronize`]).

use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;

/// Threads per block of every kernel (8 warps).
pub(crate) const BLOCK: u32 = 256;

/// Rows per block of the one-warp-per-row kernels.
pub(crate) const ROWS_PER_BLOCK: usize = (BLOCK / 32) as usize;

/// Cap on the blocks of the grid-stride kernels (about 8 waves of an H100's 132 SMs at 8 blocks
/// each): more blocks would only add scheduling work.
pub(crate) const MAX_FLAT_BLOCKS: usize = 8192;

/// Launches `$name` on `$gpu`'s stream with the given arguments (each a reference that outlives
/// the launch). The caller has checked every buffer against the sizes the kernel uses.
macro_rules! launch {
    ($gpu:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let name: &str = $name;
        let func = $gpu.function(name)?;
        let mut builder = $gpu.stream().launch_builder(func);
        $( cudarc::driver::PushKernelArg::arg(&mut builder, $arg); )+
        // SAFETY: the arguments match the kernel's parameter list in kernels/*.cu in order and
        // type (i32 = int, i64 = long long, u32 = unsigned int, f32 = float, f64 = double, slices
        // = pointers), and every buffer holds at least the elements the kernel addresses for these
        // sizes (checked by the caller).
        unsafe { builder.launch($cfg) }.map(|_| ()).map_err(|e| $crate::error::Error::device(format!("{name}: {e}")))
    }};
}

pub(crate) fn need(kernel: &str, what: &str, len: usize, want: usize) -> Result<()> {
    if len < want {
        return Err(Error::shape(format!("{kernel}: {what} has {len} elements, the kernel needs {want}")));
    }
    Ok(())
}

pub(crate) fn int(kernel: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::shape(format!("{kernel}: {what} = {v} is beyond the kernel's 32-bit range")))
}

pub(crate) fn long(v: usize) -> i64 {
    v as i64
}

pub(crate) fn nonzero(kernel: &str, sizes: &[(&str, usize)]) -> Result<()> {
    for &(what, v) in sizes {
        if v == 0 {
            return Err(Error::shape(format!("{kernel}: {what} is 0")));
        }
    }
    Ok(())
}

/// n x c with overflow checked.
pub(crate) fn elems(kernel: &str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b).ok_or_else(|| Error::shape(format!("{kernel}: {a} x {b} elements overflow")))
}

pub(crate) fn cfg(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

pub(crate) fn grid_dim(kernel: &str, blocks: usize) -> Result<u32> {
    u32::try_from(blocks)
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::shape(format!("{kernel}: {blocks} blocks exceed the grid limit")))
}

/// One warp per row: ceil(rows / 8) blocks of 256.
pub(crate) fn rows_cfg(kernel: &str, rows: usize) -> Result<LaunchConfig> {
    Ok(cfg((grid_dim(kernel, rows.div_ceil(ROWS_PER_BLOCK))?, 1, 1), BLOCK))
}

/// Grid-stride loop over `n` items.
pub(crate) fn flat_cfg(n: usize) -> LaunchConfig {
    cfg((n.div_ceil(BLOCK as usize).clamp(1, MAX_FLAT_BLOCKS) as u32, 1, 1), BLOCK)
}

/// Checks an n x c row-major launch: both sizes nonzero and within `int`, each buffer long
/// enough; returns (n, c) as the kernel's ints.
pub(crate) fn row_checks(kernel: &str, n: usize, c: usize, bufs: &[(&str, usize)]) -> Result<(i32, i32)> {
    nonzero(kernel, &[("rows", n), ("columns", c)])?;
    let nc = elems(kernel, n, c)?;
    for &(what, len) in bufs {
        need(kernel, what, len, nc)?;
    }
    Ok((int(kernel, "rows", n)?, int(kernel, "columns", c)?))
}

/// Checks a flat launch over `n` elements: nonzero, each buffer long enough; returns n as the
/// kernel's long long.
pub(crate) fn flat_checks(kernel: &str, n: usize, bufs: &[(&str, usize)]) -> Result<i64> {
    nonzero(kernel, &[("n", n)])?;
    for &(what, len) in bufs {
        need(kernel, what, len, n)?;
    }
    Ok(long(n))
}

pub(crate) use launch;

/// Defines the launcher of a one-warp-per-row kernel `kernel(buffers..., int n, int c)` over
/// row-major n x c buffers: both sizes nonzero and within `int`, every buffer at least n x c
/// elements (checked, named in the error), then one warp per row.
macro_rules! rows_launcher {
    ($(#[$doc:meta])* $name:ident => $kernel:literal ($($buf:ident: $ty:ty),+ $(,)?)) => {
        $(#[$doc])*
        pub fn $name(gpu: &$crate::cuda::Gpu, $($buf: $ty,)+ n: usize, c: usize) -> $crate::error::Result<()> {
            let k = $kernel;
            let (ni, ci) = $crate::cuda::launch::row_checks(k, n, c, &[$((stringify!($buf), $buf.len())),+])?;
            $crate::cuda::launch::launch!(gpu, k, $crate::cuda::launch::rows_cfg(k, n)?, $($buf,)+ &ni, &ci)
        }
    };
}

/// Defines the launcher of a grid-stride kernel `kernel(buffers..., long long n, scalars...)`
/// over the first `n` elements of each buffer: n nonzero, every buffer at least n elements
/// (checked, named in the error).
macro_rules! flat_launcher {
    ($(#[$doc:meta])* $name:ident => $kernel:literal ($($buf:ident: $ty:ty),+ ; $($s:ident: $sty:ty),* $(,)?)) => {
        $(#[$doc])*
        pub fn $name(gpu: &$crate::cuda::Gpu, $($buf: $ty,)+ n: usize $(, $s: $sty)*) -> $crate::error::Result<()> {
            let k = $kernel;
            let nl = $crate::cuda::launch::flat_checks(k, n, &[$((stringify!($buf), $buf.len())),+])?;
            $crate::cuda::launch::launch!(gpu, k, $crate::cuda::launch::flat_cfg(n), $($buf,)+ &nl $(, &$s)*)
        }
    };
}

pub(crate) use {flat_launcher, rows_launcher};
