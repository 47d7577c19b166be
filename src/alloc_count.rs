//! The `muscle` binary's global allocator: the system allocator with a small cache of large
//! blocks, counting large allocation requests and how many of them reached the system.
//!
//! Why a cache: the GEMM crate allocates its packing buffer on every call it packs for (one
//! product per image per conv, thousands per training step), and after the first step the same
//! sizes repeat. Freed blocks of 64 KiB or more are kept (up to `CACHE_BYTES`, exact size and
//! alignment match) and handed back to the next request of that shape, so that a training step
//! after warm-up asks the system for no large block: no mmap/munmap, no page faults, no zeroing.
//! `muscle bench` reports both counts per step. Smaller blocks go straight to the system
//! allocator at the cost of one comparison. Large blocks start on a cache line (glibc's large
//! blocks start 16 bytes past a page): a whole-vector load or store of a tensor then never
//! splits across two lines (wrn-28-2's 8 x 8 Winograd forward, one thread: 6.7 -> 5.9 ms).
//!
//! It also keeps the bytes live (allocated and not yet freed, blocks of every size) and their
//! high-water mark, so that the memory estimate (`train::estimate`) can measure what a small
//! training step needs and scale it to the requested batch.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Allocations at least this large are counted and cached.
pub const LARGE_BYTES: usize = 1 << 16;
/// At most this many bytes are held in the cache.
const CACHE_BYTES: usize = 512 << 20;
/// Cache slots (a linear search per large request; large requests are rare and expensive anyway).
const SLOTS: usize = 256;

static REQUESTS: AtomicUsize = AtomicUsize::new(0);
static SYSTEM: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Counts `bytes` as live (when the allocation succeeded) and raises the high-water mark.
fn count_alloc(p: *mut u8, bytes: usize) -> *mut u8 {
    if !p.is_null() {
        let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
    p
}

/// One cached block: its layout and address (null when the slot is empty).
#[derive(Clone, Copy)]
struct Slot {
    size: usize,
    align: usize,
    ptr: *mut u8,
}

/// The cache proper, behind a spin lock (the allocator may not allocate, so no std Mutex).
struct Cache {
    lock: AtomicBool,
    slots: std::cell::UnsafeCell<[Slot; SLOTS]>,
    bytes: std::cell::UnsafeCell<usize>,
}

// SAFETY: `slots` and `bytes` are only touched while `lock` is held (see `with`).
unsafe impl Sync for Cache {}

static CACHE: Cache = Cache {
    lock: AtomicBool::new(false),
    slots: std::cell::UnsafeCell::new([Slot { size: 0, align: 0, ptr: ptr::null_mut() }; SLOTS]),
    bytes: std::cell::UnsafeCell::new(0),
};

impl Cache {
    /// Runs `f` on the slots and the cached byte count under the lock.
    fn with<R>(&self, f: impl FnOnce(&mut [Slot; SLOTS], &mut usize) -> R) -> R {
        while self.lock.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            std::hint::spin_loop();
        }
        // SAFETY: the lock is held, so no other thread touches the cells until it is released.
        let r = unsafe { f(&mut *self.slots.get(), &mut *self.bytes.get()) };
        self.lock.store(false, Ordering::Release);
        r
    }

    /// A cached block of exactly this layout, if any.
    fn take(&self, layout: Layout) -> Option<*mut u8> {
        self.with(|slots, bytes| {
            let s =
                slots.iter_mut().find(|s| !s.ptr.is_null() && s.size == layout.size() && s.align == layout.align())?;
            *bytes -= s.size;
            Some(std::mem::replace(&mut s.ptr, ptr::null_mut()))
        })
    }

    /// Keeps `p` for reuse; false when the cache is full (the caller frees it).
    fn put(&self, p: *mut u8, layout: Layout) -> bool {
        self.with(|slots, bytes| {
            if *bytes + layout.size() > CACHE_BYTES {
                return false;
            }
            match slots.iter_mut().find(|s| s.ptr.is_null()) {
                Some(s) => {
                    *s = Slot { size: layout.size(), align: layout.align(), ptr: p };
                    *bytes += layout.size();
                    true
                }
                None => false,
            }
        })
    }
}

/// Alignment of every large block: a cache line, so that a kernel's 64-byte vector loads and
/// stores at multiples of 16 floats from a buffer's start never straddle two lines.
const LARGE_ALIGN: usize = 64;

/// The layout a large block is asked of (and returned to) the system allocator with.
fn system_layout(layout: Layout) -> Layout {
    // A larger power-of-two alignment of a valid layout is valid while the size does not overflow
    // isize rounded up to it (large blocks are far from that).
    layout.align_to(LARGE_ALIGN).unwrap_or(layout)
}

/// The system allocator with the large-block cache and counters.
pub struct CountingAlloc;

impl CountingAlloc {
    fn large(&self, layout: Layout, zeroed: bool) -> *mut u8 {
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        INSTALLED.store(true, Ordering::Relaxed);
        if let Some(p) = CACHE.take(layout) {
            if zeroed {
                // SAFETY: p is a live block of layout.size() bytes that nobody else holds.
                unsafe { ptr::write_bytes(p, 0, layout.size()) };
            }
            return p;
        }
        SYSTEM.fetch_add(1, Ordering::Relaxed);
        let layout = system_layout(layout);
        // SAFETY: layout has a non-zero size (it is large).
        unsafe {
            if zeroed {
                System.alloc_zeroed(layout)
            } else {
                System.alloc(layout)
            }
        }
    }
}

// SAFETY: every block comes from the system allocator with the layout it is later freed with
// (a large block's `system_layout`, a function of the caller's layout, on both sides):
// cached blocks are only handed out for an identical (size, align) layout, and a block is either
// in the cache or held by one owner, never both.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= LARGE_BYTES {
            return count_alloc(self.large(layout, false), layout.size());
        }
        count_alloc(System.alloc(layout), layout.size())
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= LARGE_BYTES {
            return count_alloc(self.large(layout, true), layout.size());
        }
        count_alloc(System.alloc_zeroed(layout), layout.size())
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        if layout.size() < LARGE_BYTES {
            return System.dealloc(p, layout);
        }
        if !CACHE.put(p, layout) {
            System.dealloc(p, system_layout(layout))
        }
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.size() < LARGE_BYTES && new_size < LARGE_BYTES {
            let q = System.realloc(p, layout, new_size);
            if !q.is_null() {
                LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
                count_alloc(q, new_size);
            }
            return q;
        }
        // Through alloc + copy + dealloc, so that cached blocks keep their exact layouts.
        // SAFETY: the caller guarantees new_size, with layout's alignment, is a valid layout.
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let q = self.alloc(new_layout);
        if !q.is_null() {
            ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
            self.dealloc(p, layout);
        }
        q
    }
}

/// Allocation requests of `LARGE_BYTES` or more so far, or None when this process does not use
/// `CountingAlloc` (library use).
pub fn large_allocations() -> Option<usize> {
    INSTALLED.load(Ordering::Relaxed).then(|| REQUESTS.load(Ordering::Relaxed))
}

/// Of those, the ones the cache could not serve (they reached the system allocator).
pub fn large_system_allocations() -> Option<usize> {
    INSTALLED.load(Ordering::Relaxed).then(|| SYSTEM.load(Ordering::Relaxed))
}

/// Bytes allocated and not yet freed, or None without `CountingAlloc` (library use).
pub fn live_bytes() -> Option<usize> {
    INSTALLED.load(Ordering::Relaxed).then(|| LIVE.load(Ordering::Relaxed))
}

/// The most bytes live at once since the last [`reset_peak`] (None without `CountingAlloc`).
pub fn peak_bytes() -> Option<usize> {
    INSTALLED.load(Ordering::Relaxed).then(|| PEAK.load(Ordering::Relaxed))
}

/// Frees every cached block (after one-off work whose block sizes will not come again, such as
/// the memory estimate's probes, so that they do not stay resident).
pub fn release_cache() {
    // Collected under the lock, freed after it: the system allocator is not called with it held.
    let mut blocks = Vec::with_capacity(SLOTS);
    CACHE.with(|slots, bytes| {
        for s in slots.iter_mut().filter(|s| !s.ptr.is_null()) {
            blocks.push(*s);
            *s = Slot { size: 0, align: 0, ptr: ptr::null_mut() };
        }
        *bytes = 0;
    });
    for s in blocks {
        // SAFETY: the block came from System with this layout and is no longer in the cache.
        unsafe { System.dealloc(s.ptr, system_layout(Layout::from_size_align_unchecked(s.size, s.align))) };
    }
}

/// Starts a new high-water mark at the bytes live now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_blocks_come_back_only_for_their_exact_layout() {
        let a = CountingAlloc;
        let l1 = Layout::from_size_align(LARGE_BYTES + 40, 64).expect("layout");
        let l2 = Layout::from_size_align(LARGE_BYTES + 48, 64).expect("layout");
        // SAFETY: every block is used within its layout and freed with it exactly once.
        unsafe {
            let p = a.alloc(l1);
            assert!(!p.is_null());
            p.write_bytes(7, l1.size());
            a.dealloc(p, l1);
            let q = a.alloc(l2);
            assert_ne!(p, q, "another size must not get the cached block");
            let r = a.alloc_zeroed(l1);
            assert_eq!(r, p, "the same layout gets the cached block back");
            assert!(std::slice::from_raw_parts(r, l1.size()).iter().all(|&b| b == 0), "alloc_zeroed zeroes it");
            let s = a.realloc(r, l1, 3 * LARGE_BYTES);
            assert!(std::slice::from_raw_parts(s, l1.size()).iter().all(|&b| b == 0), "realloc keeps the bytes");
            a.dealloc(s, Layout::from_size_align(3 * LARGE_BYTES, 64).expect("layout"));
            a.dealloc(q, l2);
        }
        let (req, sys) = (large_allocations().unwrap_or(0), large_system_allocations().unwrap_or(0));
        assert!(req >= 4 && sys < req, "requests {req}, system {sys}");
    }

    /// A large Vec<f32> (4-byte layout) starts on a cache line, fresh and from the cache, and
    /// goes back through realloc; small blocks keep the system's alignment.
    #[test]
    fn large_blocks_start_on_a_cache_line() {
        let a = CountingAlloc;
        let l = Layout::from_size_align(LARGE_BYTES + 12, 4).expect("layout");
        // SAFETY: every block is used within its layout and freed with it exactly once.
        unsafe {
            let p = a.alloc(l);
            assert!(!p.is_null() && (p as usize).is_multiple_of(LARGE_ALIGN), "fresh block at {p:?}");
            a.dealloc(p, l);
            let q = a.alloc(l);
            assert!((q as usize).is_multiple_of(LARGE_ALIGN), "cached block at {q:?}");
            let r = a.realloc(q, l, 2 * LARGE_BYTES);
            assert!(!r.is_null() && (r as usize).is_multiple_of(LARGE_ALIGN), "grown block at {r:?}");
            let small = a.realloc(r, Layout::from_size_align(2 * LARGE_BYTES, 4).expect("layout"), 100);
            assert!(!small.is_null());
            a.dealloc(small, Layout::from_size_align(100, 4).expect("layout"));
        }
    }
}
