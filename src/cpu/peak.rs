//! Measured ceilings of this machine: f32 FMA throughput per core and copy bandwidth, so that
//! benchmarks can report a kernel as a fraction of what the hardware can do.

use rayon::prelude::*;
use std::time::Instant;

/// Independent FMA chains: enough to cover FMA latency (4) times 2 FMA ports.
const CHAINS: usize = 12;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop_avx512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(0.0); CHAINS];
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm512_fmadd_ps(*v, a, b);
        }
    }
    acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.0); CHAINS];
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, a, b);
        }
    }
    let mut out = [0.0f32; 8];
    let mut s = 0.0;
    for v in acc {
        _mm256_storeu_ps(out.as_mut_ptr(), v);
        s += out.iter().sum::<f32>();
    }
    s
}

/// Flops of one loop iteration and the loop itself, for the widest FMA this CPU has.
/// An FMA loop: runs `iters` iterations and returns a value that keeps it from being elided.
type FmaLoop = unsafe fn(u64) -> f32;

fn fma_kernel() -> Option<(f64, FmaLoop, &'static str)> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Some(((CHAINS * 16 * 2) as f64, fma_loop_avx512, "avx512"));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Some(((CHAINS * 8 * 2) as f64, fma_loop_avx2, "avx2"));
        }
    }
    None
}

/// Peak f32 GFLOP/s measured with `threads` threads running register-only FMA chains for about
/// `seconds`; returns (GFLOP/s, instruction set). None when the CPU has no FMA we know.
pub fn fma_peak_gflops(threads: usize, seconds: f64) -> Option<(f64, &'static str)> {
    let (flops_per_iter, kernel, isa) = fma_kernel()?;
    // Calibrate the iteration count on one thread, then run it on all of them at once.
    let mut iters = 1u64 << 16;
    loop {
        let t = Instant::now();
        // SAFETY: the kernel was chosen for a feature this CPU reports.
        std::hint::black_box(unsafe { kernel(iters) });
        if t.elapsed().as_secs_f64() > seconds / 4.0 {
            iters = (iters as f64 * seconds / t.elapsed().as_secs_f64()) as u64;
            break;
        }
        iters *= 2;
    }
    let t = Instant::now();
    (0..threads).into_par_iter().for_each(|_| {
        // SAFETY: as above.
        std::hint::black_box(unsafe { kernel(iters) });
    });
    let secs = t.elapsed().as_secs_f64();
    Some((flops_per_iter * iters as f64 * threads as f64 / secs / 1e9, isa))
}

/// Copy bandwidth in GB/s (bytes read + bytes written) over a buffer of `mib` MiB, best of 5.
pub fn copy_bandwidth_gbs(mib: usize) -> f64 {
    let n = mib * (1 << 20) / 4;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let chunk = n.div_ceil(super::threads()).max(1);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    (2 * n * 4) as f64 / best / 1e9
}
