//! A switchable wall-clock profile by op name: `MUSCLE_PROFILE=1` (or `profile::enable`) makes
//! every instrumented op add its time to a table that `report` prints. Off, a scope costs one
//! relaxed atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);

fn table() -> &'static Mutex<HashMap<&'static str, (u64, f64)>> {
    static T: OnceLock<Mutex<HashMap<&'static str, (u64, f64)>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Turns profiling on (also done by `MUSCLE_PROFILE=1` at the first `init`).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Reads `MUSCLE_PROFILE` once.
pub fn init_from_env() {
    if std::env::var("MUSCLE_PROFILE").map(|v| v != "0" && !v.is_empty()).unwrap_or(false) {
        enable();
    }
}

/// Whether profiling is on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Times a scope under `name` when profiling is on.
pub struct Scope {
    name: &'static str,
    start: Option<Instant>,
}

/// Starts timing `name`; the time is recorded when the returned guard drops.
pub fn scope(name: &'static str) -> Scope {
    Scope { name, start: enabled().then(Instant::now) }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(s) = self.start {
            let dt = s.elapsed().as_secs_f64();
            if let Ok(mut t) = table().lock() {
                let e = t.entry(self.name).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += dt;
            }
        }
    }
}

/// The table, largest total first: (name, calls, seconds).
pub fn report() -> Vec<(&'static str, u64, f64)> {
    let mut v: Vec<_> = table().lock().map(|t| t.iter().map(|(k, v)| (*k, v.0, v.1)).collect()).unwrap_or_default();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v
}

/// Clears the table.
pub fn reset() {
    if let Ok(mut t) = table().lock() {
        t.clear();
    }
}

/// Median seconds of `reps` calls of `f` after one warm-up call: the timing every kernel benchmark
/// (`muscle bench --op`, each family's `bench` module) reports.
pub fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Floating-point operations of the products (convolutions, matrix products) recorded for a
/// training step, forward and backward, by the direct count (2 per multiply-add).
static FLOPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Adds `n` to the FLOP count (ops call it when they record a product on a tape).
pub fn add_flops(n: u64) {
    FLOPS.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
}

/// The FLOPs counted so far (`muscle bench` reads it per step for its roofline line).
pub fn flops() -> u64 {
    FLOPS.load(std::sync::atomic::Ordering::Relaxed)
}
