//! kernels/batchnorm.cu against `ops::batchnorm::cpu`.

use super::*;
use muscle::kernel_args::BatchNormArgs;
use muscle::ops::batchnorm::{cpu, cuda as k};

// batchnorm.cu

#[test]
fn batchnorm_train_matches_cpu() {
    with_gpu("batchnorm_train_matches_cpu", |gpu| {
        let eps = 1e-5f32;
        for (t, &(n, c, hw)) in
            [(1usize, 3usize, 1usize), (2, 3, 5), (7, 16, 49), (3, 5, 4099), (64, 32, 196)].iter().enumerate()
        {
            // |mean| >> std in channel 0 exercises the shifted one-pass variance.
            let mut x = randv(n * c * hw, 2.0, 200 + t as u64);
            for (i, v) in x.iter_mut().enumerate() {
                if (i / hw) % c == 0 {
                    *v = 10.0 + 0.1 * *v;
                }
            }
            let gamma: Vec<f32> = randv(c, 0.5, 300 + t as u64).iter().map(|v| 1.0 + v).collect();
            let beta = randv(c, 0.5, 400 + t as u64);
            let dy = randv(n * c * hw, 1.0, 500 + t as u64);
            let (xd, gd, bd, dyd) = (up(gpu, &x), up(gpu, &gamma), up(gpu, &beta), up(gpu, &dy));
            for slope in [None, Some(0.1f32)] {
                let what = format!("n {n} C {c} hw {hw} slope {slope:?}");
                let args = BatchNormArgs { n, c, hw, eps, slope };
                let mut want_y = vec![0.0; x.len()];
                let st = cpu::batchnorm_train_fwd(&args, &x, &gamma, &beta, &mut want_y);
                let mut y = zeros(gpu, x.len());
                let gs = k::batchnorm_train_fwd(gpu, &args, &xd, &gd, &bd, &mut y).unwrap();
                // Statistics: f64 sums on the GPU, f32 lanes then f64 on the CPU: 1e-5 relative
                // (mean against its scale plus the spread, var and invstd elementwise).
                let mean = down(gpu, &gs.mean);
                for (ch, (&got, (&want, &var))) in mean.iter().zip(st.mean.iter().zip(&st.var)).enumerate() {
                    let tol = 1e-5 * (want.abs() + var.sqrt()) + 1e-7;
                    assert!((got - want).abs() <= tol, "{what}: mean[{ch}] {got} vs cpu {want}");
                }
                assert_close(&format!("{what}: var"), &down(gpu, &gs.var), &st.var, 1e-4, 1e-9);
                assert_close(&format!("{what}: invstd"), &down(gpu, &gs.invstd), &st.invstd, 1e-4, 0.0);
                // y: the folded scale and shift may differ in the last bits: 1e-5 of max |y|.
                assert_scaled(&format!("{what}: y"), &down(gpu, &y), &want_y, 1e-5);

                // Backward from the CPU's statistics, so that xhat and the activation mask are
                // the same bits on both sides (a flipped mask at z = 0 would be an O(1) error for
                // reasons of rounding, not of the kernel); only the sums' order differs: 1e-4 of
                // the largest entry.
                let cs = k::BatchStatsGpu {
                    mean: up(gpu, &st.mean),
                    var: up(gpu, &st.var),
                    invstd: up(gpu, &st.invstd),
                    scale: zeros(gpu, c),
                    shift: zeros(gpu, c),
                };
                let (mut want_dx, mut want_dg, mut want_db) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
                let want_dx_out = Some(&mut want_dx[..]);
                cpu::batchnorm_train_bwd(&args, &x, &dy, &gamma, &beta, &st, want_dx_out, &mut want_dg, &mut want_db);
                let (mut dx, mut dg, mut db) = (zeros(gpu, x.len()), zeros(gpu, c), zeros(gpu, c));
                k::batchnorm_train_bwd(gpu, &args, &xd, &dyd, &gd, &bd, &cs, Some(&mut dx), &mut dg, &mut db).unwrap();
                assert_scaled(&format!("{what}: dx"), &down(gpu, &dx), &want_dx, 1e-4);
                assert_scaled(&format!("{what}: dgamma"), &down(gpu, &dg), &want_dg, 1e-4);
                assert_scaled(&format!("{what}: dbeta"), &down(gpu, &db), &want_db, 1e-4);
                // Without dx: the parameter gradients alone.
                let (mut dg2, mut db2) = (zeros(gpu, c), zeros(gpu, c));
                k::batchnorm_train_bwd(gpu, &args, &xd, &dyd, &gd, &bd, &cs, None, &mut dg2, &mut db2).unwrap();
                assert_bits(&format!("{what}: dgamma without dx"), &down(gpu, &dg2), &down(gpu, &dg));
            }
        }
    });
}

/// --sync-bn's path (rank 0's shifts given to the statistics kernels, the sums passed through
/// the device collective, the backward's two finishes) in a world of one is the plain path, bit
/// for bit; over two processes it is tests/mpi.rs's.
#[test]
fn synchronised_batchnorm_in_a_world_of_one_is_the_plain_one_bitwise() {
    with_gpu("synchronised_batchnorm_in_a_world_of_one_is_the_plain_one_bitwise", |gpu| {
        let world = muscle::dist::world();
        let (n, c, hw) = (7usize, 16usize, 49usize);
        let x: Vec<f32> = randv(n * c * hw, 2.0, 610).iter().map(|v| 3.0 + v).collect();
        let gamma = randv(c, 0.5, 611);
        let beta = randv(c, 0.5, 612);
        let dy = randv(n * c * hw, 1.0, 613);
        let (xd, gd, bd, dyd) = (up(gpu, &x), up(gpu, &gamma), up(gpu, &beta), up(gpu, &dy));
        let args = BatchNormArgs { n, c, hw, eps: 1e-5, slope: Some(0.1) };
        let (mut y, mut ys) = (zeros(gpu, x.len()), zeros(gpu, x.len()));
        let plain = k::batchnorm_train_fwd(gpu, &args, &xd, &gd, &bd, &mut y).unwrap();
        let synced = k::batchnorm_train_fwd_across(gpu, &args, (&xd, &gd, &bd), &mut ys, Some(world)).unwrap();
        assert_bits("y", &down(gpu, &ys), &down(gpu, &y));
        for (what, a, b) in [("mean", &synced.mean, &plain.mean), ("var", &synced.var, &plain.var)] {
            assert_bits(what, &down(gpu, a), &down(gpu, b));
        }
        let (mut dx, mut dg, mut db) = (zeros(gpu, x.len()), zeros(gpu, c), zeros(gpu, c));
        k::batchnorm_train_bwd(gpu, &args, &xd, &dyd, &gd, &bd, &plain, Some(&mut dx), &mut dg, &mut db).unwrap();
        let (mut dxs, mut dgs, mut dbs) = (zeros(gpu, x.len()), zeros(gpu, c), zeros(gpu, c));
        let inputs = (&xd, &dyd, &gd, &bd);
        k::batchnorm_train_bwd_across(gpu, &args, inputs, &synced, Some(&mut dxs), (&mut dgs, &mut dbs), Some(world))
            .unwrap();
        for (what, a, b) in [("dx", &dxs, &dx), ("dgamma", &dgs, &dg), ("dbeta", &dbs, &db)] {
            assert_bits(what, &down(gpu, a), &down(gpu, b));
        }
    });
}

#[test]
fn batchnorm_eval_matches_cpu_bitwise() {
    with_gpu("batchnorm_eval_matches_cpu_bitwise", |gpu| {
        // The same f32 operations in the same order, none contracted: equal bits.
        let (n, c, hw) = (5usize, 7usize, 33usize);
        let x = randv(n * c * hw, 2.0, 600);
        let gamma = randv(c, 1.0, 601);
        let beta = randv(c, 1.0, 602);
        let mean = randv(c, 1.0, 603);
        let var: Vec<f32> = randv(c, 1.0, 604).iter().map(|v| v * v + 0.01).collect();
        let d: Vec<CudaSlice<f32>> = [&x, &gamma, &beta, &mean, &var].iter().map(|v| up(gpu, v)).collect();
        for slope in [None, Some(0.1f32)] {
            let args = BatchNormArgs { n, c, hw, eps: 1e-5, slope };
            let mut want = vec![0.0; x.len()];
            cpu::batchnorm_eval_fwd(&args, &x, &gamma, &beta, &mean, &var, &mut want);
            let mut y = zeros(gpu, x.len());
            k::batchnorm_eval_fwd(gpu, &args, &d[0], &d[1], &d[2], &d[3], &d[4], &mut y).unwrap();
            assert_bits(&format!("eval slope {slope:?}"), &down(gpu, &y), &want);
        }
    });
}

#[test]
fn batchnorm_eval_backward_matches_cpu() {
    with_gpu("batchnorm_eval_backward_matches_cpu", |gpu| {
        // dx: the CPU's operations in its order (equal bits); dgamma, dbeta: one f64 sum per
        // channel against the CPU's per-image f32 roundings of f64 sums (1e-5 of the largest).
        let (n, c, hw) = (5usize, 7usize, 33usize);
        let x = randv(n * c * hw, 2.0, 610);
        let dy = randv(n * c * hw, 1.0, 611);
        let gamma = randv(c, 1.0, 612);
        let beta = randv(c, 1.0, 613);
        let mean = randv(c, 1.0, 614);
        let var: Vec<f32> = randv(c, 1.0, 615).iter().map(|v| v * v + 0.01).collect();
        let d: Vec<CudaSlice<f32>> = [&x, &dy, &gamma, &beta, &mean, &var].iter().map(|v| up(gpu, v)).collect();
        let bufs = k::EvalBwdBuffers { x: &d[0], dy: &d[1], gamma: &d[2], beta: &d[3], mean: &d[4], var: &d[5] };
        for slope in [None, Some(0.1f32)] {
            let args = BatchNormArgs { n, c, hw, eps: 1e-5, slope };
            let (mut dx, mut dg, mut db) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
            cpu::batchnorm_eval_bwd(&args, &x, &dy, &gamma, &beta, &mean, &var, Some(&mut dx), &mut dg, &mut db);
            let (mut gdx, mut gdg, mut gdb) = (zeros(gpu, x.len()), zeros(gpu, c), zeros(gpu, c));
            k::batchnorm_eval_bwd(gpu, &args, &bufs, Some(&mut gdx), &mut gdg, &mut gdb).unwrap();
            assert_bits(&format!("eval dx slope {slope:?}"), &down(gpu, &gdx), &dx);
            assert_scaled(&format!("eval dgamma slope {slope:?}"), &down(gpu, &gdg), &dg, 1e-5);
            assert_scaled(&format!("eval dbeta slope {slope:?}"), &down(gpu, &gdb), &db, 1e-5);
        }
    });
}

#[test]
fn batchnorm_running_update_matches_cpu_bitwise() {
    with_gpu("batchnorm_running_update_matches_cpu_bitwise", |gpu| {
        // Two roundings per product and one per sum, in the CPU's order on both sides.
        for &(n, momentum, factor) in
            &[(1usize, 0.1f32, 1.0f32), (32, 0.1, 577.0 / 576.0), (1000, 0.001, 1.0), (4099, 0.3, 1.5)]
        {
            let (r0, b) = (randv(n, 1.0, 41), randv(n, 2.0, 42));
            let mut want = r0.clone();
            cpu::batchnorm_running_fwd(&mut want, &b, momentum, factor);
            let mut r = up(gpu, &r0);
            k::batchnorm_running_fwd(gpu, &mut r, &up(gpu, &b), n, momentum, factor).expect("batchnorm_running_fwd");
            assert_bits(&format!("running n {n} momentum {momentum}"), &down(gpu, &r), &want);
        }
    });
}

#[test]
fn bn_partition_depends_on_sizes_only() {
    assert!(k::bn_splits(1, 1) == 1 && k::bn_splits(576, 784) <= 256);
}
