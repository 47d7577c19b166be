//! kernels/mutual_info.cu against `ops::mutual_info::cpu` and the f64 reference.

use super::*;
use muscle::ops::mutual_info::{cpu, cuda as k};

#[test]
fn mi_partition_depends_on_sizes_only() {
    assert_eq!(k::mi_rows_per_part(1, 10), 256);
    assert_eq!(k::mi_rows_per_part(65_536, 10), 256);
    assert_eq!(k::mi_rows_per_part(65_536, 1000), 8192);
}

// mutual_info.cu

/// Runs the GPU MI forward + backward and checks it against the CPU twin (and, when `reference`,
/// the independent f64 reference `mi_loss_f64`). Tolerances: the joint J is summed in a
/// different order (f32 within parts of 256+ rows, f64 across) than on the CPU, so P differs by
/// ~1e-6 relative and the loss by far less (its errors average out): 1e-5 relative to
/// max(1, |L|); the gradients are f32 products with G^ through a cancelling softmax backward,
/// checked at 1e-4 of their largest entry, as the CPU kernel is checked against f64.
fn check_mi(gpu: &Gpu, a: &[f32], b: &[f32], n: usize, c: usize, lambda: f32, reference: bool, what: &str) {
    let cpu_f = cpu::mi_fwd(a, b, n, c, lambda);
    let (mut ca, mut cb) = (vec![0.0; n * c], vec![0.0; n * c]);
    cpu::mi_bwd(&cpu_f, n, c, 1.0, &mut ca, &mut cb);

    let (ad, bd) = (up(gpu, a), up(gpu, b));
    let f = k::mi_fwd(gpu, &ad, &bd, n, c, lambda).unwrap_or_else(|e| panic!("{what}: {e}"));
    let (mut ga, mut gb) = (zeros(gpu, n * c), zeros(gpu, n * c));
    k::mi_bwd(gpu, &f, &up(gpu, &[1.0f32]), &mut ga, &mut gb).unwrap_or_else(|e| panic!("{what}: {e}"));
    let s = f.scalars(gpu).unwrap();
    let loss32 = down(gpu, &f.loss)[0];

    let want = cpu_f.loss as f64;
    assert!((s.loss - want).abs() <= 1e-5 * want.abs().max(1.0), "{what}: loss {} vs cpu {want}", s.loss);
    assert_eq!(loss32, s.loss as f32, "{what}: f32 loss is the f64 loss rounded");
    assert!((s.s - cpu_f.s).abs() <= 1e-5 * cpu_f.s, "{what}: s {} vs cpu {}", s.s, cpu_f.s);
    assert!((s.joint_entropy - cpu_f.joint_entropy).abs() <= 1e-5 * cpu_f.joint_entropy.abs().max(1.0), "{what}: H(P)");
    assert!(
        (s.marginal_entropy - cpu_f.marginal_entropy).abs() <= 1e-5 * cpu_f.marginal_entropy.abs().max(1.0),
        "{what}: H(m)"
    );
    assert_eq!((s.clamped, s.clamped_marginals), (cpu_f.clamped, cpu_f.clamped_marginals), "{what}: clamp counts");

    // z, w: the softmax, as in softmax_and_log_softmax_match_cpu.
    assert_close(&format!("{what}: z"), &down(gpu, &f.z), &cpu_f.z_rows(), 1e-5, 1e-37);
    assert_close(&format!("{what}: w"), &down(gpu, &f.w), &cpu_f.w_rows(), 1e-5, 1e-37);
    // P: 1e-5 relative; entries below 1e-14 (sums of products of underflowing probabilities, far
    // under the EPS clamp, so only their clamped-ness matters) are compared absolutely.
    let p = down(gpu, &f.p);
    for (i, (&g, &w)) in p.iter().zip(&cpu_f.p).enumerate() {
        assert!((g - w).abs() <= 1e-5 * w.abs() + 1e-14, "{what}: P[{i}] {g:e} vs cpu {w:e}");
    }
    // G^ entries are -ln P + O(1): an error of 1e-6 relative in P moves them by 1e-6 absolute.
    assert_scaled(&format!("{what}: G^"), &down(gpu, &f.g_hat), &cpu_f.g_hat, 1e-4);
    assert_scaled(&format!("{what}: G0"), &down(gpu, &f.g0), &cpu_f.g0, 1e-4);

    let (gav, gbv) = (down(gpu, &ga), down(gpu, &gb));
    assert_scaled(&format!("{what}: grad a"), &gav, &ca, 1e-4);
    assert_scaled(&format!("{what}: grad b"), &gbv, &cb, 1e-4);
    if reference {
        let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let (l, ra, rb) = cpu::mi_loss_f64(&a64, &b64, n, c, lambda as f64);
        assert!((s.loss - l).abs() <= 1e-5 * l.abs().max(1.0), "{what}: loss {} vs f64 reference {l}", s.loss);
        for (name, got, r) in [("a", &gav, &ra), ("b", &gbv, &rb)] {
            let scale = r.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let err = got.iter().zip(r.iter()).fold(0.0f64, |m, (g, r)| m.max((*g as f64 - r).abs()));
            assert!(
                err <= 1e-4 * scale + 1e-7,
                "{what}: grad {name} off the f64 reference by {err:.3e} (max {scale:.3e})"
            );
        }
    }
}

#[test]
fn mi_matches_cpu_and_f64_reference() {
    with_gpu("mi_matches_cpu_and_f64_reference", |gpu| {
        // C <= 32 runs the fused kernels, C > 32 the tiled ones; n = 4099 spans 17 parts; C = 1000
        // at n = 2500 spans 3 parts of 64 x 64 tiles with ragged edges.
        let cases = [
            (1usize, 2usize, true),
            (1, 3, true),
            (5, 3, true),
            (37, 10, true),
            (1000, 10, true),
            (4099, 10, false),
            (40, 32, true),
            (300, 33, true),
            (1000, 100, true),
            (77, 257, true),
            (2500, 1000, false),
        ];
        for (t, &(n, c, reference)) in cases.iter().enumerate() {
            let a = randv(n * c, 2.0, 100 + t as u64);
            let b = randv(n * c, 2.0, 500 + t as u64);
            for lambda in [1.0f32, 1.5] {
                check_mi(gpu, &a, &b, n, c, lambda, reference, &format!("n {n} C {c} lambda {lambda}"));
            }
        }
    });
}

#[test]
fn mi_with_extreme_logits_and_active_clamp_matches_cpu() {
    with_gpu("mi_with_extreme_logits_and_active_clamp_matches_cpu", |gpu| {
        // Classes 3, 4, 5 sit at logits -40, -25, -12 (the CPU module's clamp test): P entries
        // among them underflow below EPS and class 3's marginal is clamped too.
        let (n, c) = (12, 6);
        let mut r = Rng::new(5, 3);
        let mut make = || -> Vec<f32> {
            let mut v = vec![0.0f32; n * c];
            for i in 0..n {
                for x in 0..c {
                    let bias = [0.0, 0.0, 0.0, -40.0, -25.0, -12.0][x];
                    let lead = if x == i % 3 { 2.0 } else { 0.0 };
                    v[i * c + x] = bias + lead + 1.5 * r.normal();
                }
            }
            v
        };
        let (a, b) = (make(), make());
        for lambda in [1.0f32, 1.5] {
            check_mi(gpu, &a, &b, n, c, lambda, true, &format!("clamp lambda {lambda}"));
        }
        // One-hot logits at 80 (P = I / C: every off-diagonal entry clamped), and +-80 rows, for
        // the fused (C = 10) and tiled (C = 40) paths.
        for &(n, c) in &[(30usize, 10usize), (80, 40)] {
            let mut a = vec![-80.0f32; n * c];
            for i in 0..n {
                a[i * c + i % c] = 80.0;
            }
            let f = k::mi_fwd(gpu, &up(gpu, &a), &up(gpu, &a), n, c, 1.0).unwrap();
            let s = f.scalars(gpu).unwrap();
            assert!((s.loss + (c as f64).ln()).abs() < 1e-5, "P = I/C, C {c}: loss {} vs -ln C", s.loss);
            assert_eq!(s.clamped, c * c - c);
            let b = awkward_logits(n, c, 77);
            let a = awkward_logits(n, c, 78);
            check_mi(gpu, &a, &b, n, c, 1.0, true, &format!("+-80 logits C {c}"));
        }
    });
}

#[test]
fn mi_uniform_outputs_give_the_known_loss_and_zero_gradient() {
    with_gpu("mi_uniform_outputs_give_the_known_loss_and_zero_gradient", |gpu| {
        for &(n, c) in &[(24usize, 10usize), (70, 50)] {
            let (a, b) = (vec![0.7f32; n * c], vec![-1.3f32; n * c]);
            for lambda in [1.0f32, 1.5] {
                let f = k::mi_fwd(gpu, &up(gpu, &a), &up(gpu, &b), n, c, lambda).unwrap();
                let (mut ga, mut gb) = (zeros(gpu, n * c), zeros(gpu, n * c));
                k::mi_bwd(gpu, &f, &up(gpu, &[1.0f32]), &mut ga, &mut gb).unwrap();
                let s = f.scalars(gpu).unwrap();
                let want = 2.0 * (1.0 - lambda as f64) * (c as f64).ln();
                assert!((s.loss - want).abs() < 1e-6, "C {c} lambda {lambda}: loss {} vs {want}", s.loss);
                // Zero in exact arithmetic; f32 rows that do not sum to exactly 1 leave ~1e-7.
                let m = max_abs(&down(gpu, &ga)).max(max_abs(&down(gpu, &gb)));
                assert!(m < 1e-6, "C {c} lambda {lambda}: gradient {m}");
            }
        }
    });
}

#[test]
fn mi_is_deterministic_and_scales_with_upstream() {
    with_gpu("mi_is_deterministic_and_scales_with_upstream", |gpu| {
        for &(n, c) in &[(3000usize, 10usize), (1000, 100)] {
            let (a, b) = (up(gpu, &randv(n * c, 2.0, 1)), up(gpu, &randv(n * c, 2.0, 2)));
            let run = |upstream: f32| {
                let f = k::mi_fwd(gpu, &a, &b, n, c, 1.5).unwrap();
                let (mut ga, mut gb) = (zeros(gpu, n * c), zeros(gpu, n * c));
                k::mi_bwd(gpu, &f, &up(gpu, &[upstream]), &mut ga, &mut gb).unwrap();
                (down(gpu, &f.stats), down(gpu, &ga), down(gpu, &gb))
            };
            let (s1, a1, b1) = run(1.0);
            let (s2, a2, b2) = run(1.0);
            // Fixed partition and reduction order, no atomics: the same bits every time.
            assert!(s1.iter().zip(&s2).all(|(x, y)| x.to_bits() == y.to_bits()), "C {c}: stats differ between runs");
            assert_bits(&format!("C {c}: grad a rerun"), &a2, &a1);
            assert_bits(&format!("C {c}: grad b rerun"), &b2, &b1);
            // upstream = -2.5: scale = upstream / s is one f32 rounding away from -2.5 / s.
            let (_, a3, b3) = run(-2.5);
            let want: Vec<f32> = a1.iter().chain(&b1).map(|v| -2.5 * v).collect();
            let got: Vec<f32> = a3.iter().chain(&b3).copied().collect();
            assert_scaled(&format!("C {c}: upstream -2.5"), &got, &want, 1e-6);
        }
    });
}
