//! A pool of large f32 buffers, keyed by length. Training repeats the same shapes every step, so
//! after the first step every large tensor reuses a buffer instead of asking the OS for fresh
//! pages (whose page faults and zeroing cost more than the elementwise ops themselves).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Buffers shorter than this go straight to the allocator (small ones are cheap there).
const MIN_LEN: usize = 1 << 14;
/// At most this many bytes are kept idle in the pool.
const MAX_POOLED_BYTES: usize = 6 << 30;

static POOLED_BYTES: AtomicUsize = AtomicUsize::new(0);

fn pool() -> &'static Mutex<HashMap<usize, Vec<Vec<f32>>>> {
    static P: OnceLock<Mutex<HashMap<usize, Vec<Vec<f32>>>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(HashMap::new()))
}

fn reuse(len: usize) -> Option<Vec<f32>> {
    if len < MIN_LEN {
        return None;
    }
    let v = pool().lock().ok()?.get_mut(&len)?.pop()?;
    POOLED_BYTES.fetch_sub(len * 4, Ordering::Relaxed);
    Some(v)
}

/// A buffer of `len` elements whose contents are arbitrary (stale values of an earlier tensor):
/// for kernels that overwrite every element.
pub fn take(len: usize) -> Vec<f32> {
    reuse(len).unwrap_or_else(|| vec![0.0; len])
}

/// A buffer of `len` zeros.
pub fn zeros(len: usize) -> Vec<f32> {
    match reuse(len) {
        Some(mut v) => {
            v.fill(0.0);
            v
        }
        None => take(len),
    }
}

/// A buffer of `len` zeros, or an out-of-memory error naming `what` instead of an abort: for
/// sizes that come from the user or a file (a batch size, an image folder).
pub fn try_zeros(len: usize, what: impl FnOnce() -> String) -> crate::error::Result<Vec<f32>> {
    if let Some(mut v) = reuse(len) {
        v.fill(0.0);
        return Ok(v);
    }
    let mut v = Vec::new();
    if v.try_reserve_exact(len).is_err() {
        let gib = len as f64 * 4.0 / (1u64 << 30) as f64;
        return Err(crate::error::Error::out_of_memory(format!("{}: {gib:.1} GiB could not be allocated", what())));
    }
    v.resize(len, 0.0);
    Ok(v)
}

/// Frees every idle buffer (the memory estimate measures a step from an empty pool).
pub fn clear() {
    if let Ok(mut p) = pool().lock() {
        p.clear();
        POOLED_BYTES.store(0, Ordering::Relaxed);
    }
}

/// Returns a buffer to the pool (or frees it when the pool is full or it is small).
pub fn give(v: Vec<f32>) {
    let len = v.len();
    if len < MIN_LEN || v.capacity() != len {
        return;
    }
    if POOLED_BYTES.fetch_add(len * 4, Ordering::Relaxed) + len * 4 > MAX_POOLED_BYTES {
        POOLED_BYTES.fetch_sub(len * 4, Ordering::Relaxed);
        return;
    }
    match pool().lock() {
        Ok(mut p) => p.entry(len).or_default().push(v),
        Err(_) => {
            POOLED_BYTES.fetch_sub(len * 4, Ordering::Relaxed);
        }
    }
}
