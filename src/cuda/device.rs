//! Probing CUDA without panicking, and the [`Gpu`] context: device, stream, loaded kernels,
//! cuBLAS handle.
//!
//! cudarc loads libcuda with dlopen on its first call and PANICS when the library is missing, so
//! every entry point here first asks `is_culib_present()` (which only tries the dlopen) and turns
//! its absence into a one-line [`Error`]. Later failures (no device, an old driver rejecting the
//! PTX) come back from cudarc as errors; as a last guard, a panic inside cudarc is caught and
//! turned into an error too.

use super::embedded::{KernelFile, KERNEL_FILES};
use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// What [`probe`] reports about a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Device ordinal (`cuda:N`).
    pub ordinal: usize,
    /// Device name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability (major, minor), e.g. (9, 0) for Hopper.
    pub compute_capability: (i32, i32),
    /// The driver's CUDA version as `cuDriverGetVersion` gives it (13000 = CUDA 13.0).
    pub driver_version: i32,
    /// Device memory in bytes.
    pub total_memory: usize,
}

impl GpuInfo {
    /// The driver's CUDA version as (major, minor).
    pub fn driver_cuda_version(&self) -> (i32, i32) {
        (self.driver_version / 1000, (self.driver_version % 1000) / 10)
    }
}

impl fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (dmaj, dmin) = self.driver_cuda_version();
        write!(
            f,
            "{} (cuda:{}, compute capability {}.{}, {:.1} GiB, driver CUDA {dmaj}.{dmin})",
            self.name,
            self.ordinal,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_memory as f64 / (1u64 << 30) as f64
        )
    }
}

/// Where the loaded kernels' PTX came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtxOrigin {
    /// nvcc at build time (build.rs), embedded in the binary.
    Nvcc,
    /// NVRTC at run time, from the embedded sources (nvcc was missing at build time).
    Nvrtc,
}

/// Runs `f`, turning a panic inside a CUDA library wrapper into an error.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(Error::device(format!("{what}: {}", first_line(msg))))
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

pub(crate) fn device_err(what: impl fmt::Display, e: impl fmt::Display) -> Error {
    Error::device(format!("{what}: {}", first_line(&e.to_string())))
}

/// Is the NVIDIA driver library loadable? (Only tries to dlopen it; makes no CUDA call.)
pub fn driver_present() -> bool {
    // SAFETY: is_culib_present only attempts to open the library and drops it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Is NVRTC (libnvrtc) loadable?
pub fn nvrtc_present() -> bool {
    // SAFETY: as above, a dlopen attempt only.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Is cuBLAS (libcublas) loadable?
pub fn cublas_present() -> bool {
    // SAFETY: as above, a dlopen attempt only.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// Is cuDNN (libcudnn) loadable? (A dlopen attempt only.)
#[cfg(feature = "cudnn")]
pub fn cudnn_present() -> bool {
    // SAFETY: is_culib_present only attempts to open the library and drops it.
    unsafe { cudarc::cudnn::sys::is_culib_present() }
}

/// cuDNN's version as (major, minor, patch), or why it is unavailable.
#[cfg(feature = "cudnn")]
pub fn cudnn_version() -> Result<(usize, usize, usize)> {
    if !cudnn_present() {
        return Err(Error::device("cuDNN is not available: libcudnn.so was not found"));
    }
    guarded("cuDNN", || {
        let v = cudarc::cudnn::result::get_version();
        // cuDNN 9 encodes major * 10000 + minor * 100 + patch (8.x used * 1000 + * 100).
        Ok(if v >= 90000 { (v / 10000, (v % 10000) / 100, v % 100) } else { (v / 1000, (v % 1000) / 100, v % 100) })
    })
}

/// Checks that GPU 0 is usable and describes it; a one-line error (never a panic) when there is
/// no driver, no device, or CUDA fails to initialise.
pub fn probe() -> Result<GpuInfo> {
    probe_ordinal(0)
}

/// [`probe`] for device `ordinal`.
pub fn probe_ordinal(ordinal: usize) -> Result<GpuInfo> {
    open(ordinal).map(|(_, info)| info)
}

fn open(ordinal: usize) -> Result<(Arc<CudaContext>, GpuInfo)> {
    if !driver_present() {
        return Err(Error::device(
            "CUDA is not available: the NVIDIA driver library (libcuda.so) was not found on this machine",
        ));
    }
    guarded("CUDA", || {
        let what = format!("cuda:{ordinal}");
        let ctx = CudaContext::new(ordinal).map_err(|e| device_err(&what, e))?;
        let name = ctx.name().map_err(|e| device_err(&what, e))?;
        let compute_capability = ctx.compute_capability().map_err(|e| device_err(&what, e))?;
        let total_memory = ctx.total_mem().map_err(|e| device_err(&what, e))?;
        let mut driver_version = 0i32;
        // SAFETY: the driver is loaded and initialised (CudaContext::new succeeded); the pointer is
        // to a live i32.
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(|e| device_err(&what, e))?;
        Ok((ctx, GpuInfo { ordinal, name, compute_capability, driver_version, total_memory }))
    })
}

/// The NVRTC options: the same virtual architecture as build.rs gives nvcc (capped at the
/// device's), line info, and no fast math.
fn nvrtc_options(file: &KernelFile, arch: &str) -> CompileOptions {
    CompileOptions {
        options: vec![
            format!("--gpu-architecture={arch}"),
            "--generate-line-info".to_string(),
            "--std=c++17".to_string(),
        ],
        name: Some(format!("{}.cu", file.name)),
        ..Default::default()
    }
}

/// Compiles one embedded kernel source to PTX with NVRTC for `arch` (e.g. "compute_80"). Needs
/// libnvrtc but no GPU: the parity tests use it to check the sources on machines without one.
pub fn compile_with_nvrtc(file: &KernelFile, arch: &str) -> Result<String> {
    if !nvrtc_present() {
        return Err(Error::device(format!(
            "kernels/{}.cu: no PTX was built (nvcc was missing at build time) and NVRTC (libnvrtc.so) was not found",
            file.name
        )));
    }
    let what = format!("NVRTC on kernels/{}.cu", file.name);
    guarded(&what, || match cudarc::nvrtc::compile_ptx_with_opts(file.source, nvrtc_options(file, arch)) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, .. }) => {
            // The whole log: a compile error is for a developer, who needs every line of it.
            Err(Error::device(format!("{what}: {}", log.to_string_lossy().trim())))
        }
        Err(e) => Err(device_err(&what, e)),
    })
}

/// A GPU with every kernel of `kernels/*.cu` loaded, one stream, and cuBLAS when available.
///
/// All work goes to one stream, in order; [`Gpu::download`] waits for it.
pub struct Gpu {
    info: GpuInfo,
    stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    origin: PtxOrigin,
    blas: std::result::Result<CudaBlas, String>,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens device `ordinal`, creates a stream and loads every kernel (the embedded PTX, or the
    /// sources compiled by NVRTC when build.rs found no nvcc).
    pub fn new(ordinal: usize) -> Result<Gpu> {
        let (ctx, info) = open(ordinal)?;
        guarded("CUDA", || {
            let stream = ctx.new_stream().map_err(|e| device_err("creating a CUDA stream", e))?;
            let (major, minor) = info.compute_capability;
            let arch =
                if (major, minor) >= (8, 0) { "compute_80".to_string() } else { format!("compute_{major}{minor}") };
            let mut functions = HashMap::new();
            let mut origin = PtxOrigin::Nvcc;
            for file in KERNEL_FILES {
                let ptx = match file.ptx {
                    Some(ptx) => Ptx::from_src(ptx),
                    None => {
                        origin = PtxOrigin::Nvrtc;
                        Ptx::from_src(compile_with_nvrtc(file, &arch)?)
                    }
                };
                let module =
                    ctx.load_module(ptx).map_err(|e| device_err(format!("loading kernels/{}.cu", file.name), e))?;
                for &name in file.kernels {
                    let f = module.load_function(name).map_err(|e| device_err(format!("kernel {name}"), e))?;
                    functions.insert(name, f);
                }
            }
            let blas = if cublas_present() {
                CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS: {e}"))
            } else {
                Err("cuBLAS is not available: libcublas.so was not found".to_string())
            };
            Ok(Gpu { info, stream, functions, origin, blas })
        })
    }

    /// The device this context runs on.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Where the kernels' PTX came from.
    pub fn origin(&self) -> PtxOrigin {
        self.origin
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A loaded kernel by its `extern "C"` name.
    pub fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::device(format!("kernel {name} is not loaded")))
    }

    /// The cuBLAS handle (bound to this context's stream), or why there is none.
    pub fn blas(&self) -> Result<&CudaBlas> {
        self.blas.as_ref().map_err(|e| Error::device(e.clone()))
    }

    /// Copies host data to a new device buffer (an empty slice is an error: CUDA does not allocate
    /// zero bytes).
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return Err(Error::shape("upload: empty buffer"));
        }
        self.stream.clone_htod(host).map_err(|e| device_err("copy to the GPU", e))
    }

    /// Copies a device buffer to the host, after all work queued before it has finished.
    pub fn download<T: DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        let v = self.stream.clone_dtoh(dev).map_err(|e| device_err("copy from the GPU", e))?;
        self.synchronize()?;
        Ok(v)
    }

    /// A new zeroed device buffer of `len` elements (at least 1).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        if len == 0 {
            return Err(Error::shape("zeros: empty buffer"));
        }
        self.stream.alloc_zeros(len).map_err(|e| device_err(format!("allocating {len} elements on the GPU"), e))
    }

    /// Waits for all queued work; reports a failed kernel (an asynchronous error) here.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| device_err("CUDA stream", e))
    }

    /// Median seconds of `reps` calls of `f`, each synchronised, after one warm-up call (the first
    /// error stops the timing and is returned).
    pub fn median_secs(&self, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        let mut err = None;
        let t = crate::profile::median_secs(reps, || {
            if err.is_none() {
                if let Err(e) = f().and_then(|_| self.synchronize()) {
                    err = Some(e);
                }
            }
        });
        err.map_or(Ok(t), Err)
    }
}
