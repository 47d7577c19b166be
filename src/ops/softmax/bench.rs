//! The fused softmax + cross-entropy timed in isolation (`muscle bench --op softmax-ce`): loss and
//! logit gradient against hard labels, on random logits of std 3.

use super::cpu;
use crate::profile::median_secs;
use crate::rng::normal_vec;
use std::hint::black_box;

/// The labels every benchmark uses: row i has class 7 i mod c.
fn labels(n: usize, c: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 7) % c).collect()
}

/// Median seconds of one CPU call at n x c.
pub fn cpu_time(n: usize, c: usize, reps: usize) -> f64 {
    let x = normal_vec(n * c, 3.0, 3);
    let labels = labels(n, c);
    let mut g = vec![0.0f32; n * c];
    median_secs(reps, || {
        black_box(cpu::cross_entropy_hard_fwd(&x, &labels, c, &mut g));
    })
}

/// Median seconds of one synchronised GPU call at n x c (labels as the kernel's i32).
#[cfg(feature = "cuda")]
pub fn cuda_time(gpu: &crate::cuda::Gpu, n: usize, c: usize, reps: usize) -> crate::error::Result<f64> {
    let x = gpu.upload(&normal_vec(n * c, 3.0, 3))?;
    let ids: Vec<i32> = labels(n, c).into_iter().map(|l| l as i32).collect();
    let ids = gpu.upload(&ids)?;
    let mut g = gpu.zeros::<f32>(n * c)?;
    gpu.median_secs(reps, || super::cuda::cross_entropy_hard_fwd(gpu, &x, &ids, &mut g, n, c).map(drop))
}
