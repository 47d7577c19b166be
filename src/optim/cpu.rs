//! Fused optimizer updates on plain slices, one pass per tensor: the CPU twins of the CUDA fused
//! kernels. The per-step scalars are computed once on the host (in f64, as PyTorch computes its
//! Python-float hyper-parameters) and the element loop is the same arithmetic, in the same order,
//! as torch.optim's single-tensor path, so a run can be compared with PyTorch step by step.

use crate::kernel_args::{AdamScalars, SgdScalars};

/// One Adam/AdamW step in place: decay, both moments, bias-corrected update.
/// All four slices have the same length (checked by the caller).
pub fn adam_step(param: &mut [f32], grad: &[f32], exp_avg: &mut [f32], exp_avg_sq: &mut [f32], s: &AdamScalars) {
    debug_assert!(param.len() == grad.len() && param.len() == exp_avg.len() && param.len() == exp_avg_sq.len());
    // PyTorch skips each decay when its coefficient is 0; skipping keeps a non-finite parameter
    // from turning a finite gradient into NaN through 0 * inf.
    let coupled = s.grad_decay != 0.0;
    let decoupled = s.param_scale != 1.0;
    let w = s.one_minus_beta1;
    let neg_step = -s.step_size;
    for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(exp_avg.iter_mut()).zip(exp_avg_sq.iter_mut()) {
        if decoupled {
            *p *= s.param_scale;
        }
        let g = if coupled { g + s.grad_decay * *p } else { g };
        // torch.lerp's two-sided formula, so the first moment rounds as PyTorch's does.
        *m = if w.abs() < 0.5 { *m + w * (g - *m) } else { g - (g - *m) * (1.0 - w) };
        *v = *v * s.beta2 + s.one_minus_beta2 * g * g;
        let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
        *p += neg_step * *m / denom;
    }
}

/// One SGD step in place. `momentum_buf` is None when momentum is 0 (no state, as in PyTorch);
/// a buffer of zeros on the first step gives exactly PyTorch's `buf = grad.clone()`, since
/// dampening is 0.
pub fn sgd_step(param: &mut [f32], grad: &[f32], momentum_buf: Option<&mut [f32]>, s: &SgdScalars) {
    debug_assert_eq!(param.len(), grad.len());
    let decay = s.weight_decay != 0.0;
    let neg_lr = -s.lr;
    match momentum_buf {
        None => {
            for (p, &g) in param.iter_mut().zip(grad) {
                let g = if decay { g + s.weight_decay * *p } else { g };
                *p += neg_lr * g;
            }
        }
        Some(buf) => {
            debug_assert_eq!(param.len(), buf.len());
            for ((p, &g), b) in param.iter_mut().zip(grad).zip(buf.iter_mut()) {
                let g = if decay { g + s.weight_decay * *p } else { g };
                *b = *b * s.momentum + g;
                let d = if s.nesterov { g + s.momentum * *b } else { *b };
                *p += neg_lr * d;
            }
        }
    }
}

/// avg = decay * avg + (1 - decay) * value, in place.
pub fn ema_update(avg: &mut [f32], value: &[f32], decay: f32) {
    debug_assert_eq!(avg.len(), value.len());
    let take = 1.0 - decay;
    for (a, &v) in avg.iter_mut().zip(value) {
        *a = decay * *a + take * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_update_mixes() {
        let mut a = vec![1.0f32, -2.0, 0.0];
        ema_update(&mut a, &[3.0, 2.0, 10.0], 0.75);
        assert_eq!(a, vec![1.5, -1.0, 2.5]);
    }

    #[test]
    fn sgd_step_plain_and_momentum() {
        let s = SgdScalars { lr: 0.5, momentum: 0.5, weight_decay: 0.0, nesterov: false };
        let mut p = vec![1.0f32, 2.0];
        sgd_step(&mut p, &[1.0, -1.0], None, &s);
        assert_eq!(p, vec![0.5, 2.5]);
        let mut p = vec![1.0f32, 2.0];
        let mut b = vec![0.0f32; 2];
        sgd_step(&mut p, &[1.0, -1.0], Some(&mut b), &s);
        assert_eq!(b, vec![1.0, -1.0]);
        sgd_step(&mut p, &[1.0, -1.0], Some(&mut b), &s);
        // buf = 0.5 * 1 + 1 = 1.5; p = 0.5 - 0.5 * 1.5
        assert_eq!(b, vec![1.5, -1.5]);
        assert_eq!(p, vec![-0.25, 3.25]);
    }

    #[test]
    fn adam_first_step_moves_by_lr() {
        // On step 1 the bias-corrected update is lr * g / (|g| + eps') = lr * sign(g).
        let s = AdamScalars::new(0.01, 0.9, 0.999, 1e-8, 0.0, false, 1);
        let mut p = vec![1.0f32, 1.0];
        let (mut m, mut v) = (vec![0.0f32; 2], vec![0.0f32; 2]);
        adam_step(&mut p, &[3.0, -0.5], &mut m, &mut v, &s);
        assert!((p[0] - 0.99).abs() < 1e-6 && (p[1] - 1.01).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn adamw_scalars_decay_the_parameter_only() {
        let s = AdamScalars::new(0.1, 0.9, 0.999, 1e-8, 0.5, true, 1);
        assert_eq!((s.param_scale, s.grad_decay), (0.95, 0.0));
        let s = AdamScalars::new(0.1, 0.9, 0.999, 1e-8, 0.5, false, 1);
        assert_eq!((s.param_scale, s.grad_decay), (1.0, 0.5));
    }
}
