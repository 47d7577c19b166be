//! The IIC loss's kernels timed in isolation (`muscle bench --op mi`): forward, and forward +
//! backward, on random logits of std 3; the app holds the times against the machine's ceilings.

use super::cpu;
use crate::profile::median_secs;
use crate::rng::normal_vec;
use std::hint::black_box;

/// Median seconds of the CPU forward and of forward + backward at n x c.
pub fn cpu_times(n: usize, c: usize, reps: usize) -> (f64, f64) {
    let (la, lb) = (normal_vec(n * c, 3.0, 1), normal_vec(n * c, 3.0, 2));
    let (mut ga, mut gb) = (vec![0.0f32; n * c], vec![0.0f32; n * c]);
    let fwd = median_secs(reps, || {
        black_box(cpu::mi_fwd(&la, &lb, n, c, 1.0));
    });
    let both = median_secs(reps, || {
        let f = cpu::mi_fwd(&la, &lb, n, c, 1.0);
        cpu::mi_bwd(&f, n, c, 1.0, &mut ga, &mut gb);
    });
    (fwd, both)
}

/// Median seconds of the GEMM crate doing the loss's three C x C products alone, each one call over
/// all n rows on every thread: J = Z^T W (C x C), then G^ W and G^ Z (n x C each). The yardstick
/// for wide C, where the kernels' own products run per chunk with the softmax fused around them.
pub fn cpu_gemm_reference(n: usize, c: usize, reps: usize) -> f64 {
    use crate::cpu::gemm::{sgemm, Mat};
    let (z, w) = (normal_vec(n * c, 1.0, 3), normal_vec(n * c, 1.0, 4));
    let g = normal_vec(c * c, 1.0, 5);
    let (mut j, mut ua, mut ub) = (vec![0.0f32; c * c], vec![0.0f32; n * c], vec![0.0f32; n * c]);
    let threads = crate::cpu::threads();
    median_secs(reps, || {
        sgemm(c, c, n, Mat::t(&z), Mat::n(&w), black_box(&mut j), false, threads);
        sgemm(n, c, c, Mat::n(&w), Mat::n(&g), black_box(&mut ua), false, threads);
        sgemm(n, c, c, Mat::n(&z), Mat::n(&g), black_box(&mut ub), false, threads);
    })
}

/// Median seconds of the GPU forward and of forward + backward at n x c, each call synchronised.
#[cfg(feature = "cuda")]
pub fn cuda_times(gpu: &crate::cuda::Gpu, n: usize, c: usize, reps: usize) -> crate::error::Result<(f64, f64)> {
    use super::cuda;
    let la = gpu.upload(&normal_vec(n * c, 3.0, 1))?;
    let lb = gpu.upload(&normal_vec(n * c, 3.0, 2))?;
    let (mut ga, mut gb) = (gpu.zeros::<f32>(n * c)?, gpu.zeros::<f32>(n * c)?);
    let one = gpu.upload(&[1.0f32])?;
    let fwd = gpu.median_secs(reps, || cuda::mi_fwd(gpu, &la, &lb, n, c, 1.0).map(drop))?;
    let both = gpu.median_secs(reps, || {
        let f = cuda::mi_fwd(gpu, &la, &lb, n, c, 1.0)?;
        cuda::mi_bwd(gpu, &f, &one, &mut ga, &mut gb)
    })?;
    Ok((fwd, both))
}
