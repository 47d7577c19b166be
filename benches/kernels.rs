//! Criterion benches of the CPU hot paths. Throughput is reported in FLOPs (as elements, so
//! criterion prints GFLOP/s as "Gelem/s") for GEMM and convolution, in bytes of compulsory
//! traffic for the memory-bound MI loss and softmax-CE, and in images for whole training steps.
//! `muscle bench --op` prints the same kernels against the measured ceilings.
//!
//! The CUDA kernels are timed by the GPU tests (scripts/gpu-check.sh), not here: there is no
//! GPU on the machines these benches run on.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use muscle::cpu::gemm::{sgemm, Mat};
use muscle::kernel_args::{ConvShape, Precision};
use muscle::ops::conv::cpu::{backward as conv2d_backward, forward as conv2d_forward};
use muscle::testing::randn;
use std::hint::black_box;

/// Runs `f` inside a rayon pool of `threads` threads.
fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool").install(f)
}

fn gemm(c: &mut Criterion) {
    let n = 1024;
    let a = randn(&[n, n], 1).to_vec().expect("cpu");
    let b = randn(&[n, n], 2).to_vec().expect("cpu");
    let mut out = vec![0.0f32; n * n];
    let mut g = c.benchmark_group("gemm_1024");
    g.throughput(Throughput::Elements((2 * n * n * n) as u64));
    g.sample_size(20);
    for threads in [1, 2] {
        g.bench_function(BenchmarkId::from_parameter(format!("{threads}t")), |bch| {
            with_threads(threads, || {
                bch.iter(|| sgemm(n, n, n, Mat::n(&a), Mat::n(&b), black_box(&mut out), false, threads))
            })
        });
    }
    g.finish();
}

fn conv(c: &mut Criterion) {
    let s = ConvShape { n: 128, ci: 64, h: 28, w: 28, co: 64, kh: 3, kw: 3, stride: 1, pad: 1 };
    let x = randn(&[s.n, s.ci, s.h, s.w], 1).to_vec().expect("cpu");
    let w = randn(&[s.co, s.ci, 3, 3], 2).to_vec().expect("cpu");
    let dy = randn(&[s.n, s.co, s.ho(), s.wo()], 3).to_vec().expect("cpu");
    let mut y = vec![0.0f32; dy.len()];
    let mut dw = vec![0.0f32; w.len()];
    let mut dx = vec![0.0f32; x.len()];
    let mut g = c.benchmark_group("conv_64x64_3x3_28x28_b128");
    g.sample_size(10);
    // Forward is one product; backward is two (weights and input): 3 x 2 x MACs in all.
    g.throughput(Throughput::Elements((3 * 2 * s.macs()) as u64));
    // bf16 products where the CPU has them (`--precision bf16`).
    let precisions = if muscle::ops::conv::bf16_available() { &Precision::ALL[..] } else { &[Precision::F32] };
    for &p in precisions {
        for threads in [1, 2] {
            g.bench_function(
                BenchmarkId::new(
                    if p == Precision::F32 { "fwd+bwd".to_string() } else { format!("fwd+bwd {p}") },
                    format!("{threads}t"),
                ),
                |bch| {
                    with_threads(threads, || {
                        bch.iter(|| {
                            conv2d_forward(&s, &x, &w, black_box(&mut y), p);
                            conv2d_backward(&s, &x, &w, &dy, &mut dw, Some(&mut dx), p);
                        })
                    })
                },
            );
        }
    }
    g.finish();
}

fn peak(c: &mut Criterion) {
    // Not a timing loop of ours: prints the measured FMA ceiling next to the GEMM numbers.
    for threads in [1, 2] {
        if let Some((gf, isa)) = with_threads(threads, || muscle::cpu::peak::fma_peak_gflops(threads, 1.0)) {
            println!("fma peak ({isa}, {threads} thread(s)): {gf:.1} GFLOP/s");
        }
    }
    let _ = c;
}

fn mi_loss(c: &mut Criterion) {
    use muscle::ops::mutual_info::cpu::{mi_bwd, mi_fwd};
    let mut g = c.benchmark_group("mi_loss_fwd_bwd");
    g.sample_size(10);
    for (n, classes) in [(4096, 10), (4096, 100), (262_144, 10), (262_144, 100)] {
        let a = randn(&[n, classes], 1).to_vec().expect("cpu");
        let b = randn(&[n, classes], 2).to_vec().expect("cpu");
        let (mut ga, mut gb) = (vec![0.0f32; n * classes], vec![0.0f32; n * classes]);
        // Both views' logits read, both gradients written.
        g.throughput(Throughput::Bytes((4 * n * classes * 4) as u64));
        g.bench_function(BenchmarkId::new(format!("C{classes}"), n), |bch| {
            bch.iter(|| {
                let f = mi_fwd(&a, &b, n, classes, 1.0);
                mi_bwd(&f, n, classes, 1.0, black_box(&mut ga), &mut gb);
            })
        });
    }
    g.finish();
}

fn softmax_ce(c: &mut Criterion) {
    use muscle::ops::softmax::cpu::cross_entropy_hard_fwd;
    let mut g = c.benchmark_group("softmax_ce_hard");
    g.sample_size(10);
    for (n, classes) in [(262_144, 10), (65_536, 100)] {
        let x = randn(&[n, classes], 3).to_vec().expect("cpu");
        let labels: Vec<usize> = (0..n).map(|i| i * 7 % classes).collect();
        let mut grad = vec![0.0f32; n * classes];
        // Logits read, gradient written.
        g.throughput(Throughput::Bytes((2 * n * classes * 4) as u64));
        g.bench_function(BenchmarkId::new(format!("C{classes}"), n), |bch| {
            bch.iter(|| cross_entropy_hard_fwd(&x, &labels, classes, black_box(&mut grad)))
        });
    }
    g.finish();
}

fn training_steps(c: &mut Criterion) {
    use muscle::app::bench::StepRunner;
    use muscle::nn::ModelKind;
    use muscle::ssl::Method;
    use muscle::train::TrainConfig;
    let mut g = c.benchmark_group("training_step");
    g.sample_size(10);
    let cases = [
        ("convnet_muscle_64+2x256", ModelKind::ConvNet { width: 32 }, Method::Muscle, 64 + 2 * 256),
        ("wrn-28-2_supervised_64", "wrn-28-2".parse().expect("model"), Method::Supervised, 64),
    ];
    for (name, model, method, images) in cases {
        let cfg = TrainConfig { model, method, ..TrainConfig::default() };
        let mut runner = StepRunner::new(&cfg).expect("step runner");
        g.throughput(Throughput::Elements(images as u64));
        g.bench_function(name, |bch| bch.iter(|| runner.step().expect("step")));
    }
    g.finish();
}

criterion_group!(benches, peak, gemm, conv, mi_loss, softmax_ce, training_steps);
criterion_main!(benches);
