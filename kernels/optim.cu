// Fused optimizer updates, one pass per tensor, in place. CPU twin: src/optim/cpu.rs, whose
// per-step scalars (AdamScalars, SgdScalars: computed once on the host in f64 as PyTorch computes
// its Python-float hyper-parameters) are passed as kernel arguments unchanged.
//
// Why fused: an unfused Adam step reads and writes the parameter and both moments several times
// (decay, lerp, square, sqrt, divide...); here each element is read once (p, g, m, v) and written
// once (p, m, v): 28 bytes per parameter, the minimum.
//
// Why __fmul_rn / __fadd_rn / __fdiv_rn / __fsqrt_rn everywhere: the compiler may contract a
// plain a * b + c into one FMA (one rounding instead of two), which Rust never does. These
// intrinsics are never contracted, so each kernel does the CPU's operations in the CPU's order
// with the CPU's roundings, and the result equals the CPU's bit for bit.
//
// Sources must compile with both nvcc and NVRTC: common.cuh is their only include (build.rs
// prepends it for NVRTC), and no host macros.

#include "common.cuh"

// adam_step_fwd_f32: one Adam/AdamW step (torch.optim single-tensor semantics):
//   p *= param_scale (AdamW, skipped when 1); g += grad_decay p (Adam's L2, skipped when 0);
//   m = lerp(m, g, 1 - beta1) with torch.lerp's two-sided formula;
//   v = v beta2 + (1 - beta2) g g;  p += -step_size m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
// Skipping a zero decay (as PyTorch does) keeps a non-finite parameter from turning a finite
// gradient into NaN through 0 * inf. Reads p, g, m, v; writes p, m, v.
extern "C" __global__ void adam_step_fwd_f32(float* __restrict__ param, const float* __restrict__ grad,
                                             float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq, long long n,
                                             float param_scale, float grad_decay, float one_minus_beta1, float beta2,
                                             float one_minus_beta2, float step_size, float bias_correction2_sqrt,
                                             float eps) {
    const bool coupled = grad_decay != 0.0f;
    const bool decoupled = param_scale != 1.0f;
    const float wgt = one_minus_beta1;
    const float neg_step = -step_size;
    GRID_STRIDE(i, n) {
        float p = param[i];
        if (decoupled) p = __fmul_rn(p, param_scale);
        float g = grad[i];
        if (coupled) g = __fadd_rn(g, __fmul_rn(grad_decay, p));
        float m = exp_avg[i];
        m = fabsf(wgt) < 0.5f ? __fadd_rn(m, __fmul_rn(wgt, __fsub_rn(g, m)))
                              : __fsub_rn(g, __fmul_rn(__fsub_rn(g, m), __fsub_rn(1.0f, wgt)));
        float v = exp_avg_sq[i];
        v = __fadd_rn(__fmul_rn(v, beta2), __fmul_rn(__fmul_rn(one_minus_beta2, g), g));
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bias_correction2_sqrt), eps);
        p = __fadd_rn(p, __fdiv_rn(__fmul_rn(neg_step, m), denom));
        param[i] = p;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
    }
}

// sgd_step_fwd_f32: SGD without momentum: g += weight_decay p (skipped when 0); p += -lr g.
// Reads p, g; writes p.
extern "C" __global__ void sgd_step_fwd_f32(float* __restrict__ param, const float* __restrict__ grad, long long n,
                                            float lr, float weight_decay) {
    const bool decay = weight_decay != 0.0f;
    const float neg_lr = -lr;
    GRID_STRIDE(i, n) {
        float p = param[i];
        float g = grad[i];
        if (decay) g = __fadd_rn(g, __fmul_rn(weight_decay, p));
        param[i] = __fadd_rn(p, __fmul_rn(neg_lr, g));
    }
}

// sgd_momentum_step_fwd_f32: SGD with momentum (dampening 0): buf = buf momentum + g;
// d = nesterov ? g + momentum buf : buf; p += -lr d. A zero buffer on the first step is exactly
// PyTorch's buf = grad.clone(). Reads p, g, buf; writes p, buf.
extern "C" __global__ void sgd_momentum_step_fwd_f32(float* __restrict__ param, const float* __restrict__ grad,
                                                     float* __restrict__ buf, long long n, float lr, float momentum,
                                                     float weight_decay, int nesterov) {
    const bool decay = weight_decay != 0.0f;
    const float neg_lr = -lr;
    GRID_STRIDE(i, n) {
        float p = param[i];
        float g = grad[i];
        if (decay) g = __fadd_rn(g, __fmul_rn(weight_decay, p));
        float b = __fadd_rn(__fmul_rn(buf[i], momentum), g);
        float d = nesterov ? __fadd_rn(g, __fmul_rn(momentum, b)) : b;
        buf[i] = b;
        param[i] = __fadd_rn(p, __fmul_rn(neg_lr, d));
    }
}

// ema_update_fwd_f32: avg = decay avg + (1 - decay) value, in place (the EMA of the weights).
// Reads avg, value; writes avg.
extern "C" __global__ void ema_update_fwd_f32(float* __restrict__ avg, const float* __restrict__ value, long long n,
                                              float decay) {
    const float take = __fsub_rn(1.0f, decay);
    GRID_STRIDE(i, n) { avg[i] = __fadd_rn(__fmul_rn(decay, avg[i]), __fmul_rn(take, value[i])); }
}
