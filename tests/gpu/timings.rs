//! Kernel timings against their floors (opt-in, for a GPU machine).

use super::*;
use muscle::ops::{batchnorm, mutual_info, softmax};

// Timings (opt-in: `main gpu::kernel_timings --ignored --nocapture`, as scripts/gpu-check.sh
// runs it). Prints, asserts nothing about speed.

/// Mean wall time per call of `f` over `iters` calls after 3 warm-up calls, in microseconds.
fn time_us(gpu: &Gpu, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    gpu.synchronize().unwrap();
    let t = std::time::Instant::now();
    for _ in 0..iters {
        f();
    }
    gpu.synchronize().unwrap();
    t.elapsed().as_secs_f64() * 1e6 / iters as f64
}

#[test]
#[ignore = "timing report for a GPU machine (scripts/gpu-check.sh)"]
fn kernel_timings_against_the_floor() {
    with_gpu("kernel_timings_against_the_floor", |gpu| {
        let bw = 3e12; // bytes/s: the floor of kernels/README.md
        let mut out = std::io::stderr().lock();
        let _ = writeln!(out, "gpu: {}", gpu.info());
        let _ = writeln!(out, "| op | n | C | us per call | floor us (3 TB/s) |");
        let _ = writeln!(out, "|---|---|---|---|---|");
        let n = 65_536;
        for c in [10usize, 100] {
            let a = up(gpu, &randv(n * c, 2.0, 1));
            let b = up(gpu, &randv(n * c, 2.0, 2));
            let labels: Vec<i32> = (0..n).map(|i| (i % c) as i32).collect();
            let ld = up(gpu, &labels);
            let mut grad = zeros(gpu, n * c);
            let t = time_us(gpu, 50, || {
                softmax::cuda::cross_entropy_hard_fwd(gpu, &a, &ld, &mut grad, n, c).unwrap();
            });
            let floor = (8 * n * c + 12 * n) as f64 / bw * 1e6;
            let _ = writeln!(out, "| softmax-CE hard (fwd+grad) | {n} | {c} | {t:.1} | {floor:.1} |");
            let t = time_us(gpu, 50, || {
                mutual_info::cuda::mi_fwd(gpu, &a, &b, n, c, 1.0).unwrap();
            });
            let parts = n.div_ceil(mutual_info::cuda::mi_rows_per_part(n, c));
            let fwd_bytes =
                if c <= mutual_info::cuda::MI_FUSED_MAX_C { 16 * n * c } else { 24 * n * c } + 8 * parts * c * c;
            let _ = writeln!(out, "| MI forward | {n} | {c} | {t:.1} | {:.1} |", fwd_bytes as f64 / bw * 1e6);
            let f = mutual_info::cuda::mi_fwd(gpu, &a, &b, n, c, 1.0).unwrap();
            let (mut ga, mut gb) = (zeros(gpu, n * c), zeros(gpu, n * c));
            let t = time_us(gpu, 50, || {
                mutual_info::cuda::mi_bwd(gpu, &f, &up(gpu, &[1.0f32]), &mut ga, &mut gb).unwrap();
            });
            let bwd_bytes = if c <= mutual_info::cuda::MI_FUSED_MAX_C { 16 * n * c } else { 40 * n * c };
            let _ = writeln!(out, "| MI backward | {n} | {c} | {t:.1} | {:.1} |", bwd_bytes as f64 / bw * 1e6);
        }
        // A BN layer of the default recipe's first block: 576 images, 32 channels, 28 x 28.
        let (bn_n, bn_c, hw) = (576usize, 32usize, 784usize);
        let x = up(gpu, &randv(bn_n * bn_c * hw, 1.0, 3));
        let (g, be) = (up(gpu, &vec![1.0f32; bn_c]), up(gpu, &vec![0.0f32; bn_c]));
        let mut y = zeros(gpu, bn_n * bn_c * hw);
        let t = time_us(gpu, 20, || {
            let args = muscle::kernel_args::BatchNormArgs { n: bn_n, c: bn_c, hw, eps: 1e-5, slope: Some(0.1) };
            batchnorm::cuda::batchnorm_train_fwd(gpu, &args, &x, &g, &be, &mut y).unwrap();
        });
        let floor = (3 * 4 * bn_n * bn_c * hw) as f64 / bw * 1e6;
        let _ = writeln!(out, "| BN+LReLU train fwd | {bn_n}x{hw} | {bn_c} | {t:.1} | {floor:.1} |");
        let p = 1_467_610usize; // wrn-28-2's parameters
        let (mut pd, gd) = (up(gpu, &randv(p, 1.0, 4)), up(gpu, &randv(p, 0.1, 5)));
        let (mut md, mut vd) = (zeros(gpu, p), zeros(gpu, p));
        let s = muscle::kernel_args::AdamScalars::new(2e-3, 0.9, 0.999, 1e-8, 5e-4, true, 10);
        let t = time_us(gpu, 50, || {
            muscle::optim::cuda::adam_step(gpu, &mut pd, &gd, &mut md, &mut vd, p, &s).unwrap();
        });
        let _ = writeln!(out, "| AdamW step | {p} | - | {t:.1} | {:.1} |", (28 * p) as f64 / bw * 1e6);
    });
}
