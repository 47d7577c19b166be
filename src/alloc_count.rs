//! A counting global allocator: the `muscle` binary installs it so that `muscle bench` can report
//! how many large allocations a training step makes after warm-up (the target is none). Each
//! allocation of 64 KiB or more costs one relaxed atomic increment; smaller ones nothing extra.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Allocations at least this large are counted.
pub const LARGE_BYTES: usize = 1 << 16;

static LARGE: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The system allocator, counting large allocations.
pub struct CountingAlloc;

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            count(new_size);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[inline]
fn count(size: usize) {
    if size >= LARGE_BYTES {
        LARGE.fetch_add(1, Ordering::Relaxed);
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

/// Large allocations so far, or None when this process does not use `CountingAlloc`.
pub fn large_allocations() -> Option<usize> {
    INSTALLED.load(Ordering::Relaxed).then(|| LARGE.load(Ordering::Relaxed))
}
