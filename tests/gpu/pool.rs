//! kernels/pool.cu against `ops::pool::cpu`.

use super::*;
use muscle::ops::pool::{cpu, cuda as k};

// pool.cu

#[test]
fn maxpool2_matches_cpu_with_ties_and_nan() {
    with_gpu("maxpool2_matches_cpu_with_ties_and_nan", |gpu| {
        for &(planes, h, w) in &[(1usize, 2usize, 2usize), (3, 7, 6), (5, 9, 11), (64 * 32, 28, 28)] {
            let what = format!("{planes} x {h} x {w}");
            // Few distinct values (ties everywhere) and some NaNs: the first maximum in row-major
            // window order wins, and a NaN wins over numbers.
            let mut x: Vec<f32> = (0..planes * h * w).map(|i| ((i * 7919) % 13) as f32).collect();
            for i in (5..x.len()).step_by(97) {
                x[i] = f32::NAN;
            }
            let (ho, wo) = (h / 2, w / 2);
            let out = planes * ho * wo;
            let (mut want_y, mut want_a) = (vec![0.0; out], vec![0u8; out]);
            cpu::maxpool_fwd(&x, planes, h, w, 2, &mut want_y, &mut want_a);
            let xd = up(gpu, &x);
            let mut y = zeros(gpu, out);
            let mut arg = gpu.zeros::<u8>(out).unwrap();
            k::maxpool_fwd(gpu, &xd, planes, h, w, &mut y, &mut arg).unwrap();
            assert_bits(&format!("{what}: y"), &down(gpu, &y), &want_y);
            assert_eq!(down(gpu, &arg), want_a, "{what}: argmax");
            let dy = randv(out, 1.0, 9);
            let mut want_dx = vec![0.0; planes * h * w];
            cpu::maxpool_bwd(&dy, &want_a, planes, h, w, 2, &mut want_dx);
            let mut dx = zeros(gpu, planes * h * w);
            k::maxpool_bwd(gpu, &up(gpu, &dy), &arg, planes, h, w, &mut dx).unwrap();
            // Values, not bits: the CPU writes 0 + dy, the GPU dy (they differ only for -0.0).
            assert_close(&format!("{what}: dx"), &down(gpu, &dx), &want_dx, 0.0, 0.0);
        }
    });
}

#[test]
fn avgpool_matches_cpu() {
    with_gpu("avgpool_matches_cpu", |gpu| {
        for &(planes, hw) in &[(1usize, 1usize), (3, 7), (37, 49), (576 * 64, 49), (10, 4099)] {
            let what = format!("{planes} x {hw}");
            let x = randv(planes * hw, 1.0, 11);
            let mut want = vec![0.0; planes];
            cpu::avgpool_fwd(&x, hw, &mut want);
            let mut y = zeros(gpu, planes);
            k::avgpool_fwd(gpu, &up(gpu, &x), planes, hw, &mut y).unwrap();
            // Sequential f32 sum on the CPU, a shuffle tree on the GPU: both within hw ulps of the
            // sum, i.e. ~1e-7 of max |x| after the division: 1e-6 of max |x|.
            let tol = 1e-6 * max_abs(&x);
            assert_close(&format!("{what}: y"), &down(gpu, &y), &want, 0.0, tol);
            let dy = randv(planes, 1.0, 12);
            let mut want_dx = vec![0.0; planes * hw];
            cpu::avgpool_bwd(&dy, hw, &mut want_dx);
            let mut dx = zeros(gpu, planes * hw);
            k::avgpool_bwd(gpu, &up(gpu, &dy), planes, hw, &mut dx).unwrap();
            assert_bits(&format!("{what}: dx"), &down(gpu, &dx), &want_dx);
        }
    });
}
