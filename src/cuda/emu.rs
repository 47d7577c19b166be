//! The emulated CUDA device (emu/, built by build.rs when a C++ compiler was found): device
//! buffers and kernel launches over its C ABI (emu/runtime.h), as safe functions.
//!
//! The emulator runs the unchanged `kernels/*.cu` as C++ on the calling thread, each CUDA thread a
//! fiber; a kernel's bug (an out-of-bounds access, a missed barrier, a lane that leaves before a
//! shuffle, an argument of the wrong size) comes back as an [`Error`] of one line naming
//! `file:line`, block, warp and lane, never as a crash. emu/cuda_emu.h says what it does not
//! verify (codegen, FMA contraction, the memory model, resource limits, speed).

use crate::error::{Error, Result};
use std::ffi::{c_char, c_void, CStr, CString};
use std::marker::PhantomData;

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

/// Element types a buffer may hold: plain data whose every bit pattern is a value.
pub trait DeviceValue: Copy + Default + 'static {}
impl DeviceValue for f32 {}
impl DeviceValue for f64 {}
impl DeviceValue for i32 {}
impl DeviceValue for u8 {}

/// A buffer of `len` elements in the emulated device's memory, ending at an inaccessible page.
pub struct EmuBuffer<T: DeviceValue> {
    ptr: *mut c_void,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T: DeviceValue> EmuBuffer<T> {
    /// A buffer of `len` zeros.
    pub fn zeros(len: usize) -> Result<EmuBuffer<T>> {
        let bytes = Self::bytes_of(len)?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; the emulator writes a buffer of `bytes` bytes.
        check("alloc", unsafe { cuda_emu_alloc(bytes, &mut ptr) })?;
        let buf = EmuBuffer { ptr, len, _elem: PhantomData };
        // SAFETY: the buffer was just made with exactly `bytes` bytes.
        check("memset", unsafe { cuda_emu_memset(buf.ptr, 0, bytes) })?;
        Ok(buf)
    }

    /// A buffer holding a copy of `host`.
    pub fn from_host(host: &[T]) -> Result<EmuBuffer<T>> {
        let buf = EmuBuffer::zeros(host.len())?;
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

impl<T: DeviceValue> Drop for EmuBuffer<T> {
    fn drop(&mut self) {
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
    pub fn buffer<T: DeviceValue>(b: &EmuBuffer<T>) -> Arg<'_> {
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
