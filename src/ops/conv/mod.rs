//! 2-d convolution without bias (every model here follows each conv by batch norm).

pub mod bench;
pub mod cpu;
#[cfg(feature = "cudnn")]
pub mod cuda;

use crate::autograd::{Saved, Tape};
use crate::error::{Error, Result};
use crate::kernel_args::{ConvShape, InputAffine, Precision};
use crate::tensor::{fmt_shape, Tensor};

/// Stride and zero padding of a convolution (the same on both axes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub pad: usize,
}

/// Checks shapes and returns the geometry of conv(x [n, ci, h, w], w [co, ci, kh, kw]).
pub(crate) fn conv_shape(x: &Tensor, w: &Tensor, p: Conv2dParams) -> Result<ConvShape> {
    let [n, ci, h, wd] = x.dims::<4>("conv2d input")?;
    let [co, ci2, kh, kw] = w.dims::<4>("conv2d weight")?;
    let bad = |why: &str| {
        Error::shape(format!(
            "conv2d: input {} and weight {} (stride {}, pad {}): {why}",
            fmt_shape(x.shape()),
            fmt_shape(w.shape()),
            p.stride,
            p.pad
        ))
    };
    if ci != ci2 {
        return Err(bad("input channels differ"));
    }
    if p.stride == 0 || kh == 0 || kw == 0 || co == 0 {
        return Err(bad("zero stride or kernel size"));
    }
    if h + 2 * p.pad < kh || wd + 2 * p.pad < kw {
        return Err(bad("kernel larger than the padded input"));
    }
    Ok(ConvShape { n, ci, h, w: wd, co, kh, kw, stride: p.stride, pad: p.pad })
}

/// Whether this CPU computes `Precision::Bf16` products (AVX512-BF16, not lowered by
/// `MUSCLE_SIMD`; Winograd not turned off by `MUSCLE_CONV`).
pub fn bf16_available() -> bool {
    cpu::bf16_available()
}

/// Convolution of NCHW `x` by OIHW `w`, the products of its forward and backward in
/// `precision` (bf16: the CPU's Winograd layers on AVX512-BF16; an error elsewhere).
pub fn conv2d(tape: &Tape, x: &Tensor, w: &Tensor, p: Conv2dParams, precision: Precision) -> Result<Tensor> {
    let s = conv_shape(x, w, p)?;
    // The direct count of a training step's share: forward, weight gradient, and the input
    // gradient when the input needs one (counted here, so both devices count the same).
    let fwd = 2 * (s.n * s.co * s.ho() * s.wo() * s.ci * s.kh * s.kw) as u64;
    crate::profile::add_flops(fwd * if x.requires_grad() { 3 } else { 2 });
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("conv2d", &[x, w])? {
        if precision != Precision::F32 {
            return Err(Error::usage(format!(
                "conv2d {s:?}: --precision {precision} is the CPU's (AVX512-BF16); the GPU path computes in f32"
            )));
        }
        #[cfg(feature = "cudnn")]
        return cuda::conv2d(gpu, tape, x, w, s);
        #[cfg(not(feature = "cudnn"))]
        return Err(Error::device(format!(
            "conv2d {s:?} on {}: the GPU convolution needs cuDNN, and this binary was built without \
             the `cudnn` feature (rebuild with --features cuda,cudnn)",
            gpu.info().ordinal
        )));
    }
    if precision == Precision::Bf16 && !cpu::bf16_available() {
        return Err(Error::usage(format!(
            "conv2d {s:?}: --precision bf16 needs a CPU with AVX512-BF16 (and MUSCLE_SIMD, MUSCLE_CONV unset)"
        )));
    }
    let _p = crate::profile::scope("conv2d.fwd");
    let mut y = crate::pool::take(s.y_len());
    cpu::forward(&s, x.data()?, w.data()?, &mut y, precision);
    let out = Tensor::cpu(y, vec![s.n, s.co, s.ho(), s.wo()]);
    // A batch-normalised input is saved as its recipe and recomputed in the backward
    // (autograd::Saved), then freed before dX is allocated where the two gradients are separate
    // passes: the step's largest activations are never more than three at once.
    let (xs, wc) = (Saved::of(x), w.clone());
    Ok(tape.record(out, &[x, w], move |g, grads| {
        let xr = xs.identity();
        let recompute = || {
            let _p = crate::profile::scope("batch_norm.recompute");
            xs.tensor()
        };
        let (w, dy) = (wc.data()?, g.data()?);
        let mut dw = crate::pool::take(wc.numel());
        if cpu::backward_splits(&s) {
            // A batch-normalised input is read through its affine where the kernel can (no
            // recompute, no activation-sized buffer), else recomputed and freed after dW.
            let read_through = match xs.affine() {
                Some(a) => {
                    let _p = crate::profile::scope("conv2d.bwd");
                    let affine = InputAffine { scale: &a.scale, shift: &a.shift, slope: a.slope };
                    cpu::weight_grad_of_affine(&s, a.x.data()?, affine, dy, &mut dw, precision)
                }
                None => false,
            };
            if !read_through {
                let xc = recompute()?;
                let _p = crate::profile::scope("conv2d.bwd");
                cpu::weight_grad(&s, xc.data()?, w, dy, &mut dw, precision);
            }
            let _p = crate::profile::scope("conv2d.bwd");
            if xr.requires_grad() {
                let mut dx = crate::pool::take(s.x_len());
                if !cpu::input_grad(&s, w, dy, &mut dx, precision) {
                    return Err(Error::shape(format!("conv2d {s:?}: no separate input-gradient kernel")));
                }
                grads.add_to_ref(&xr, Tensor::cpu(dx, xr.shape().to_vec()))?;
            }
        } else {
            let xc = recompute()?;
            let _p = crate::profile::scope("conv2d.bwd");
            let mut dx = xr.requires_grad().then(|| crate::pool::take(s.x_len()));
            cpu::backward(&s, xc.data()?, w, dy, &mut dw, dx.as_deref_mut(), precision);
            if let Some(dx) = dx {
                grads.add_to_ref(&xr, Tensor::cpu(dx, xr.shape().to_vec()))?;
            }
        }
        grads.add_to(&wc, Tensor::cpu(dw, wc.shape().to_vec()))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Device;
    use crate::ops;
    use crate::rng::normal_vec;

    fn param(shape: &[usize], seed: u64, offset: f32, device: Device) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f32> = normal_vec(n, 1.0, seed).into_iter().map(|x| x + offset).collect();
        Tensor::from_vec(v, shape).expect("shape").into_param().to_device(device).expect("device")
    }

    /// A write drops the recipe; identity and values stay.
    fn keep_whole(t: &mut Tensor) {
        match t.device() {
            Device::Cpu => {
                t.data_mut().expect("host");
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                t.cuda_slice_mut().expect("device");
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => unreachable!("no CUDA tensors without the cuda feature"),
        }
        assert!(t.recompute().is_none());
    }

    /// pool(bn(conv(bn(x)))) on a tape on `device`: neither the convolution nor the pool holds
    /// its batch-normalised input between the passes (the recipe stands in for it, or on the
    /// CPU with AVX-512, its affine, which Winograd's weight gradient reads x through: 16
    /// channels each side), and every gradient equals, bit for bit, the one of the same graph
    /// whose input is kept whole.
    fn recomputed_inputs_give_the_same_gradients(device: Device) {
        let (ci, co) = (16, 17);
        let x = param(&[3, ci, 8, 8], 1, 0.5, device);
        let (gamma, beta) = (param(&[ci], 2, 1.0, device), param(&[ci], 3, 0.0, device));
        let w = param(&[co, ci, 3, 3], 4, 0.0, device);
        let (gamma2, beta2) = (param(&[co], 6, 1.0, device), param(&[co], 7, 0.0, device));
        let p = Conv2dParams { stride: 1, pad: 1 };
        let seed = Tensor::from_vec(normal_vec(3 * co * 4 * 4, 1.0, 5), &[3, co, 4, 4]).expect("seed");
        let run = |whole: bool| -> Vec<Vec<u32>> {
            let tape = Tape::new();
            let (mut a, _) = ops::batch_norm_train(&tape, &x, &gamma, &beta, 1e-5, Some(0.1)).expect("bn");
            assert!(a.recompute().is_some(), "a recorded training output carries its recipe");
            if whole {
                keep_whole(&mut a);
            }
            let probe = a.storage_probe();
            let y = conv2d(&tape, &a, &w, p, Precision::F32).expect("conv");
            let (b, _) = ops::batch_norm_train(&tape, &y, &gamma2, &beta2, 1e-5, Some(0.1)).expect("bn");
            let probe_b = b.storage_probe();
            let z = ops::max_pool2d(&tape, &b, 2).expect("pool");
            drop((a, y, b));
            assert_eq!(probe.upgrade().is_none(), !whole, "the convolution's input is held iff kept whole");
            assert!(probe_b.upgrade().is_none(), "the max-pool holds its input");
            let grads = tape.backward_with(&z, seed.clone()).expect("backward");
            [&x, &gamma, &beta, &w, &gamma2, &beta2]
                .iter()
                .map(|t| {
                    grads.get(t).expect("gradient").to_vec().expect("values").iter().map(|v| v.to_bits()).collect()
                })
                .collect()
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn batch_normalised_inputs_are_recomputed_not_kept_and_give_the_same_gradients() {
        recomputed_inputs_give_the_same_gradients(Device::Cpu);
    }

    /// The same on the GPU path (cuDNN's convolution, the batch-norm kernels), on the emulated
    /// device.
    #[cfg(all(feature = "cudnn", muscle_cuda_emu))]
    #[test]
    fn on_the_gpu_too() {
        if !crate::cuda::emulation_requested() {
            eprintln!("skipped: ops::conv: set MUSCLE_CUDA_EMU=1 for the emulated device");
            return;
        }
        recomputed_inputs_give_the_same_gradients(Device::Cuda(0));
    }
}
