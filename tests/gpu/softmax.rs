//! kernels/softmax.cu against `ops::softmax::cpu`.

use super::*;
use muscle::ops::softmax::{cpu, cuda as k};

// softmax.cu

#[test]
fn softmax_and_log_softmax_match_cpu() {
    with_gpu("softmax_and_log_softmax_match_cpu", |gpu| {
        for (t, &(n, c)) in
            [(1usize, 3usize), (37, 10), (1000, 3), (33, 1000), (5, 1025), (3, 2000), (64, 100)].iter().enumerate()
        {
            let what = format!("n {n} C {c}");
            let x = awkward_logits(n, c, 10 + t as u64);
            let dy = randv(n * c, 1.0, 20 + t as u64);
            let (xd, dyd) = (up(gpu, &x), up(gpu, &dy));
            let mut y = zeros(gpu, n * c);
            let mut dx = zeros(gpu, n * c);

            // Probabilities: 1e-5 relative (exp is within 2 ulp on both sides; only the order of
            // the f32 row sum differs, ~1e-6 relative at C = 2000); atol 1e-37 for denormal
            // results, whose relative precision is lower.
            let mut want = vec![0.0; n * c];
            cpu::softmax_fwd(&x, c, &mut want);
            k::softmax_fwd(gpu, &xd, &mut y, n, c).unwrap();
            let yv = down(gpu, &y);
            assert_close(&format!("softmax {what}"), &yv, &want, 1e-5, 1e-37);
            // Backward from the CPU's y (so only the kernel differs): dy - <y, dy> cancels, so the
            // error is measured against the largest gradient: 1e-5.
            let yc = up(gpu, &want);
            let mut wantd = vec![0.0; n * c];
            cpu::softmax_bwd(&want, &dy, c, &mut wantd);
            k::softmax_bwd(gpu, &yc, &dyd, &mut dx, n, c).unwrap();
            assert_scaled(&format!("softmax backward {what}"), &down(gpu, &dx), &wantd, 1e-5);

            // Log-softmax: values up to 160 in magnitude; one ulp of 160 is 1.5e-5, so 1e-6
            // relative plus 2e-5 absolute.
            cpu::log_softmax_fwd(&x, c, &mut want);
            k::log_softmax_fwd(gpu, &xd, &mut y, n, c).unwrap();
            assert_close(&format!("log_softmax {what}"), &down(gpu, &y), &want, 1e-6, 2e-5);
            let yc = up(gpu, &want);
            cpu::log_softmax_bwd(&want, &dy, c, &mut wantd);
            k::log_softmax_bwd(gpu, &yc, &dyd, &mut dx, n, c).unwrap();
            assert_scaled(&format!("log_softmax backward {what}"), &down(gpu, &dx), &wantd, 1e-5);
        }
    });
}

#[test]
fn cross_entropy_hard_matches_cpu() {
    with_gpu("cross_entropy_hard_matches_cpu", |gpu| {
        for (t, &(n, c)) in [(1usize, 3usize), (37, 10), (1000, 10), (33, 1000), (5, 1025)].iter().enumerate() {
            let what = format!("n {n} C {c}");
            let x = awkward_logits(n, c, 30 + t as u64);
            let mut r = Rng::new(40 + t as u64, 1);
            let labels: Vec<usize> = (0..n).map(|_| r.below(c as u32) as usize).collect();
            let mut want_grad = vec![0.0; n * c];
            let want = cpu::cross_entropy_hard_fwd(&x, &labels, c, &mut want_grad);
            let li: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
            let (xd, ld) = (up(gpu, &x), up(gpu, &li));
            let mut grad = zeros(gpu, n * c);
            let loss = down(gpu, &k::cross_entropy_hard_fwd(gpu, &xd, &ld, &mut grad, n, c).unwrap())[0];
            // Both sum the row losses in f64; each row's logsumexp l may differ by an ulp (7.6e-6
            // at |l| = 80): 1e-5 relative to max(1, |loss|).
            assert!((loss - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}: loss {loss} vs cpu {want}");
            // exp(x - l) inherits l's ulp as a relative error (7.6e-6 at 80): 1e-4 of the largest
            // gradient entry.
            assert_scaled(&format!("grad {what}"), &down(gpu, &grad), &want_grad, 1e-4);
        }
        // A label outside [0, C) cannot be checked on the host without a copy: the loss says NaN.
        let (xd, ld) = (up(gpu, &[0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0]), up(gpu, &[1i32, 3]));
        let mut grad = zeros(gpu, 6);
        let loss = down(gpu, &k::cross_entropy_hard_fwd(gpu, &xd, &ld, &mut grad, 2, 3).unwrap())[0];
        assert!(loss.is_nan(), "out-of-range label gave loss {loss}");
    });
}

#[test]
fn cross_entropy_pseudo_matches_cpu() {
    with_gpu("cross_entropy_pseudo_matches_cpu", |gpu| {
        for (t, &(n, c)) in [(1usize, 3usize), (37, 10), (1000, 10), (33, 1000), (5, 1025)].iter().enumerate() {
            let what = format!("n {n} C {c}");
            let mut r = Rng::new(50 + t as u64, 1);
            // Half the weak rows confident (a spike of 20: max probability > 0.99 even at C =
            // 1025), the rest spread, so no row sits within rounding of tau; a tie in row 0.
            let mut w = randv(n * c, 1.0, 60 + t as u64);
            for i in (0..n).step_by(2) {
                w[i * c + r.below(c as u32) as usize] += 20.0;
            }
            w[..c].fill(0.0);
            w[c - 1] = 30.0;
            w[c / 2] = 30.0;
            let s = awkward_logits(n, c, 70 + t as u64);
            let truth: Vec<usize> = (0..n).map(|_| r.below(c as u32) as usize).collect();
            let mut want_grad = vec![0.0; n * c];
            let (want, want_kept, want_right) = cpu::cross_entropy_pseudo_fwd(&w, &s, &truth, c, 0.95, &mut want_grad);
            let ti: Vec<i32> = truth.iter().map(|&l| l as i32).collect();
            let (wd, sd, td) = (up(gpu, &w), up(gpu, &s), up(gpu, &ti));
            let mut grad = zeros(gpu, n * c);
            let [loss, kept, right] = k::cross_entropy_pseudo_fwd(gpu, &wd, &sd, &td, &mut grad, n, c, 0.95).unwrap();
            let (loss, kept, right) = (down(gpu, &loss)[0], down(gpu, &kept)[0], down(gpu, &right)[0]);
            // The mask and the pseudo-labels are decisions: equal on both sides (no row is near
            // tau). The loss and gradient as for hard labels: 1e-5 relative, 1e-4 of the largest.
            assert_eq!((kept, right), (want_kept, want_right), "{what}: kept / right fractions");
            assert!(n == 1 || kept > 0.0, "{what}: no row kept");
            assert!((loss - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}: loss {loss} vs cpu {want}");
            assert_scaled(&format!("grad {what}"), &down(gpu, &grad), &want_grad, 1e-4);
        }
    });
}

#[test]
fn cross_entropy_soft_matches_cpu() {
    with_gpu("cross_entropy_soft_matches_cpu", |gpu| {
        for (t, &(n, c)) in [(1usize, 3usize), (37, 10), (1000, 10), (33, 1000), (5, 1025)].iter().enumerate() {
            let what = format!("n {n} C {c}");
            let x = awkward_logits(n, c, 50 + t as u64);
            // Targets: softmax rows of random logits, every third row scaled by 0.7 (weights that
            // do not sum to 1 exercise the sum(q) factor of the gradient).
            let mut q = vec![0.0; n * c];
            cpu::softmax_fwd(&randv(n * c, 2.0, 60 + t as u64), c, &mut q);
            for (i, row) in q.chunks_mut(c).enumerate() {
                if i % 3 == 2 {
                    row.iter_mut().for_each(|v| *v *= 0.7);
                }
            }
            let mut want_grad = vec![0.0; n * c];
            let want = cpu::cross_entropy_soft_fwd(&x, &q, c, &mut want_grad);
            let (xd, qd) = (up(gpu, &x), up(gpu, &q));
            let mut grad = zeros(gpu, n * c);
            let loss = down(gpu, &k::cross_entropy_soft_fwd(gpu, &xd, &qd, &mut grad, n, c).unwrap())[0];
            // As for hard labels (same logsumexp, f64 loss sums on both sides).
            assert!((loss - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}: loss {loss} vs cpu {want}");
            assert_scaled(&format!("grad {what}"), &down(gpu, &grad), &want_grad, 1e-4);
        }
    });
}

#[test]
fn loss_gradient_scale_matches_cpu_bitwise() {
    with_gpu("loss_gradient_scale_matches_cpu_bitwise", |gpu| {
        // One IEEE product per element on both sides: equal bits.
        for &n in &[1usize, 1000, 70_001] {
            let x = randv(n, 2.0, 13);
            let want: Vec<f32> = x.iter().map(|v| v * 0.37).collect();
            let mut y = zeros(gpu, n);
            k::loss_grad_bwd(gpu, &up(gpu, &x), &mut y, n, &up(gpu, &[0.37f32])).expect("loss_grad_bwd");
            assert_bits(&format!("loss_grad n {n}"), &down(gpu, &y), &want);
        }
    });
}

/// The emulated device (emu/) runs the real warp-per-row kernel (shuffles, partial warps): within
/// f32 rounding of the CPU twin (the exps differ: C++'s expf against the CPU's SIMD exp); an `i64`
/// where the kernel takes `int` is refused by name.
#[cfg(muscle_cuda_emu)]
#[test]
fn softmax_kernel_on_the_emulated_device_matches_cpu() {
    use muscle::cuda::emu::{launch, Arg, EmuBuffer};
    for &(n, c) in &[(1usize, 3usize), (9, 10), (17, 100), (3, 1000)] {
        let x = awkward_logits(n, c, 81);
        let mut want = vec![0.0; n * c];
        cpu::softmax_fwd(&x, c, &mut want);
        let dx = EmuBuffer::from_host(&x).unwrap();
        let dy = EmuBuffer::<f32>::zeros(n * c).unwrap();
        let blocks = n.div_ceil(8) as u32;
        let args = vec![Arg::buffer(&dx), Arg::buffer(&dy), Arg::I32(n as i32), Arg::I32(c as i32)];
        launch("softmax_fwd_f32", (blocks, 1, 1), (256, 1, 1), args).unwrap();
        assert_close(&format!("softmax {n} x {c}"), &dy.to_host().unwrap(), &want, 1e-5, 1e-7);
        let args = vec![Arg::buffer(&dx), Arg::buffer(&dy), Arg::I64(n as i64), Arg::I32(c as i32)];
        let err = launch("softmax_fwd_f32", (blocks, 1, 1), (256, 1, 1), args).unwrap_err().to_string();
        assert!(err.contains("argument 2 (int n) takes 4 bytes, given 8"), "{err}");
    }
}
