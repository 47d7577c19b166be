//! kernels/mixmatch.cu and the MSE kernel against their CPU twins (`ops::mixmatch::cpu`, the host
//! branch of `ops::mse`).

use super::*;
use muscle::ops::mixmatch::{cpu, cuda as k};
use muscle::ops::Indices;
use muscle::{Device, Tape, Tensor};

#[test]
fn guess_matches_cpu() {
    with_gpu("guess_matches_cpu", |gpu| {
        // Rows of 3, 10 and 100 classes (partial warps, several columns per lane), 37 images;
        // T = 0.5 (MixMatch's) and 0.05 (powers that underflow without the max scaling).
        for &(nu, c) in &[(37usize, 3usize), (37, 10), (5, 100)] {
            let logits = awkward_logits(2 * nu, c, 11);
            let mut p = vec![0.0f32; logits.len()];
            for (src, dst) in logits.chunks(c).zip(p.chunks_mut(c)) {
                let m = src.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let s: f32 = src.iter().map(|v| (v - m).exp()).sum();
                src.iter().zip(dst.iter_mut()).for_each(|(v, d)| *d = (v - m).exp() / s);
            }
            for t in [0.5f32, 0.05] {
                let want = cpu::guess(&p, nu, c, t);
                let mut q = zeros(gpu, nu * c);
                k::guess_fwd(gpu, &up(gpu, &p), &mut q, nu, c, 1.0 / t).expect("guess");
                // powf and the order of the row sum differ from the CPU's: f32 rounding only.
                assert_close(&format!("guess nu {nu} C {c} T {t}"), &down(gpu, &q), &want, 1e-5, 1e-7);
            }
        }
    });
}

#[test]
fn one_hot_and_mix_rows_match_cpu_bitwise() {
    with_gpu("one_hot_and_mix_rows_match_cpu_bitwise", |gpu| {
        let labels: Vec<usize> = (0..37).map(|i| (i * 7) % 10).collect();
        let ids: Vec<i32> = labels.iter().map(|&y| y as i32).collect();
        let mut y = zeros(gpu, 37 * 10);
        k::one_hot_fwd(gpu, &up(gpu, &ids), &mut y, 37, 10).expect("one hot");
        assert_bits("one_hot", &down(gpu, &y), &cpu::one_hot(&labels, 10));

        for &(rows, row) in &[(37usize, 10usize), (3, 784), (64, 1)] {
            let x = randv(rows * row, 1.0, 5);
            let perm: Vec<usize> = (0..rows).map(|i| (i * 5 + 3) % rows).collect();
            let pi: Vec<i32> = perm.iter().map(|&j| j as i32).collect();
            let mut out = zeros(gpu, rows * row);
            k::mix_rows_fwd(gpu, &up(gpu, &x), &up(gpu, &pi), &mut out, (rows, row), 0.7316).expect("mix");
            assert_bits(&format!("mix_rows {rows} x {row}"), &down(gpu, &out), &cpu::mix_rows(&x, row, 0.7316, &perm));
        }
    });
}

#[test]
fn mse_and_the_mixmatch_ops_on_tensors_match_the_cpu() {
    with_gpu("mse_and_the_mixmatch_ops_on_tensors_match_the_cpu", |_| {
        let dev = Device::Cuda(0);
        let (p, q) = (randv(70 * 10, 1.0, 7), randv(70 * 10, 1.0, 8));
        let (pc, qc) = (Tensor::from_vec(p, &[70, 10]).unwrap(), Tensor::from_vec(q, &[70, 10]).unwrap());
        let (pg, qg) = (pc.to_device(dev).unwrap(), qc.to_device(dev).unwrap());
        let run = |p: &Tensor, q: &Tensor| {
            let p = p.clone().into_param();
            let tape = Tape::new();
            let loss = muscle::ops::mse(&tape, &p, q).expect("mse");
            let value = loss.item().expect("loss");
            let grads = tape.backward(&loss).expect("backward");
            (value, grads.get(&p).expect("grad").to_vec().expect("grad"))
        };
        let ((lc, gc), (lg, gg)) = (run(&pc, &qc), run(&pg, &qg));
        // The loss sums in another order (f32 squares, f64 sum) than the CPU (f64 squares).
        assert!((lg - lc).abs() <= 1e-6 * lc.abs(), "mse: gpu {lg} vs cpu {lc}");
        assert_bits("mse gradient", &gg, &gc);

        // The ops on tensors, with the index vector's device copy and without.
        let x = Tensor::from_vec(randv(12 * 5, 1.0, 9), &[12, 5]).unwrap();
        let perm: Indices = (0..12).map(|i| (i * 7) % 12).collect();
        let want = muscle::ops::mixmatch::mix_rows(&x, &perm, 0.6).unwrap().to_vec().unwrap();
        let got = muscle::ops::mixmatch::mix_rows(&x.to_device(dev).unwrap(), &perm, 0.6).unwrap().to_vec().unwrap();
        assert_bits("mix_rows op", &got, &want);
        let labels: Indices = (0..12).map(|i| i % 5).collect();
        let want = muscle::ops::mixmatch::one_hot(&labels, 5, &x).unwrap().to_vec().unwrap();
        let got = muscle::ops::mixmatch::one_hot(&labels, 5, &x.to_device(dev).unwrap()).unwrap().to_vec().unwrap();
        assert_bits("one_hot op", &got, &want);
    });
}
