//! Criterion benches of the CPU hot paths. Throughput is reported in FLOPs (as elements), so
//! criterion prints GFLOP/s directly ("Gelem/s").

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use muscle::cpu::conv::{conv2d_backward, conv2d_forward, ConvShape};
use muscle::cpu::gemm::{sgemm, Mat};
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
    for threads in [1, 2] {
        g.bench_function(BenchmarkId::new("fwd+bwd", format!("{threads}t")), |bch| {
            with_threads(threads, || {
                bch.iter(|| {
                    conv2d_forward(&s, &x, &w, black_box(&mut y));
                    conv2d_backward(&s, &x, &w, &dy, &mut dw, Some(&mut dx));
                })
            })
        });
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

criterion_group!(benches, peak, gemm, conv);
criterion_main!(benches);
