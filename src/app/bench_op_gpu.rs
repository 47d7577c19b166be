//! `muscle bench --op ... --device cuda`: the kernels of `bench_op` on a GPU, every call
//! synchronised, held against ceilings the command measures on the same GPU: device-to-device
//! copy bandwidth for the memory-bound MI loss and softmax-CE, and the rate of a large square
//! cuBLAS SGEMM for GEMM and convolution (FP32, no TF32).

use super::bench_op::{compute_case, memory_case, mi_cases, validate, Op, OpBench, OpResult};
use crate::cuda::{blas, context, Gpu};
use crate::error::Result;
use crate::ops;
use crate::rng::normal_vec;

/// GB/s of a 256 MiB device-to-device copy, counting the read and the write.
fn copy_bandwidth(gpu: &Gpu) -> Result<f64> {
    let n = 64 << 20;
    let src = gpu.zeros::<f32>(n)?;
    let mut dst = gpu.zeros::<f32>(n)?;
    let t = gpu.median_secs(5, || gpu.copy_range(&src, 0..n, &mut dst, 0))?;
    Ok(2.0 * (n * 4) as f64 / t / 1e9)
}

/// GFLOP/s of an 8192^3 SGEMM: the FP32 rate the compute-bound cases are held against.
fn sgemm_rate(gpu: &Gpu) -> Result<f64> {
    let m = 8192;
    let (a, b) = (gpu.zeros::<f32>(m * m)?, gpu.zeros::<f32>(m * m)?);
    let mut c = gpu.zeros::<f32>(m * m)?;
    let t = gpu.median_secs(3, || blas::sgemm(gpu, m, m, m, &a, false, &b, false, &mut c, 1.0, 0.0))?;
    Ok(2.0 * (m as f64).powi(3) / t / 1e9)
}

/// Times the requested kernel on GPU `ordinal`; one result per case.
pub fn run(b: &OpBench, ordinal: usize) -> Result<Vec<OpResult>> {
    validate(b)?;
    let gpu = context::gpu(ordinal)?;
    let gpu = &*gpu;
    let (n, c) = (b.rows, b.classes);
    match b.op {
        Op::Mi => {
            let (bw, peak) = (copy_bandwidth(gpu)?, sgemm_rate(gpu)?);
            let (fwd, both) = ops::mutual_info::bench::cuda_times(gpu, n, c, b.reps)?;
            Ok(mi_cases("cuda mi", n, c, fwd, both, bw, peak))
        }
        Op::SoftmaxCe => {
            let bw = copy_bandwidth(gpu)?;
            let t = ops::softmax::bench::cuda_time(gpu, n, c, b.reps)?;
            // Logits read, gradient written, labels read (4 bytes each here).
            let bytes = (2 * n * c * 4 + n * 4) as f64;
            Ok(vec![memory_case(format!("cuda softmax-ce loss+grad n={n} C={c}"), t, bytes, bw)])
        }
        Op::Gemm => {
            let peak = sgemm_rate(gpu)?;
            let (m, nn, kk) = b.mnk;
            let a = gpu.upload(&normal_vec(m * kk, 1.0, 4))?;
            let bm = gpu.upload(&normal_vec(kk * nn, 1.0, 5))?;
            let mut out = gpu.zeros::<f32>(m * nn)?;
            let t =
                gpu.median_secs(b.reps, || blas::sgemm(gpu, m, nn, kk, &a, false, &bm, false, &mut out, 1.0, 0.0))?;
            Ok(vec![compute_case(format!("cuda gemm {m}x{nn}x{kk}"), t, (2 * m * nn * kk) as f64, peak)])
        }
        Op::Conv => conv(gpu, b),
    }
}

#[cfg(feature = "cudnn")]
fn conv(gpu: &Gpu, b: &OpBench) -> Result<Vec<OpResult>> {
    let peak = sgemm_rate(gpu)?;
    let mut out = Vec::new();
    for (layer, (s, count)) in super::bench_op::conv_shapes(&b.model, b.batch)?.into_iter().enumerate() {
        let need_dx = layer > 0;
        let (fwd, bwd) = ops::conv::bench::cuda_times(gpu, &s, need_dx, b.reps)?;
        let name = format!("cuda {}", super::bench_op::conv_case_name(&s, count));
        let macs = s.macs() as f64;
        out.push(compute_case(format!("{name} forward"), fwd, 2.0 * macs, peak));
        let (what, products) = if need_dx { ("dW + dX", 2.0) } else { ("dW", 1.0) };
        out.push(compute_case(format!("{name} backward ({what})"), bwd, 2.0 * products * macs, peak));
    }
    Ok(out)
}

#[cfg(not(feature = "cudnn"))]
fn conv(_gpu: &Gpu, _b: &OpBench) -> Result<Vec<OpResult>> {
    Err(Error::device("--op conv --device cuda: this binary was built without the `cudnn` feature"))
}
