//! Device buffers: [`CudaSlice`] is the one buffer type of the launchers and tensors, held in the
//! driver's memory (cudarc) or in the emulated device's (emu/), so the same launcher code runs on
//! either.

pub use super::elem::DeviceElem;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};

/// An f32 device buffer: what most launchers take and return.
pub type F32Buf = CudaSlice<f32>;

/// Where a buffer's memory is.
pub(crate) enum Memory<T: DeviceElem> {
    /// On a real GPU, through the CUDA driver.
    Driver(cudarc::driver::CudaSlice<T>),
    /// In the emulated device's memory (guard-paged host memory).
    #[cfg(muscle_cuda_emu)]
    Emulated(super::emu::EmuBuffer<T>),
}

/// A buffer of `len` elements of T on device `ordinal` (real or emulated).
pub struct CudaSlice<T: DeviceElem> {
    pub(crate) memory: Memory<T>,
    ordinal: usize,
}

/// Device bytes held by live buffers (every device together) and their high-water mark: what
/// the memory estimate (`train::estimate`) measures a small step's device footprint with.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Device bytes held by live buffers now.
pub fn device_bytes_live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most device bytes held at once since the last [`reset_device_peak`].
pub fn device_bytes_peak() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new device high-water mark at the bytes held now.
pub fn reset_device_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

impl<T: DeviceElem> CudaSlice<T> {
    pub(crate) fn new(memory: Memory<T>, ordinal: usize) -> CudaSlice<T> {
        let s = CudaSlice { memory, ordinal };
        let live = LIVE.fetch_add(s.bytes(), Ordering::Relaxed) + s.bytes();
        PEAK.fetch_max(live, Ordering::Relaxed);
        s
    }

    fn bytes(&self) -> usize {
        self.len() * std::mem::size_of::<T>()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.memory {
            Memory::Driver(s) => s.len(),
            #[cfg(muscle_cuda_emu)]
            Memory::Emulated(b) => b.len(),
        }
    }

    /// Whether the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The device ordinal (`cuda:N`) the buffer lives on.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Whether the buffer is in the emulated device's memory.
    pub fn is_emulated(&self) -> bool {
        !matches!(self.memory, Memory::Driver(_))
    }

    /// The driver buffer (an error for an emulated one: the caller mixed devices).
    pub(crate) fn driver(&self) -> Result<&cudarc::driver::CudaSlice<T>> {
        match &self.memory {
            Memory::Driver(s) => Ok(s),
            #[cfg(muscle_cuda_emu)]
            Memory::Emulated(_) => Err(mixed()),
        }
    }

    /// The driver buffer, mutably.
    pub(crate) fn driver_mut(&mut self) -> Result<&mut cudarc::driver::CudaSlice<T>> {
        match &mut self.memory {
            Memory::Driver(s) => Ok(s),
            #[cfg(muscle_cuda_emu)]
            Memory::Emulated(_) => Err(mixed()),
        }
    }

    /// The emulated buffer (an error for a driver one).
    #[cfg(muscle_cuda_emu)]
    pub(crate) fn emulated(&self) -> Result<&super::emu::EmuBuffer<T>> {
        match &self.memory {
            Memory::Emulated(b) => Ok(b),
            Memory::Driver(_) => Err(mixed()),
        }
    }

    /// The emulated buffer, mutably.
    #[cfg(muscle_cuda_emu)]
    pub(crate) fn emulated_mut(&mut self) -> Result<&mut super::emu::EmuBuffer<T>> {
        match &mut self.memory {
            Memory::Emulated(b) => Ok(b),
            Memory::Driver(_) => Err(mixed()),
        }
    }
}

impl<T: DeviceElem> Drop for CudaSlice<T> {
    fn drop(&mut self) {
        LIVE.fetch_sub(self.bytes(), Ordering::Relaxed);
    }
}

#[cfg_attr(not(muscle_cuda_emu), allow(dead_code))]
fn mixed() -> Error {
    Error::device("a buffer of the emulated CUDA device met the real one (or the reverse): one process uses one")
}

impl<T: DeviceElem> std::fmt::Debug for CudaSlice<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = if self.is_emulated() { " (emulated)" } else { "" };
        write!(f, "CudaSlice<{}>[{}] on cuda:{}{place}", T::NAME, self.len(), self.ordinal)
    }
}
