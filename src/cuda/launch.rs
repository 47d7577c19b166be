//! What every launcher shares: the launch macro, the size checks that run before each unsafe
//! launch (a buffer shorter than the kernel will touch is an error, never an out-of-bounds
//! access; a size beyond a kernel's `int` is an error, never a wrap), and the launch shapes.
//! Buffers may be longer than needed (pooled buffers); element counts are explicit arguments.
//!
//! Each op family's launchers live in its folder (`src/ops/<family>/cuda.rs`, `src/optim/cuda.rs`,
//! `src/tensor/cuda.rs`), one safe function per kernel of its `kernels/<family>.cu`, with its CPU
//! twin named in the docs. Launches are asynchronous: an error inside a kernel surfaces at the
//! next synchronising call ([`Gpu::download`], [`Gpu::synchronize`]).

use super::buffer::CudaSlice;
use crate::error::{Error, Result};
use cudarc::driver::LaunchConfig;

/// Threads per block of every kernel (8 warps).
pub(crate) const BLOCK: u32 = 256;

/// Rows per block of the one-warp-per-row kernels.
pub(crate) const ROWS_PER_BLOCK: usize = (BLOCK / 32) as usize;

/// Cap on the blocks of the grid-stride kernels (about 8 waves of an H100's 132 SMs at 8 blocks
/// each): more blocks would only add scheduling work.
pub(crate) const MAX_FLAT_BLOCKS: usize = 8192;

/// One kernel argument, as the launchers pass it: a device buffer or a scalar. Made by
/// [`launch!`] from the references a launcher lists (`&CudaSlice<T>`, `&mut CudaSlice<T>`,
/// `&i32`, `&i64`, `&u32`, `&f32`, `&f64`).
pub enum KernelArg<'a> {
    /// A `const float*` / `float*` parameter.
    F32s(&'a CudaSlice<f32>),
    /// A `const double*` / `double*` parameter.
    F64s(&'a CudaSlice<f64>),
    /// A `const int*` / `int*` parameter.
    I32s(&'a CudaSlice<i32>),
    /// A `const unsigned char*` / `unsigned char*` parameter.
    U8s(&'a CudaSlice<u8>),
    /// `int`.
    I32(i32),
    /// `long long`.
    I64(i64),
    /// `unsigned int`.
    U32(u32),
    /// `float`.
    F32(f32),
    /// `double`.
    F64(f64),
}

macro_rules! kernel_arg_from {
    ($($buf:ident: $t:ty),+ ; $($scalar:ident: $s:ty),+) => {
        $(
            impl<'a> From<&'a CudaSlice<$t>> for KernelArg<'a> {
                fn from(b: &'a CudaSlice<$t>) -> KernelArg<'a> {
                    KernelArg::$buf(b)
                }
            }
            impl<'a> From<&'a mut CudaSlice<$t>> for KernelArg<'a> {
                fn from(b: &'a mut CudaSlice<$t>) -> KernelArg<'a> {
                    KernelArg::$buf(b)
                }
            }
        )+
        $(
            impl From<&$s> for KernelArg<'_> {
                fn from(v: &$s) -> Self {
                    KernelArg::$scalar(*v)
                }
            }
        )+
    };
}

kernel_arg_from!(F32s: f32, F64s: f64, I32s: i32, U8s: u8; I32: i32, I64: i64, U32: u32, F32: f32, F64: f64);

impl<'a> KernelArg<'a> {
    /// Pushes the argument onto a driver launch (a buffer of the emulated device is an error).
    /// Every buffer is pushed as read (cudarc records a read event, not a write): harmless while
    /// all work goes to the one stream of a `Gpu`, which orders it; a second stream would need the
    /// written buffers pushed mutably.
    pub(crate) fn push<'b>(&'b self, builder: &mut cudarc::driver::LaunchArgs<'b>) -> Result<()>
    where
        'a: 'b,
    {
        use cudarc::driver::PushKernelArg;
        match self {
            KernelArg::F32s(b) => builder.arg(b.driver()?),
            KernelArg::F64s(b) => builder.arg(b.driver()?),
            KernelArg::I32s(b) => builder.arg(b.driver()?),
            KernelArg::U8s(b) => builder.arg(b.driver()?),
            KernelArg::I32(v) => builder.arg(v),
            KernelArg::I64(v) => builder.arg(v),
            KernelArg::U32(v) => builder.arg(v),
            KernelArg::F32(v) => builder.arg(v),
            KernelArg::F64(v) => builder.arg(v),
        };
        Ok(())
    }

    /// The argument as the emulator takes it (a driver buffer is an error).
    #[cfg(muscle_cuda_emu)]
    pub(crate) fn emulated(&self) -> Result<super::emu::Arg<'a>> {
        use super::emu::Arg;
        Ok(match *self {
            KernelArg::F32s(b) => Arg::buffer(b.emulated()?),
            KernelArg::F64s(b) => Arg::buffer(b.emulated()?),
            KernelArg::I32s(b) => Arg::buffer(b.emulated()?),
            KernelArg::U8s(b) => Arg::buffer(b.emulated()?),
            KernelArg::I32(v) => Arg::I32(v),
            KernelArg::I64(v) => Arg::I64(v),
            KernelArg::U32(v) => Arg::U32(v),
            KernelArg::F32(v) => Arg::F32(v),
            KernelArg::F64(v) => Arg::F64(v),
        })
    }
}

/// Launches `$name` on `$gpu` (driver or emulated) with the given arguments (each a reference to
/// a buffer or a scalar, in the kernel's parameter order). The caller has checked every buffer
/// against the sizes the kernel uses.
macro_rules! launch {
    ($gpu:expr, $name:expr, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let args = [$( $crate::cuda::launch::KernelArg::from($arg) ),+];
        $gpu.launch($name, $cfg, &args)
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
