//! One convolution timed in isolation (`muscle bench --op conv`): the forward, and the backward
//! (dW, plus dX when `need_dx`: a network's first layer needs no input gradient).

use super::cpu;
use crate::kernel_args::{ConvShape, Precision};
use crate::profile::median_secs;
use crate::rng::normal_vec;
use std::hint::black_box;

/// Median seconds of the CPU forward and backward of `s`, Winograd's products in `precision`.
pub fn cpu_times(s: &ConvShape, need_dx: bool, reps: usize, precision: Precision) -> (f64, f64) {
    let x = normal_vec(s.x_len(), 1.0, 6);
    let w = normal_vec(s.w_len(), 0.1, 7);
    let dy = normal_vec(s.y_len(), 1.0, 8);
    let mut y = vec![0.0f32; dy.len()];
    let mut dw = vec![0.0f32; w.len()];
    let mut dx = vec![0.0f32; x.len()];
    let fwd = median_secs(reps, || cpu::forward(s, &x, &w, black_box(&mut y), precision));
    let bwd = median_secs(reps, || cpu::backward(s, &x, &w, &dy, &mut dw, need_dx.then_some(&mut dx[..]), precision));
    (fwd, bwd)
}

/// Median seconds of the cuDNN forward and backward of `s`, each call synchronised.
#[cfg(feature = "cudnn")]
pub fn cuda_times(
    gpu: &crate::cuda::Gpu,
    s: &ConvShape,
    need_dx: bool,
    reps: usize,
) -> crate::error::Result<(f64, f64)> {
    use super::cuda;
    let x = gpu.upload(&normal_vec(s.x_len(), 1.0, 6))?;
    let w = gpu.upload(&normal_vec(s.w_len(), 0.1, 7))?;
    let dy = gpu.upload(&normal_vec(s.y_len(), 1.0, 8))?;
    let mut y = gpu.zeros::<f32>(s.y_len())?;
    let mut dw = gpu.zeros::<f32>(s.w_len())?;
    let mut dx = gpu.zeros::<f32>(s.x_len())?;
    let fwd = gpu.median_secs(reps, || cuda::conv_forward(gpu, s, &x, &w, &mut y))?;
    let bwd = gpu.median_secs(reps, || {
        cuda::conv_backward_filter(gpu, s, &x, &dy, &mut dw)?;
        if need_dx {
            cuda::conv_backward_data(gpu, s, &w, &dy, &mut dx)?;
        }
        Ok(())
    })?;
    Ok((fwd, bwd))
}
