//! The tensor ops on CUDA tensors: one MUSCLE-style step of a real model on both devices.

use super::*;
use muscle::{Tape, Tensor};

// The tensor ops on CUDA tensors: one MUSCLE-style step of a real model on both devices.

/// What one step produced: logits, loss, and per tensor (name, gradient or buffer value).
type StepOutputs = (Vec<f32>, f32, Vec<(String, Vec<f32>)>);

/// Logits, loss, every parameter's gradient and the BN running estimates after one training
/// forward + backward of `model` (CE on rows 16.., IIC between rows 0..8 and 8..16).
fn one_step(model: &mut muscle::nn::Model, x: &Tensor) -> StepOutputs {
    use muscle::nn::{ForwardCtx, Module};
    use muscle::ops;
    let tape = Tape::new();
    let logits = model.forward(&tape, x, &ForwardCtx::train(7, 3)).expect("forward");
    let a = ops::narrow_rows(&tape, &logits, 0, 8).expect("narrow");
    let b = ops::narrow_rows(&tape, &logits, 8, 8).expect("narrow");
    let l = ops::narrow_rows(&tape, &logits, 16, 8).expect("narrow");
    let ce = ops::cross_entropy(&tape, &l, &[0, 1, 2, 3, 4, 5, 6, 7]).expect("ce");
    let mi = ops::mutual_info_loss(&tape, &a, &b, 1.0).expect("mi");
    let loss = ops::add(&tape, &ce, &ops::scale(&tape, &mi, 0.5).expect("scale")).expect("add");
    let value = loss.item().expect("item");
    let grads = tape.backward(&loss).expect("backward");
    let mut out = Vec::new();
    model.visit(&mut |name, role, t| {
        let v = if role.is_trainable() { grads.get(t).expect("a gradient").to_vec() } else { t.to_vec() };
        out.push((name.to_string(), v.expect("to_vec")));
    });
    (logits.to_vec().expect("logits"), value, out)
}

#[test]
fn a_training_step_on_the_gpu_matches_the_cpu() {
    use muscle::nn::{ForwardCtx, Model, ModelKind, ModelSpec};
    use muscle::Device;
    with_gpu("a_training_step_on_the_gpu_matches_the_cpu", |_| {
        let spec =
            ModelSpec { kind: ModelKind::ConvNet { width: 8 }, in_channels: 1, height: 28, width: 28, classes: 10 };
        let mut on_cpu = Model::new(spec, 3).expect("model");
        let mut on_gpu = on_cpu.clone();
        on_gpu.to_device(Device::Cuda(0)).expect("to cuda");
        let x = Tensor::from_vec(randv(24 * 784, 1.0, 31), &[24, 1, 28, 28]).expect("x");
        let (lc, vc, gc) = one_step(&mut on_cpu, &x);
        let (lg, vg, gg) = one_step(&mut on_gpu, &x);
        // Convolutions and reductions sum in other orders on the GPU: relative tolerances.
        assert_scaled("logits", &lg, &lc, 1e-4);
        assert!((vg - vc).abs() <= 1e-4 * vc.abs().max(1.0), "loss: gpu {vg} vs cpu {vc}");
        for ((name, g), (_, c)) in gg.iter().zip(&gc) {
            assert_scaled(name, g, c, 2e-3);
        }
        // Evaluation mode after the running estimates moved.
        let t = Tape::no_grad();
        let ec = on_cpu.forward(&t, &x, &ForwardCtx::eval()).and_then(|y| y.to_vec()).expect("eval cpu");
        let eg = on_gpu.forward(&t, &x, &ForwardCtx::eval()).and_then(|y| y.to_vec()).expect("eval gpu");
        assert_scaled("eval logits", &eg, &ec, 1e-4);
    });
}
