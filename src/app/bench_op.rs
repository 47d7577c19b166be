//! `muscle bench --op`: one kernel timed in isolation, against the machine's ceiling measured by
//! the same command (FMA peak for GEMM and convolution, copy bandwidth for the memory-bound
//! softmax-CE and MI loss), so a user sees how far a kernel is from its floor.

use crate::cpu::{self, gemm::Mat};
use crate::error::{choice, or_list, Error, Result};
use crate::kernel_args::ConvShape;
use crate::nn::{convnet_plan, Block};
use crate::ops;
use crate::profile::median_secs;
use crate::rng::normal_vec;
use serde::Serialize;
use std::hint::black_box;

choice! {
    /// A kernel family `muscle bench --op` can time.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Op {
        /// IIC loss forward + backward.
        Mi = "mi",
        /// Fused softmax + cross-entropy (loss and logit gradient).
        SoftmaxCe = "softmax-ce",
        /// A model's convolutions (convnet or wrn-28-2), forward and backward.
        Conv = "conv",
        /// One f32 matrix product.
        Gemm = "gemm",
    }
    unknown(s) = Error::usage(format!("--op: unknown op '{s}' (expected {})", or_list(&Op::NAMES)));
}

/// What to time.
#[derive(Clone, Debug)]
pub struct OpBench {
    /// The kernel family.
    pub op: Op,
    /// Rows (images) for mi and softmax-ce.
    pub rows: usize,
    /// Classes for mi and softmax-ce.
    pub classes: usize,
    /// GEMM m, n, k.
    pub mnk: (usize, usize, usize),
    /// Images per convolution call.
    pub batch: usize,
    /// Whose convolutions `--op conv` times: "convnet" or "wrn-28-2".
    pub model: String,
    /// Timed repetitions (the median is reported).
    pub reps: usize,
    /// What `--op conv`'s Winograd products multiply.
    pub precision: crate::kernel_args::Precision,
}

/// One timed case.
#[derive(Clone, Debug, Serialize)]
pub struct OpResult {
    /// Kernel and shape.
    pub case: String,
    /// Median milliseconds per call.
    pub ms: f64,
    /// Achieved GFLOP/s (compute-bound kernels).
    pub gflops: Option<f64>,
    /// Achieved GB/s of compulsory traffic (memory-bound kernels).
    pub gbs: Option<f64>,
    /// The ceiling it is held against: GFLOP/s or GB/s, measured by the same command.
    pub ceiling: f64,
    /// Achieved / ceiling.
    pub fraction: f64,
    /// The time at the ceiling (the floor), ms.
    pub floor_ms: f64,
    /// Threads.
    pub threads: usize,
}

/// A memory-bound case: `bytes` of compulsory traffic in `secs`, against copy bandwidth `bw`.
pub(crate) fn memory_case(case: String, secs: f64, bytes: f64, bw: f64) -> OpResult {
    let gbs = bytes / secs / 1e9;
    OpResult {
        case,
        ms: secs * 1e3,
        gflops: None,
        gbs: Some(gbs),
        ceiling: bw,
        fraction: gbs / bw,
        floor_ms: bytes / bw / 1e6,
        threads: cpu::threads(),
    }
}

/// A compute-bound case: `flops` in `secs`, against FMA peak `peak`.
pub(crate) fn compute_case(case: String, secs: f64, flops: f64, peak: f64) -> OpResult {
    let gflops = flops / secs / 1e9;
    OpResult {
        case,
        ms: secs * 1e3,
        gflops: Some(gflops),
        gbs: None,
        ceiling: peak,
        fraction: gflops / peak,
        floor_ms: flops / peak / 1e6,
        threads: cpu::threads(),
    }
}

/// Checks the sizes of a request (the same limits on every device).
pub(crate) fn validate(b: &OpBench) -> Result<()> {
    let positive = [("--rows", b.rows), ("--classes", b.classes), ("--batch", b.batch), ("--reps", b.reps)];
    if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
        return Err(Error::usage(format!("{name}: must be positive")));
    }
    let (n, c) = (b.rows, b.classes);
    match b.op {
        Op::Mi | Op::SoftmaxCe => {
            if c < 2 {
                return Err(Error::usage("--classes: must be at least 2"));
            }
            n.checked_mul(c)
                .filter(|&e| e <= 1 << 30)
                .ok_or_else(|| Error::usage(format!("--rows x --classes: {n} x {c} is too large")))?;
        }
        Op::Gemm => {
            let (m, nn, k) = b.mnk;
            if m == 0 || nn == 0 || k == 0 {
                return Err(Error::usage("--m, --n, --k: must be positive"));
            }
            if m.max(nn).max(k) > 16384 {
                return Err(Error::usage("--m, --n, --k: at most 16384 each"));
            }
        }
        Op::Conv => {}
    }
    Ok(())
}

/// Times the requested kernel on the CPU; returns one result per case.
pub fn run(b: &OpBench) -> Result<Vec<OpResult>> {
    validate(b)?;
    let (n, c) = (b.rows, b.classes);
    match b.op {
        Op::Mi => {
            let bw = cpu::peak::copy_bandwidth_gbs(256);
            let (fwd, both) = ops::mutual_info::bench::cpu_times(n, c, b.reps);
            let peak = fma_peak()?;
            let mut out = mi_cases("mi", n, c, fwd, both, bw, peak);
            if c > 16 {
                // Wide C: the three products alone through the GEMM crate, the yardstick the
                // forward + backward is held against (BENCHMARKS.md, MI loss).
                let t = ops::mutual_info::bench::cpu_gemm_reference(n, c, b.reps);
                let flops = (6 * n * c * c) as f64;
                out.push(compute_case(format!("gemm crate, the same 3 products n={n} C={c}"), t, flops, peak));
            }
            Ok(out)
        }
        Op::SoftmaxCe => {
            let bw = cpu::peak::copy_bandwidth_gbs(256);
            let t = ops::softmax::bench::cpu_time(n, c, b.reps);
            // Logits read, gradient written, labels read (as the u32/i64 a framework would hold: 8 bytes).
            let bytes = (2 * n * c * 4 + n * 8) as f64;
            Ok(vec![memory_case(format!("softmax-ce loss+grad n={n} C={c}"), t, bytes, bw)])
        }
        Op::Gemm => {
            let peak = fma_peak()?;
            let (m, nn, k) = b.mnk;
            let (a, bm) = (normal_vec(m * k, 1.0, 4), normal_vec(k * nn, 1.0, 5));
            let mut out = vec![0.0f32; m * nn];
            let threads = cpu::threads();
            let t = median_secs(b.reps, || {
                cpu::gemm::sgemm(m, nn, k, Mat::n(&a), Mat::n(&bm), black_box(&mut out), false, threads)
            });
            Ok(vec![compute_case(format!("gemm {m}x{nn}x{k}"), t, (2 * m * nn * k) as f64, peak)])
        }
        Op::Conv => {
            let peak = fma_peak()?;
            let mut out = Vec::new();
            for (layer, (s, count)) in conv_shapes(&b.model, b.batch)?.into_iter().enumerate() {
                // Training never needs the input image's gradient: the first layer's backward is dW only.
                let need_dx = layer > 0;
                let (fwd, bwd) = ops::conv::bench::cpu_times(&s, need_dx, b.reps, b.precision);
                let name = conv_case_name(&s, count);
                let macs = s.macs() as f64;
                out.push(compute_case(format!("{name} forward"), fwd, 2.0 * macs, peak));
                let (what, products) = if need_dx { ("dW + dX", 2.0) } else { ("dW", 1.0) };
                out.push(compute_case(format!("{name} backward ({what})"), bwd, 2.0 * products * macs, peak));
            }
            Ok(out)
        }
    }
}

/// The MI loss's two cases (forward; forward + backward) timed at `fwd` / `both` seconds, each held
/// against the higher of its floors: compulsory traffic (both views' logits read, and for the
/// backward both gradients written) over `bw`, or the C x C products' FLOPs (J = Z^T W forward,
/// G^ w_i and G^ z_i backward: 2 n C^2 and 4 n C^2) over `peak`, which set it for wide C.
pub(crate) fn mi_cases(prefix: &str, n: usize, c: usize, fwd: f64, both: f64, bw: f64, peak: f64) -> Vec<OpResult> {
    let elems = (n * c * 4) as f64;
    let (f_flops, b_flops) = ((2 * n * c * c) as f64, (4 * n * c * c) as f64);
    let pick = |case: String, secs: f64, bytes: f64, flops: f64| {
        if flops / peak > bytes / bw {
            compute_case(case, secs, flops, peak)
        } else {
            memory_case(case, secs, bytes, bw)
        }
    };
    vec![
        pick(format!("{prefix} forward n={n} C={c}"), fwd, 2.0 * elems, f_flops),
        pick(format!("{prefix} forward+backward n={n} C={c}"), both, 4.0 * elems, f_flops + b_flops),
    ]
}

fn fma_peak() -> Result<f64> {
    cpu::peak::fma_peak_gflops(cpu::threads(), 0.5)
        .map(|(g, _)| g)
        .ok_or_else(|| Error::usage("--op gemm/conv: this CPU has no FMA instruction set the peak probe knows"))
}

/// The distinct convolutions of `model` at batch `n`, each with how many times a forward pass
/// runs it, in the order the network first meets them.
pub(crate) fn conv_shapes(model: &str, n: usize) -> Result<Vec<(ConvShape, usize)>> {
    let shapes = match model {
        "convnet" => convnet_shapes(n),
        "wrn-28-2" => wrn_shapes(n, 28, 2),
        _ => return Err(Error::usage(format!("--model: --op conv knows convnet and wrn-28-2, not '{model}'"))),
    };
    let mut out: Vec<(ConvShape, usize)> = Vec::new();
    for s in shapes {
        match out.iter_mut().find(|(t, _)| *t == s) {
            Some((_, c)) => *c += 1,
            None => out.push((s, 1)),
        }
    }
    Ok(out)
}

/// "conv 32->64 3x3/2 32x32 b64" (stride shown when not 1), with "(x7)" when a step runs it 7 times.
pub(crate) fn conv_case_name(s: &ConvShape, count: usize) -> String {
    let stride = if s.stride == 1 { String::new() } else { format!("/{}", s.stride) };
    let times = if count == 1 { String::new() } else { format!(" (x{count})") };
    format!("conv {}->{} {}x{}{stride} {}x{} b{}{times}", s.ci, s.co, s.kh, s.kw, s.h, s.w, s.n)
}

/// Every convolution of WRN-depth-widen on 32 x 32 x 3 input, batch `n`, in forward order
/// (mirrors `nn::WideResNet::new`; a test holds the two to the same weights).
pub(crate) fn wrn_shapes(n: usize, depth: usize, widen: usize) -> Vec<ConvShape> {
    let conv = |ci, co, side, k, stride| ConvShape { n, ci, h: side, w: side, co, kh: k, kw: k, stride, pad: k / 2 };
    let widths = [16, 16 * widen, 32 * widen, 64 * widen];
    let mut shapes = vec![conv(3, widths[0], 32, 3, 1)];
    let mut side = 32;
    for s in 0..3 {
        for i in 0..(depth - 4) / 6 {
            let cin = if i == 0 { widths[s] } else { widths[s + 1] };
            let stride = if i == 0 && s > 0 { 2 } else { 1 };
            shapes.push(conv(cin, widths[s + 1], side, 3, stride));
            let out_side = side / stride;
            shapes.push(conv(widths[s + 1], widths[s + 1], out_side, 3, 1));
            if cin != widths[s + 1] {
                shapes.push(conv(cin, widths[s + 1], side, 1, stride));
            }
            side = out_side;
        }
    }
    shapes
}

/// The convolutions of the default convnet (width 32) on 28 x 28 x 1 input, batch `n`.
pub(crate) fn convnet_shapes(n: usize) -> Vec<ConvShape> {
    let (mut ci, mut side, mut shapes) = (1, 28, Vec::new());
    for block in convnet_plan(32) {
        match block {
            Block::Conv { out, k, pad } => {
                shapes.push(ConvShape { n, ci, h: side, w: side, co: out, kh: k, kw: k, stride: 1, pad });
                ci = out;
                side = side + 2 * pad + 1 - k;
            }
            Block::MaxPool => side /= 2,
            _ => {}
        }
    }
    shapes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--op mi` at `rows` x `classes`, timed `reps` times.
    fn mi_bench(rows: usize, classes: usize, reps: usize) -> OpBench {
        let (mnk, batch, model, precision) = ((1, 1, 1), 1, "convnet".into(), Default::default());
        OpBench { op: Op::Mi, rows, classes, mnk, batch, reps, model, precision }
    }

    #[test]
    fn convnet_shapes_follow_the_plan() {
        let s = convnet_shapes(4);
        let got: Vec<(usize, usize, usize)> = s.iter().map(|s| (s.ci, s.co, s.h)).collect();
        assert_eq!(got, vec![(1, 32, 28), (32, 32, 28), (32, 64, 14), (64, 64, 14), (64, 128, 7)]);
    }

    #[test]
    fn wrn_shapes_hold_the_models_conv_weights() {
        let model = crate::nn::WideResNet::new(3, 10, 28, 2, &mut crate::rng::Rng::new(0, 0));
        let mut weights = Vec::new();
        crate::nn::Module::visit(&model, &mut |_, _, t| {
            if t.shape().len() == 4 {
                weights.push(t.shape().to_vec());
            }
        });
        let mut from_shapes: Vec<Vec<usize>> =
            wrn_shapes(2, 28, 2).iter().map(|s| vec![s.co, s.ci, s.kh, s.kw]).collect();
        weights.sort();
        from_shapes.sort();
        assert_eq!(weights, from_shapes);
        let grouped = conv_shapes("wrn-28-2", 2).unwrap_or_default();
        assert_eq!(grouped.iter().map(|(_, c)| c).sum::<usize>(), 28);
        // The last stage runs at 8 x 8 after two stride-2 convolutions.
        assert!(grouped.iter().any(|(s, c)| (s.ci, s.co, s.h, s.stride, *c) == (128, 128, 8, 1, 7)));
        assert!(conv_shapes("cnn13", 2).is_err_and(|e| e.to_string().contains("cnn13")));
    }

    #[test]
    fn wide_mi_is_held_against_the_gemm_crate_doing_its_products() {
        let b = mi_bench(256, 24, 1);
        let names = |b: &OpBench| match run(b) {
            Ok(cases) => cases.into_iter().map(|c| c.case).collect::<Vec<_>>(),
            Err(e) => panic!("--op mi: {e}"),
        };
        let wide = names(&b);
        assert_eq!(wide.len(), 3, "{wide:?}");
        assert!(wide[2].starts_with("gemm crate, the same 3 products n=256 C=24"), "{wide:?}");
        let narrow = names(&OpBench { classes: 10, ..b });
        assert_eq!(narrow.len(), 2, "C <= 16 has no GEMM products: {narrow:?}");
    }

    #[test]
    fn bad_sizes_are_usage_errors() {
        let b = mi_bench(0, 10, 1);
        assert!(run(&b).is_err_and(|e| e.to_string().contains("--rows")));
        let b = OpBench { op: Op::Mi, rows: 4, classes: 1, ..b };
        assert!(run(&b).is_err_and(|e| e.to_string().contains("--classes")));
        assert!("fft".parse::<Op>().is_err_and(|e| e.to_string().contains("fft")));
    }

    #[test]
    fn mi_case_reports_consistent_floor() -> Result<()> {
        let b = mi_bench(4096, 10, 2);
        let r = run(&b)?;
        assert_eq!(r.len(), 2);
        for case in &r {
            // Memory- or compute-bound, whichever floor is higher on this machine: one rate is set.
            let rate = case.gbs.or(case.gflops).unwrap_or(0.0);
            assert!(case.ms > 0.0 && rate > 0.0 && case.gbs.is_some() != case.gflops.is_some());
            // floor / time = achieved / ceiling, by definition.
            assert!((case.floor_ms / case.ms - case.fraction).abs() < 1e-9 * (1.0 + case.fraction));
        }
        Ok(())
    }
}
