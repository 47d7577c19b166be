//! cuBLAS SGEMM (`cuda::blas`) and kernels/linear.cu against `ops::linear::cpu`.

use super::*;
use muscle::cuda::blas;
use muscle::ops::linear::{cpu, cuda as k};

// cuBLAS

#[test]
fn sgemm_matches_reference_for_every_transpose() {
    with_gpu("sgemm_matches_reference_for_every_transpose", |gpu| {
        if let Err(e) = gpu.blas_available() {
            if std::env::var("REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("REQUIRE_GPU=1 but {e}");
            }
            skip("sgemm_matches_reference_for_every_transpose", e.message());
            return;
        }
        for &(m, n, kk) in &[(1usize, 1usize, 1usize), (3, 5, 7), (64, 33, 100), (130, 70, 257)] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let what = format!("{m} x {n} x {kk} trans {ta} {tb}");
                let a = randv(m * kk, 1.0, 1);
                let b = randv(kk * n, 1.0, 2);
                let c0 = randv(m * n, 1.0, 3);
                let at = |i: usize, l: usize| if ta { a[l * m + i] } else { a[i * kk + l] };
                let bt = |l: usize, j: usize| if tb { b[j * kk + l] } else { b[l * n + j] };
                let want: Vec<f32> = (0..m * n)
                    .map(|e| {
                        let (i, j) = (e / n, e % n);
                        let dot: f64 = (0..kk).map(|l| at(i, l) as f64 * bt(l, j) as f64).sum();
                        (1.5 * dot + 0.5 * c0[e] as f64) as f32
                    })
                    .collect();
                let mut c = up(gpu, &c0);
                blas::sgemm(gpu, m, n, kk, &up(gpu, &a), ta, &up(gpu, &b), tb, &mut c, 1.5, 0.5).unwrap();
                // f32 accumulation over k <= 257 terms against an f64 reference: 1e-5 of the
                // largest entry.
                assert_scaled(&what, &down(gpu, &c), &want, 1e-5);
            }
        }
    });
}

// The dense layer's bias kernels.

#[test]
fn bias_kernels_match_cpu_bitwise() {
    with_gpu("bias_kernels_match_cpu_bitwise", |gpu| {
        // Column sums run in row order on both sides, and a broadcast is a copy: equal bits.
        for &(rows, cols) in &[(1usize, 1usize), (3, 10), (577, 128), (64, 1000)] {
            let b = randv(cols, 1.0, 11 + cols as u64);
            let g = randv(rows * cols, 1.0, 12 + rows as u64);
            let mut want_y = vec![0.0; rows * cols];
            cpu::bias_rows_fwd(&b, &mut want_y);
            let mut y = zeros(gpu, rows * cols);
            k::bias_rows_fwd(gpu, &up(gpu, &b), &mut y, rows, cols).expect("bias_rows_fwd");
            assert_bits(&format!("bias rows {rows} x {cols}"), &down(gpu, &y), &want_y);
            let mut want_db = vec![0.0; cols];
            cpu::bias_grad_bwd(&g, &mut want_db);
            let mut db = zeros(gpu, cols);
            k::bias_grad_bwd(gpu, &up(gpu, &g), &mut db, rows, cols).expect("bias_grad_bwd");
            assert_bits(&format!("bias grad {rows} x {cols}"), &down(gpu, &db), &want_db);
        }
    });
}
