//! kernels/elementwise.cu against `ops::elementwise::cpu` and the CPU dropout op.

use super::*;
use muscle::ops::elementwise::{cpu, cuda as k};
use muscle::{Tape, Tensor};

#[test]
fn dropout_kernel_indexing_reproduces_the_cpu_op() {
    // The kernel gives element i word i % 4 of Philox block i / 4; ops::dropout draws
    // Rng::new(seed, stream).uniform() sequentially. On a tensor of ones the op's output is its
    // mask, so the two must agree exactly, for lengths around the block size of 4 and keys whose
    // high 32 bits matter.
    let keys = [(0u64, 0u64), (7, 1), (0x1234_5678_9abc_def0, u64::MAX - 5), (u64::MAX, 0x8000_0000_0000_0001)];
    for &(seed, stream) in &keys {
        for &n in &[1usize, 3, 4, 5, 8, 1023, 4099] {
            for &p in &[0.1f32, 0.5, 0.9] {
                let ones = Tensor::full(&[n], 1.0);
                let y = muscle::ops::dropout(&Tape::no_grad(), &ones, p, seed, stream).expect("dropout");
                let want = y.to_vec().expect("data");
                let got = k::dropout_mask_host(n, p, seed, stream);
                assert_bits(&format!("mask n {n} p {p} seed {seed:#x} stream {stream:#x}"), &got, &want);
            }
        }
    }
}

// elementwise.cu

#[test]
fn leaky_relu_add_scale_match_cpu_bitwise() {
    with_gpu("leaky_relu_add_scale_match_cpu_bitwise", |gpu| {
        // One IEEE operation per element on both sides: equal bits.
        for &n in &[1usize, 31, 1000, 100_003] {
            let x = randv(n, 1.0, 3);
            let dy = randv(n, 1.0, 4);
            let (xd, dyd) = (up(gpu, &x), up(gpu, &dy));
            let mut out = zeros(gpu, n);
            let mut want = vec![0.0; n];
            for slope in [0.0f32, 0.1] {
                cpu::leaky_relu_fwd(&x, slope, &mut want);
                k::leaky_relu_fwd(gpu, &xd, &mut out, n, slope).unwrap();
                assert_bits(&format!("leaky_relu n {n} slope {slope}"), &down(gpu, &out), &want);
                cpu::leaky_relu_bwd(&x, &dy, slope, &mut want);
                k::leaky_relu_bwd(gpu, &xd, &dyd, &mut out, n, slope).unwrap();
                assert_bits(&format!("leaky_relu backward n {n} slope {slope}"), &down(gpu, &out), &want);
            }
            cpu::add_fwd(&x, &dy, &mut want);
            k::add_fwd(gpu, &xd, &dyd, &mut out, n).unwrap();
            assert_bits(&format!("add n {n}"), &down(gpu, &out), &want);
            cpu::scale_fwd(&x, -0.37, &mut want);
            k::scale_fwd(gpu, &xd, &mut out, n, -0.37).unwrap();
            assert_bits(&format!("scale n {n}"), &down(gpu, &out), &want);
        }
    });
}

#[test]
fn dropout_mask_matches_cpu_bitwise() {
    with_gpu("dropout_mask_matches_cpu_bitwise", |gpu| {
        for &(seed, stream) in &[(7u64, 1u64), (0x1234_5678_9abc_def0, u64::MAX - 5)] {
            for &n in &[1usize, 3, 4, 5, 1023, 100_003] {
                for &p in &[0.0f32, 0.1, 0.5, 0.9] {
                    let what = format!("n {n} p {p} seed {seed:#x}");
                    let x = randv(n, 1.0, 8);
                    let xd = up(gpu, &x);
                    let (mut y, mut mask) = (zeros(gpu, n), zeros(gpu, n));
                    k::dropout_fwd(gpu, &xd, &mut y, &mut mask, n, p, seed, stream).unwrap();
                    let want_mask = k::dropout_mask_host(n, p, seed, stream);
                    assert_bits(&format!("mask {what}"), &down(gpu, &mask), &want_mask);
                    let want_y: Vec<f32> = x.iter().zip(&want_mask).map(|(a, m)| a * m).collect();
                    assert_bits(&format!("y {what}"), &down(gpu, &y), &want_y);
                    let mut dx = zeros(gpu, n);
                    k::dropout_bwd(gpu, &xd, &mask, &mut dx, n).unwrap();
                    assert_bits(&format!("backward {what}"), &down(gpu, &dx), &want_y);
                    if p > 0.0 && n > 1000 {
                        let dropped = want_mask.iter().filter(|&&m| m == 0.0).count() as f32 / n as f32;
                        assert!((dropped - p).abs() < 0.05, "{what}: dropped {dropped}");
                    }
                }
            }
        }
    });
}

/// The emulated device (emu/) runs the real kernel: bit-identical to the CPU twin, and a buffer
/// one element short is a one-line error naming the kernel, not a crash.
#[cfg(muscle_cuda_emu)]
#[test]
fn add_kernel_on_the_emulated_device_matches_cpu_bitwise() {
    use muscle::cuda::emu::{launch, Arg, EmuBuffer};
    for &n in &[1usize, 31, 257, 4099] {
        let (a, b) = (randv(n, 1.0, 71), randv(n, 1.0, 72));
        let mut want = vec![0.0; n];
        cpu::add_fwd(&a, &b, &mut want);
        let (da, db) = (EmuBuffer::from_host(&a).unwrap(), EmuBuffer::from_host(&b).unwrap());
        let dy = EmuBuffer::<f32>::zeros(n).unwrap();
        let blocks = n.div_ceil(256) as u32;
        let args = vec![Arg::buffer(&da), Arg::buffer(&db), Arg::buffer(&dy), Arg::I64(n as i64)];
        launch("add_fwd_f32", (blocks, 1, 1), (256, 1, 1), args).unwrap();
        assert_bits(&format!("add n {n}"), &dy.to_host().unwrap(), &want);
        // One element past the end of `a`: the guard page stops the read.
        let short = EmuBuffer::from_host(&a[..n - 1]).unwrap();
        let args = vec![Arg::buffer(&short), Arg::buffer(&db), Arg::buffer(&dy), Arg::I64(n as i64)];
        let err = launch("add_fwd_f32", (blocks, 1, 1), (256, 1, 1), args).unwrap_err().to_string();
        assert!(err.contains("add_fwd_f32") && err.contains("past the end") && !err.contains('\n'), "{err}");
    }
}
