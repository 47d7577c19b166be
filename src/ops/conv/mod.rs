//! 2-d convolution without bias (every model here follows each conv by batch norm).

pub mod bench;
pub mod cpu;
#[cfg(feature = "cudnn")]
pub mod cuda;

use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::kernel_args::ConvShape;
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

/// Convolution of NCHW `x` by OIHW `w`.
pub fn conv2d(tape: &Tape, x: &Tensor, w: &Tensor, p: Conv2dParams) -> Result<Tensor> {
    let s = conv_shape(x, w, p)?;
    // The direct count of a training step's share: forward, weight gradient, and the input
    // gradient when the input needs one (counted here, so both devices count the same).
    let fwd = 2 * (s.n * s.co * s.ho() * s.wo() * s.ci * s.kh * s.kw) as u64;
    crate::profile::add_flops(fwd * if x.requires_grad() { 3 } else { 2 });
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("conv2d", &[x, w])? {
        #[cfg(feature = "cudnn")]
        return cuda::conv2d(gpu, tape, x, w, s);
        #[cfg(not(feature = "cudnn"))]
        return Err(Error::device(format!(
            "conv2d {s:?} on {}: the GPU convolution needs cuDNN, and this binary was built without \
             the `cudnn` feature (rebuild with --features cuda,cudnn)",
            gpu.info().ordinal
        )));
    }
    let _p = crate::profile::scope("conv2d.fwd");
    let mut y = crate::pool::take(s.y_len());
    cpu::forward(&s, x.data()?, w.data()?, &mut y);
    let out = Tensor::cpu(y, vec![s.n, s.co, s.ho(), s.wo()]);
    let (xc, wc) = (x.clone(), w.clone());
    Ok(tape.record(out, &[x, w], move |g, grads| {
        let _p = crate::profile::scope("conv2d.bwd");
        let mut dw = crate::pool::take(wc.numel());
        let mut dx = xc.requires_grad().then(|| crate::pool::take(xc.numel()));
        cpu::backward(&s, xc.data()?, wc.data()?, g.data()?, &mut dw, dx.as_deref_mut());
        if let Some(dx) = dx {
            grads.add_to(&xc, Tensor::cpu(dx, xc.shape().to_vec()))?;
        }
        grads.add_to(&wc, Tensor::cpu(dw, wc.shape().to_vec()))
    }))
}
