//! kernels/optim.cu against `optim::cpu`.

use super::*;
use muscle::kernel_args::{AdamScalars, SgdScalars};
use muscle::optim::{cpu, cuda as k};

// optim.cu

#[test]
fn adam_and_adamw_match_cpu_bitwise() {
    with_gpu("adam_and_adamw_match_cpu_bitwise", |gpu| {
        // The same operations in the same order with the same roundings (no FMA contraction):
        // equal bits after every step.
        let n = 4099;
        let configs = [
            (2e-3f32, 0.9f32, 0.999f32, 1e-8f32, 5e-4f32, true),
            (1e-2, 0.9, 0.999, 1e-8, 0.1, false),
            (1e-3, 0.3, 0.99, 1e-6, 0.0, true), // 1 - beta1 = 0.7 >= 0.5: lerp's other branch
        ];
        for (t, &(lr, b1, b2, eps, wd, decoupled)) in configs.iter().enumerate() {
            let mut p = randv(n, 1.0, 700 + t as u64);
            let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
            let (mut pd, mut md, mut vd) = (up(gpu, &p), zeros(gpu, n), zeros(gpu, n));
            for step in 1..=5u64 {
                let g = randv(n, 0.1, 800 + step);
                let s = AdamScalars::new(lr, b1, b2, eps, wd, decoupled, step);
                cpu::adam_step(&mut p, &g, &mut m, &mut v, &s);
                k::adam_step(gpu, &mut pd, &up(gpu, &g), &mut md, &mut vd, n, &s).unwrap();
                let what = format!("config {t} step {step}");
                assert_bits(&format!("{what}: param"), &down(gpu, &pd), &p);
                assert_bits(&format!("{what}: exp_avg"), &down(gpu, &md), &m);
                assert_bits(&format!("{what}: exp_avg_sq"), &down(gpu, &vd), &v);
            }
        }
    });
}

#[test]
fn sgd_and_ema_match_cpu_bitwise() {
    with_gpu("sgd_and_ema_match_cpu_bitwise", |gpu| {
        let n = 1003;
        let configs = [(0.1f32, 0.0f32, 0.0f32, false), (0.05, 0.9, 5e-4, false), (0.05, 0.9, 5e-4, true)];
        for (t, &(lr, momentum, weight_decay, nesterov)) in configs.iter().enumerate() {
            let s = SgdScalars { lr, momentum, weight_decay, nesterov };
            let mut p = randv(n, 1.0, 900 + t as u64);
            let mut buf = vec![0.0f32; n];
            let (mut pd, mut bd) = (up(gpu, &p), zeros(gpu, n));
            for step in 0..3u64 {
                let g = randv(n, 0.1, 950 + step);
                let gd = up(gpu, &g);
                if momentum == 0.0 {
                    cpu::sgd_step(&mut p, &g, None, &s);
                    k::sgd_step(gpu, &mut pd, &gd, None, n, &s).unwrap();
                } else {
                    cpu::sgd_step(&mut p, &g, Some(&mut buf), &s);
                    k::sgd_step(gpu, &mut pd, &gd, Some(&mut bd), n, &s).unwrap();
                    assert_bits(&format!("sgd {t} step {step}: buffer"), &down(gpu, &bd), &buf);
                }
                assert_bits(&format!("sgd {t} step {step}: param"), &down(gpu, &pd), &p);
            }
        }
        let mut avg = randv(n, 1.0, 990);
        let mut ad = up(gpu, &avg);
        for (t, decay) in [0.999f32, 0.5, (1.0 + 3.0) / (10.0 + 3.0)].into_iter().enumerate() {
            let value = randv(n, 1.0, 991 + t as u64);
            cpu::ema_update(&mut avg, &value, decay);
            k::ema_update(gpu, &mut ad, &up(gpu, &value), n, decay).unwrap();
            assert_bits(&format!("ema decay {decay}"), &down(gpu, &ad), &avg);
        }
    });
}
