//! Probing CUDA without panicking, and the [`Gpu`] context: device, stream, loaded kernels,
//! cuBLAS handle.
//!
//! cudarc loads libcuda with dlopen on its first call and PANICS when the library is missing, so
//! every entry point here first asks `is_culib_present()` (which only tries the dlopen) and turns
//! its absence into a one-line [`Error`]. Later failures (no device, an old driver rejecting the
//! PTX) come back from cudarc as errors; as a last guard, a panic inside cudarc is caught and
//! turned into an error too.

use super::buffer::{CudaSlice, DeviceElem, Memory};
use super::embedded::{KernelFile, KERNEL_FILES};
use super::launch::KernelArg;
use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::collections::HashMap;
use std::fmt;
use std::mem::size_of;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Whether this is the emulated device (`MUSCLE_CUDA_EMU=1`), not a GPU.
    pub emulated: bool,
}

impl GpuInfo {
    /// The driver's CUDA version as (major, minor).
    pub fn driver_cuda_version(&self) -> (i32, i32) {
        (self.driver_version / 1000, (self.driver_version % 1000) / 10)
    }
}

impl fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.emulated {
            return write!(
                f,
                "{} (cuda:{}, the kernels compiled as C++ and run on the CPU, {:.1} GiB)",
                self.name,
                self.ordinal,
                self.total_memory as f64 / (1u64 << 30) as f64
            );
        }
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
    /// No PTX: the emulated device runs the sources compiled as C++ (emu/).
    Emulated,
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
    if emulation_requested() {
        return emulated(ordinal).map(|g| g.info);
    }
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
        Ok((ctx, GpuInfo { ordinal, name, compute_capability, driver_version, total_memory, emulated: false }))
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

/// The device's transfers and synchronisations since it was created (the step-transfer test reads
/// them: a training step should copy to and from the host once each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfers {
    /// Host-to-device copies.
    pub h2d: u64,
    /// Bytes copied host-to-device.
    pub h2d_bytes: u64,
    /// Device-to-host copies (each one synchronises).
    pub d2h: u64,
    /// Bytes copied device-to-host.
    pub d2h_bytes: u64,
    /// Explicit synchronisations ([`Gpu::synchronize`]).
    pub syncs: u64,
}

#[derive(Default)]
struct Counters {
    h2d: AtomicU64,
    h2d_bytes: AtomicU64,
    d2h: AtomicU64,
    d2h_bytes: AtomicU64,
    syncs: AtomicU64,
}

/// The CUDA driver side of a [`Gpu`]: stream, loaded kernels, cuBLAS.
pub(crate) struct Driver {
    /// The stream every launch goes to.
    pub(crate) stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    blas: std::result::Result<CudaBlas, String>,
}

impl Driver {
    /// A loaded kernel by its `extern "C"` name.
    pub(crate) fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::device(format!("kernel {name} is not loaded")))
    }

    /// The cuBLAS handle (bound to the stream), or why there is none.
    pub(crate) fn blas(&self) -> Result<&CudaBlas> {
        self.blas.as_ref().map_err(|e| Error::device(e.clone()))
    }
}

/// What runs a [`Gpu`]'s work: the CUDA driver, or the emulated device (emu/).
pub(crate) enum Backend {
    Driver(Driver),
    #[cfg(muscle_cuda_emu)]
    Emulated,
}

/// Whether `MUSCLE_CUDA_EMU=1` asks for the emulated device instead of the driver.
pub fn emulation_requested() -> bool {
    std::env::var("MUSCLE_CUDA_EMU").is_ok_and(|v| v == "1")
}

/// The emulated device (`MUSCLE_CUDA_EMU=1`), or why there is none in this build.
fn emulated(ordinal: usize) -> Result<Gpu> {
    #[cfg(muscle_cuda_emu)]
    {
        if ordinal != 0 {
            return Err(Error::device(format!("cuda:{ordinal}: the emulated CUDA device is cuda:0 only")));
        }
        let info = GpuInfo {
            ordinal,
            name: "cuda (emulated)".to_string(),
            compute_capability: (8, 0),
            driver_version: 0,
            total_memory: super::emu::total_memory()?,
            emulated: true,
        };
        Ok(Gpu { info, origin: PtxOrigin::Emulated, backend: Backend::Emulated, counters: Counters::default() })
    }
    #[cfg(not(muscle_cuda_emu))]
    {
        let _ = ordinal;
        Err(Error::device(
            "MUSCLE_CUDA_EMU=1, but this build has no emulated CUDA device (build.rs found no C++ compiler)",
        ))
    }
}

/// A GPU with every kernel of `kernels/*.cu` loaded, one stream, and cuBLAS when available; or
/// the emulated device, which runs the same kernels as C++ on the CPU (`MUSCLE_CUDA_EMU=1`).
///
/// All work goes to one stream, in order; [`Gpu::download`] waits for it.
pub struct Gpu {
    info: GpuInfo,
    origin: PtxOrigin,
    backend: Backend,
    counters: Counters,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).field("origin", &self.origin).finish_non_exhaustive()
    }
}

impl Gpu {
    /// Opens device `ordinal`, creates a stream and loads every kernel (the embedded PTX, or the
    /// sources compiled by NVRTC when build.rs found no nvcc). With `MUSCLE_CUDA_EMU=1`, the
    /// emulated device instead.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        if emulation_requested() {
            return emulated(ordinal);
        }
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
            let backend = Backend::Driver(Driver { stream, functions, blas });
            Ok(Gpu { info, origin, backend, counters: Counters::default() })
        })
    }

    /// The device this context runs on.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// Where the loaded kernels came from.
    pub fn origin(&self) -> PtxOrigin {
        self.origin
    }

    /// Whether this is the emulated device.
    pub fn is_emulated(&self) -> bool {
        self.info.emulated
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Whether SGEMM can run: cuBLAS loaded on a GPU, the stand-in on the emulated device.
    pub fn blas_available(&self) -> Result<()> {
        match &self.backend {
            Backend::Driver(d) => d.blas().map(|_| ()),
            #[cfg(muscle_cuda_emu)]
            Backend::Emulated => Ok(()),
        }
    }

    /// Bytes of device memory free now (for the emulated device: its size less what its live
    /// buffers hold).
    pub fn free_memory(&self) -> Result<usize> {
        match &self.backend {
            Backend::Driver(d) => d
                .stream
                .context()
                .mem_get_info()
                .map(|(free, _)| free)
                .map_err(|e| device_err(format!("cuda:{}: free memory", self.info.ordinal), e)),
            #[cfg(muscle_cuda_emu)]
            Backend::Emulated => Ok(self.info.total_memory.saturating_sub(super::emu::memory_in_use())),
        }
    }

    /// The transfers and synchronisations so far.
    pub fn transfers(&self) -> Transfers {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Transfers {
            h2d: get(&c.h2d),
            h2d_bytes: get(&c.h2d_bytes),
            d2h: get(&c.d2h),
            d2h_bytes: get(&c.d2h_bytes),
            syncs: get(&c.syncs),
        }
    }

    fn count(counter: &AtomicU64, bytes: &AtomicU64, n: usize) {
        counter.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn wrap<T: DeviceElem>(&self, memory: Memory<T>) -> CudaSlice<T> {
        CudaSlice::new(memory, self.info.ordinal)
    }

    /// Copies host data to a new device buffer (an empty slice is an error: CUDA does not allocate
    /// zero bytes).
    pub fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return Err(Error::shape("upload: empty buffer"));
        }
        Self::count(&self.counters.h2d, &self.counters.h2d_bytes, std::mem::size_of_val(host));
        let memory = match &self.backend {
            Backend::Driver(d) => Memory::Driver(
                d.stream.clone_htod(host).map_err(|e| alloc_err(&self.info, "copy to the GPU", host.len(), e))?,
            ),
            #[cfg(muscle_cuda_emu)]
            Backend::Emulated => Memory::Emulated(super::emu::EmuBuffer::from_host(host)?),
        };
        Ok(self.wrap(memory))
    }

    /// Copies a device buffer to the host, after all work queued before it has finished.
    pub fn download<T: DeviceElem>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        Self::count(&self.counters.d2h, &self.counters.d2h_bytes, dev.len() * std::mem::size_of::<T>());
        match &self.backend {
            Backend::Driver(d) => {
                let v = d.stream.clone_dtoh(dev.driver()?).map_err(|e| device_err("copy from the GPU", e))?;
                d.stream.synchronize().map_err(|e| device_err("CUDA stream", e))?;
                Ok(v)
            }
            #[cfg(muscle_cuda_emu)]
            Backend::Emulated => dev.emulated()?.to_host(),
        }
    }

    /// A new zeroed device buffer of `len` elements (at least 1).
    pub fn zeros<T: DeviceElem>(&self, len: usize) -> Result<CudaSlice<T>> {
        if len == 0 {
            return Err(Error::shape("zeros: empty buffer"));
        }
        let memory = match &self.backend {
            Backend::Driver(d) => Memory::Driver(
                d.stream.alloc_zeros(len).map_err(|e| alloc_err(&self.info, "allocating", len * size_of::<T>(), e))?,
            ),
            #[cfg(muscle_cuda_emu)]
            Backend::Emulated => Memory::Emulated(super::emu::EmuBuffer::zeros(len)?),
        };
        Ok(self.wrap(memory))
    }

    /// A device-to-device copy of all of `s`.
    pub fn copy<T: DeviceElem>(&self, s: &CudaSlice<T>) -> Result<CudaSlice<T>> {
        let memory = match &self.backend {
            Backend::Driver(d) => Memory::Driver(
                d.stream
                    .clone_dtod(s.driver()?)
                    .map_err(|e| alloc_err(&self.info, "copy on the GPU", s.len() * size_of::<T>(), e))?,
            ),
            #[cfg(muscle_cuda_emu)]
            Backend::Emulated => {
                let mut b = super::emu::EmuBuffer::uninit(s.len())?;
                b.copy_from(s.emulated()?, 0, 0, s.len())?;
                Memory::Emulated(b)
            }
        };
        Ok(self.wrap(memory))
    }

    /// Copies `src[from]` into `dst` starting at `at`, on the stream (bounds checked).
    pub fn copy_range<T: DeviceElem>(
        &self,
        src: &CudaSlice<T>,
        from: Range<usize>,
        dst: &mut CudaSlice<T>,
        at: usize,
    ) -> Result<()> {
        let len = from.len();
        if len == 0 {
            return Ok(());
        }
        if from.end > src.len() || at.checked_add(len).is_none_or(|e| e > dst.len()) {
            return Err(Error::shape(format!(
                "GPU copy of elements {from:?} of {} into {at}.. of {}",
                src.len(),
                dst.len()
            )));
        }
        match &self.backend {
            Backend::Driver(d) => d
                .stream
                .memcpy_dtod(&src.driver()?.slice(from), &mut dst.driver_mut()?.slice_mut(at..at + len))
                .map_err(|e| device_err("copy on the GPU", e)),
            #[cfg(muscle_cuda_emu)]
            Backend::Emulated => dst.emulated_mut()?.copy_from(src.emulated()?, from.start, at, len),
        }
    }

    /// Copies the bits of `src[from]` into the start of `dst`, whose element type has the same
    /// size (e.g. i32 labels packed into an f32 upload); a device-to-device copy.
    pub fn copy_bits<S: DeviceElem, D: DeviceElem>(
        &self,
        src: &CudaSlice<S>,
        from: Range<usize>,
        dst: &mut CudaSlice<D>,
    ) -> Result<()> {
        let len = from.len();
        if size_of::<S>() != size_of::<D>() || from.end > src.len() || len > dst.len() {
            return Err(Error::shape(format!(
                "GPU bit copy of {} elements {from:?} of {} into {} of {}",
                S::NAME,
                src.len(),
                D::NAME,
                dst.len()
            )));
        }
        if len == 0 {
            return Ok(());
        }
        match &self.backend {
            Backend::Driver(d) => {
                let view = src.driver()?.slice(from);
                // SAFETY: same element size (checked), and every bit pattern is a valid D
                // (DeviceElem's contract).
                let bits = unsafe { view.transmute::<D>(len) }
                    .ok_or_else(|| Error::shape("GPU bit copy: the source view is too short"))?;
                d.stream
                    .memcpy_dtod(&bits, &mut dst.driver_mut()?.slice_mut(0..len))
                    .map_err(|e| device_err("copy on the GPU", e))
            }
            #[cfg(muscle_cuda_emu)]
            Backend::Emulated => dst.emulated_mut()?.copy_from(src.emulated()?, from.start, 0, len),
        }
    }

    /// Runs kernel `name` with `args` (the launchers' [`launch!`](super::launch) builds them).
    pub(crate) fn launch(&self, name: &str, cfg: LaunchConfig, args: &[KernelArg<'_>]) -> Result<()> {
        match &self.backend {
            Backend::Driver(d) => {
                let func = d.function(name)?;
                let mut builder = d.stream.launch_builder(func);
                for a in args {
                    a.push(&mut builder)?;
                }
                // SAFETY: the launcher passed the arguments in the order and of the types of the
                // kernel's parameter list in kernels/*.cu (i32 = int, i64 = long long, u32 =
                // unsigned int, f32 = float, f64 = double, buffers = pointers), after checking
                // every buffer against the elements the kernel addresses for these sizes.
                unsafe { builder.launch(cfg) }.map(|_| ()).map_err(|e| Error::device(format!("{name}: {e}")))
            }
            #[cfg(muscle_cuda_emu)]
            Backend::Emulated => {
                let args = args.iter().map(KernelArg::emulated).collect::<Result<Vec<_>>>()?;
                super::emu::launch(name, cfg.grid_dim, cfg.block_dim, args)
            }
        }
    }

    /// Waits for all queued work; reports a failed kernel (an asynchronous error) here.
    pub fn synchronize(&self) -> Result<()> {
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        match &self.backend {
            Backend::Driver(d) => d.stream.synchronize().map_err(|e| device_err("CUDA stream", e)),
            // Emulated launches finish before they return.
            #[cfg(muscle_cuda_emu)]
            Backend::Emulated => Ok(()),
        }
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

/// A failed allocation or copy: out of memory names the bytes and the device's free memory.
fn alloc_err(info: &GpuInfo, what: &str, bytes: usize, e: impl fmt::Display) -> Error {
    let text = e.to_string();
    if text.contains("OUT_OF_MEMORY") {
        let free = cudarc::driver::result::mem_get_info().map(|(free, _)| free).unwrap_or(0);
        return Error::out_of_memory(format!(
            "out of memory on cuda:{}: {what} {bytes} bytes, {free} of {} bytes free",
            info.ordinal, info.total_memory
        ));
    }
    device_err(format!("{what} {bytes} bytes on cuda:{}", info.ordinal), text)
}
