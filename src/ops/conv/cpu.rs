//! The CPU convolution: which algorithm runs each layer, in one place. The kernels themselves are
//! shared CPU code (`cpu::direct_conv`, `cpu::winograd`, `cpu::im2col`); this file only chooses:
//! Winograd (AVX-512 or AVX2), then the direct AVX-512 kernels, where they apply on this CPU,
//! im2col + GEMM for every other geometry (`MUSCLE_CONV` overrides the choice, to compare paths
//! on one machine).

use crate::kernel_args::{ConvShape, InputAffine, Precision};

use crate::cpu::im2col;
#[cfg(target_arch = "x86_64")]
use crate::cpu::{direct_conv as direct, winograd};

/// Forward: y [n, co, ho, wo] = conv(x [n, ci, h, w], w [co, ci, kh, kw]), Winograd's products
/// in `precision` (every other kernel computes in f32; bf16 needs [`bf16_available`]).
pub fn forward(s: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32], precision: Precision) {
    #[cfg(target_arch = "x86_64")]
    {
        if winograd::forward_applies(s) {
            return winograd::forward(s, x, w, y, precision);
        }
        if direct::forward_applies(s) {
            return direct::forward(s, x, w, y);
        }
    }
    let _ = precision;
    im2col::gemm_forward(s, x, w, y)
}

/// Whether this CPU computes bf16 products (`Precision::Bf16`): AVX512-BF16, not lowered by
/// `MUSCLE_SIMD`, and Winograd not turned off by `MUSCLE_CONV`.
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return winograd::bf16_runs();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Backward: the weight gradient `dw` [co, ci, kh, kw] (overwritten) and, when given, the input
/// gradient `dx` [n, ci, h, w] (overwritten), from the output gradient `dy`; Winograd's products
/// in `precision`.
pub fn backward(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    dx: Option<&mut [f32]>,
    precision: Precision,
) {
    if !backward_splits(s) {
        return im2col::gemm_backward(s, x, w, dy, dw, dx);
    }
    weight_grad(s, x, w, dy, dw, precision);
    if let Some(dx) = dx {
        input_grad(s, w, dy, dx, precision);
    }
}

/// Whether this geometry's backward runs as [`weight_grad`] then [`input_grad`], so that a
/// caller can free the input between them (every 3x3 layer here); otherwise im2col + GEMM
/// computes both in one pass over the images ([`backward`]).
pub fn backward_splits(s: &ConvShape) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let t = ConvShape { ci: s.co, co: s.ci, ..*s };
        direct::applies(s) || direct::strided_dw_applies(s) || winograd::input_grad_applies(&t)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = s;
        false
    }
}

/// The weight gradient `dw` (overwritten) of a convolution whose input is act(x scale[c] +
/// shift[c]) (a training batch norm's output), read from `x` itself so that the input is never
/// written out: true when a kernel here does that for `s` on this CPU (Winograd's weight
/// gradient), false (`dw` untouched) when the caller must recompute the input.
pub fn weight_grad_of_affine(
    s: &ConvShape,
    x: &[f32],
    affine: InputAffine,
    dy: &[f32],
    dw: &mut [f32],
    precision: Precision,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if winograd::weight_grad_reads_affine(s) {
        winograd::weight_grad(s, x, Some(affine), dy, dw, precision);
        return true;
    }
    let _ = (s, x, affine, dy, dw, precision);
    false
}

/// The weight gradient `dw` alone (overwritten): the half of the backward that reads `x`.
pub fn weight_grad(s: &ConvShape, x: &[f32], w: &[f32], dy: &[f32], dw: &mut [f32], precision: Precision) {
    #[cfg(target_arch = "x86_64")]
    {
        if winograd::weight_grad_applies(s) {
            return winograd::weight_grad(s, x, None, dy, dw, precision);
        }
        if direct::applies(s) {
            if !direct::weight_grad(s, x, dy, dw) {
                im2col::gemm_backward(s, x, w, dy, dw, None);
            }
            return;
        }
        if direct::strided_dw_applies(s) {
            return direct::weight_grad_channel_last(s, x, dy, dw);
        }
    }
    // Without the direct kernels (AVX2): through im2col + GEMM.
    let _ = precision;
    im2col::gemm_backward(s, x, w, dy, dw, None)
}

/// The input gradient `dx` alone (overwritten) where [`backward_splits`] holds; false (and `dx`
/// untouched) where this geometry computes it only together with the weight gradient.
pub fn input_grad(s: &ConvShape, w: &[f32], dy: &[f32], dx: &mut [f32], precision: Precision) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // dX = conv(dY, W') with W' the taps flipped and channels swapped: the same geometry,
        // so the forward kernels compute it.
        let t = ConvShape { ci: s.co, co: s.ci, ..*s };
        if direct::applies(s) {
            let w_flip = s.flip_weights(w);
            if winograd::input_grad_applies(&t) {
                winograd::forward(&t, dy, &w_flip, dx, precision);
            } else {
                direct::forward(&t, dy, &w_flip, dx);
            }
            return true;
        }
        if direct::strided_dw_applies(s) {
            direct::input_grad_strided(s, w, dy, dx);
            return true;
        }
        if winograd::input_grad_applies(&t) {
            winograd::forward(&t, dy, &s.flip_weights(w), dx, precision);
            return true;
        }
    }
    let _ = (s, w, dy, dx, precision);
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::normal_vec;

    #[test]
    fn forward_dispatch_matches_direct_loops() {
        let conv = |n, ci, h, w, co, k, stride, pad| ConvShape { n, ci, h, w, co, kh: k, kw: k, stride, pad };
        let shapes = [
            conv(3, 2, 7, 6, 4, 3, 1, 1),
            conv(2, 3, 8, 8, 5, 3, 2, 1),
            conv(1, 4, 5, 5, 3, 1, 1, 0),
            conv(2, 16, 8, 8, 16, 3, 1, 1),
            conv(2, 16, 8, 8, 8, 3, 2, 1),
            conv(2, 32, 7, 7, 8, 3, 1, 1),
        ];
        for (k, s) in shapes.iter().enumerate() {
            im2col::assert_forward_matches_naive(s, 80 + k as u64, |s, x, w, y| forward(s, x, w, y, Precision::F32));
        }
    }

    /// Whatever each geometry is routed to (direct, Winograd, channel-last, phase planes or the
    /// GEMM path), the gradients equal the GEMM path's to float noise.
    #[test]
    fn backward_dispatch_matches_the_gemm_path() {
        let conv = |n, ci, h, w, co, stride| ConvShape { n, ci, h, w, co, kh: 3, kw: 3, stride, pad: 1 };
        let shapes = [
            conv(2, 16, 8, 8, 16, 1),
            conv(3, 32, 7, 7, 8, 1),
            conv(2, 16, 28, 28, 8, 1),
            conv(3, 16, 8, 8, 8, 2),
            conv(2, 32, 16, 6, 16, 2),
            conv(5, 16, 16, 16, 8, 2),
            ConvShape { n: 2, ci: 8, h: 5, w: 5, co: 4, kh: 1, kw: 1, stride: 1, pad: 0 },
        ];
        for (k, s) in shapes.into_iter().enumerate() {
            let x = normal_vec(s.x_len(), 1.0, 40 + k as u64);
            let w = normal_vec(s.w_len(), 1.0, 50 + k as u64);
            let dy = normal_vec(s.y_len(), 1.0, 60 + k as u64);
            let (mut dw, mut dx) = (vec![f32::NAN; w.len()], vec![f32::NAN; x.len()]);
            backward(&s, &x, &w, &dy, &mut dw, Some(&mut dx), Precision::F32);
            let (mut dw_ref, mut dx_ref) = (vec![0.0; w.len()], vec![0.0; x.len()]);
            im2col::gemm_backward(&s, &x, &w, &dy, &mut dw_ref, Some(&mut dx_ref));
            for (name, got, want) in [("dw", &dw, &dw_ref), ("dx", &dx, &dx_ref)] {
                for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{s:?} {name}[{i}]: {a} vs {b}");
                }
            }
        }
    }
}
