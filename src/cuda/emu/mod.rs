//! The emulated CUDA device (emu/, built by build.rs when a C++ compiler was found): device
//! buffers and kernel launches over its C ABI (emu/runtime.h), as safe functions.
//!
//! The emulator runs the unchanged `kernels/*.cu` as C++ on the calling thread, each CUDA thread a
//! fiber; a kernel's bug (an out-of-bounds access, a missed barrier, a lane that leaves before a
//! shuffle, an argument of the wrong size) comes back as an [`Error`] of one line naming
//! `file:line`, block, warp and lane, never as a crash. emu/cuda_emu.h says what it does not
//! verify (codegen, FMA contraction, the memory model, resource limits, speed).

pub mod blas;
#[cfg(feature = "cudnn")]
pub mod dnn;

use super::elem::DeviceElem;
use crate::error::{Error, Result};
use std::ffi::{c_char, c_void, CStr, CString};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

#[repr(C)]
#[derive(Clone, Copy)]
struct Dim3 {
    x: u32,
    y: u32,
    z: u32,
}

extern "C" {
    fn cuda_emu_alloc(bytes: usize, out: *mut *mut c_void) -> *const c_char;
    fn cuda_emu_free(device: *mut c_void) -> *const c_char;
    fn cuda_emu_copy_htod(device_dst: *mut c_void, host_src: *const c_void, bytes: usize) -> *const c_char;
    fn cuda_emu_copy_dtoh(host_dst: *mut c_void, device_src: *const c_void, bytes: usize) -> *const c_char;
    fn cuda_emu_copy_dtod(device_dst: *mut c_void, device_src: *const c_void, bytes: usize) -> *const c_char;
    fn cuda_emu_memset(device_dst: *mut c_void, value: i32, bytes: usize) -> *const c_char;
    fn cuda_emu_has_kernel(name: *const c_char) -> i32;
    fn cuda_emu_launch(
        name: *const c_char,
        grid: Dim3,
        block: Dim3,
        shared_bytes: u32,
        args: *const *mut c_void,
        arg_sizes: *const usize,
        arg_count: usize,
    ) -> *const c_char;
}

/// The emulator's answer: NULL is success, anything else a one-line message (valid until the next
/// call on this thread, so it is copied at once).
fn check(what: &str, message: *const c_char) -> Result<()> {
    if message.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null answer is a NUL-terminated string the emulator keeps alive until the
    // next call from this thread; it is copied before any other call.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    Err(Error::device(format!("emulated CUDA device: {what}: {text}")))
}

/// Bytes of emulated device memory in use (every live [`EmuBuffer`]).
static IN_USE: AtomicUsize = AtomicUsize::new(0);

/// The emulated device's size in bytes: `MUSCLE_CUDA_EMU_MEMORY` (bytes, or with a K, M or G
/// suffix: powers of 1024) when set, so a test can give it a small memory; otherwise 16 GiB.
pub fn total_memory() -> Result<usize> {
    static TOTAL: OnceLock<std::result::Result<usize, String>> = OnceLock::new();
    TOTAL
        .get_or_init(|| match std::env::var("MUSCLE_CUDA_EMU_MEMORY") {
            Err(_) => Ok(16 << 30),
            Ok(v) => crate::memory::parse_size(&v)
                .and_then(|b| usize::try_from(b).ok())
                .ok_or_else(|| format!("MUSCLE_CUDA_EMU_MEMORY={v:?}: expected a size in bytes, e.g. 1048576 or 64M")),
        })
        .clone()
        .map_err(Error::usage)
}

/// Bytes of the emulated device's memory now in use.
pub fn memory_in_use() -> usize {
    IN_USE.load(Ordering::Relaxed)
}

/// Takes `bytes` from the emulated device's memory, or says it is out of memory.
fn reserve(bytes: usize) -> Result<()> {
    let total = total_memory()?;
    let mut used = IN_USE.load(Ordering::Relaxed);
    loop {
        let after = used.checked_add(bytes).filter(|&a| a <= total).ok_or_else(|| {
            Error::out_of_memory(format!(
                "out of memory on cuda:0 (emulated): {bytes} bytes requested, {} of {total} free",
                total.saturating_sub(used)
            ))
        })?;
        match IN_USE.compare_exchange_weak(used, after, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return Ok(()),
            Err(now) => used = now,
        }
    }
}

/// A buffer of `len` elements in the emulated device's memory, ending at an inaccessible page.
pub struct EmuBuffer<T: DeviceElem> {
    ptr: *mut c_void,
    len: usize,
    _elem: PhantomData<T>,
}

// SAFETY: the buffer is a plain allocation owned by this value; the emulator's runtime guards its
// buffer table and runs one launch at a time (emu/runtime.h), so the buffer may move between
// threads and be read from several, like a driver buffer.
unsafe impl<T: DeviceElem> Send for EmuBuffer<T> {}
// SAFETY: as above; shared access only reads the pointer and length.
unsafe impl<T: DeviceElem> Sync for EmuBuffer<T> {}

impl<T: DeviceElem> EmuBuffer<T> {
    /// A buffer of `len` elements left as the emulator makes them: 0xFF bytes, NaN as floats
    /// (uninitialised device memory holds garbage; this garbage shows).
    pub fn uninit(len: usize) -> Result<EmuBuffer<T>> {
        let bytes = Self::bytes_of(len)?;
        reserve(bytes)?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; the emulator writes a buffer of `bytes` bytes.
        if let Err(e) = check("alloc", unsafe { cuda_emu_alloc(bytes, &mut ptr) }) {
            IN_USE.fetch_sub(bytes, Ordering::Relaxed);
            return Err(e);
        }
        Ok(EmuBuffer { ptr, len, _elem: PhantomData })
    }

    /// A buffer of `len` zeros.
    pub fn zeros(len: usize) -> Result<EmuBuffer<T>> {
        let bytes = Self::bytes_of(len)?;
        let buf = EmuBuffer::uninit(len)?;
        // SAFETY: the buffer was just made with exactly `bytes` bytes.
        check("memset", unsafe { cuda_emu_memset(buf.ptr, 0, bytes) })?;
        Ok(buf)
    }

    /// A buffer holding a copy of `host`.
    pub fn from_host(host: &[T]) -> Result<EmuBuffer<T>> {
        let buf = EmuBuffer::uninit(host.len())?;
        // SAFETY: both ranges hold `len` elements of T.
        check("copy to device", unsafe {
            cuda_emu_copy_htod(buf.ptr, host.as_ptr().cast(), std::mem::size_of_val(host))
        })?;
        Ok(buf)
    }

    /// The elements, copied to the host.
    pub fn to_host(&self) -> Result<Vec<T>> {
        let mut host = vec![T::default(); self.len];
        // SAFETY: both ranges hold `len` elements of T.
        check("copy to host", unsafe {
            cuda_emu_copy_dtoh(host.as_mut_ptr().cast(), self.ptr, std::mem::size_of_val(host.as_slice()))
        })?;
        Ok(host)
    }

    /// Overwrites the first `host.len()` elements with `host`.
    pub fn write_host(&mut self, host: &[T]) -> Result<()> {
        if host.len() > self.len {
            return Err(Error::shape(format!("copy of {} elements into a buffer of {}", host.len(), self.len)));
        }
        // SAFETY: the device range holds at least host.len() elements (checked above).
        check("copy to device", unsafe {
            cuda_emu_copy_htod(self.ptr, host.as_ptr().cast(), std::mem::size_of_val(host))
        })
    }

    /// Copies `src[src_at..src_at + len]` into `self[at..at + len]` (bounds checked). The source
    /// may hold another element type of the same size (its bits are copied unchanged).
    pub fn copy_from<S: DeviceElem>(&mut self, src: &EmuBuffer<S>, src_at: usize, at: usize, len: usize) -> Result<()> {
        if std::mem::size_of::<S>() != std::mem::size_of::<T>() {
            return Err(Error::shape(format!("device copy from {} into {} elements", S::NAME, T::NAME)));
        }
        if src_at.checked_add(len).is_none_or(|e| e > src.len) || at.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(Error::shape(format!(
                "device copy of {len} elements from {src_at} of {} into {at} of {}",
                src.len, self.len
            )));
        }
        let size = std::mem::size_of::<T>();
        // SAFETY: both ranges lie inside their buffers (checked above); byte offsets of in-range
        // element indices do not overflow.
        check("device copy", unsafe {
            cuda_emu_copy_dtod(self.ptr.byte_add(at * size), src.ptr.byte_add(src_at * size), len * size)
        })
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn bytes_of(len: usize) -> Result<usize> {
        len.checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| Error::shape(format!("emulated CUDA device: a buffer of {len} elements overflows")))
    }
}

impl<T: DeviceElem> Drop for EmuBuffer<T> {
    fn drop(&mut self) {
        IN_USE.fetch_sub(self.len * std::mem::size_of::<T>(), Ordering::Relaxed);
        // SAFETY: `ptr` came from cuda_emu_alloc and is freed once. A failure here would mean a
        // corrupted allocator, which a destructor cannot report; the message is dropped.
        let _ = unsafe { cuda_emu_free(self.ptr) };
    }
}

/// One argument of a launch, as the kernel's parameter receives it.
pub enum Arg<'a> {
    /// A device pointer (`const T*` or `T*`).
    Buffer(*mut c_void, PhantomData<&'a ()>),
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

impl Arg<'_> {
    /// The buffer `b` as a pointer argument (the borrow keeps it alive for the launch).
    pub fn buffer<T: DeviceElem>(b: &EmuBuffer<T>) -> Arg<'_> {
        Arg::Buffer(b.ptr, PhantomData)
    }

    fn value_ptr(&mut self) -> (*mut c_void, usize) {
        fn raw<V>(v: &mut V) -> (*mut c_void, usize) {
            ((v as *mut V).cast(), std::mem::size_of::<V>())
        }
        match self {
            Arg::Buffer(p, _) => raw(p),
            Arg::I32(v) => raw(v),
            Arg::I64(v) => raw(v),
            Arg::U32(v) => raw(v),
            Arg::F32(v) => raw(v),
            Arg::F64(v) => raw(v),
        }
    }
}

/// Whether the emulator was built with kernel `name`.
pub fn has_kernel(name: &str) -> bool {
    CString::new(name).is_ok_and(|c| {
        // SAFETY: `c` is a NUL-terminated string that outlives the call.
        unsafe { cuda_emu_has_kernel(c.as_ptr()) == 1 }
    })
}

/// Runs kernel `name` on `grid` blocks of `block` threads and returns when it has finished. The
/// emulator checks the argument count and each argument's size against the kernel's signature,
/// and that every pointer lies in a device buffer.
pub fn launch(name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), mut args: Vec<Arg<'_>>) -> Result<()> {
    let c_name = CString::new(name).map_err(|_| Error::device(format!("kernel name {name:?} holds a NUL byte")))?;
    let (ptrs, sizes): (Vec<*mut c_void>, Vec<usize>) = args.iter_mut().map(Arg::value_ptr).unzip();
    let dim = |(x, y, z): (u32, u32, u32)| Dim3 { x, y, z };
    // SAFETY: every pointer in `ptrs` points into `args`, alive and unmoved for the call; the
    // emulator checks count, sizes and device pointers against the kernel before running it.
    check(name, unsafe {
        cuda_emu_launch(c_name.as_ptr(), dim(grid), dim(block), 0, ptrs.as_ptr(), sizes.as_ptr(), ptrs.len())
    })
}
