//! The tape and the optimizers really learn.

use muscle::nn::{ForwardCtx, Model, ModelKind, ModelSpec};
use muscle::optim::{Adam, AdamConfig, Optimizer};
use muscle::rng::Rng;
use muscle::testing::randn;
use muscle::train::argmax_rows;
use muscle::{ops, Tape};

#[test]
fn convnet_memorises_random_labels() {
    // 64 random images with random labels: only a working backward and optimizer can fit them.
    let spec = ModelSpec { kind: ModelKind::ConvNet { width: 32 }, in_channels: 1, height: 28, width: 28, classes: 10 };
    let mut model = Model::new(spec, 3).expect("model");
    let x = randn(&[64, 1, 28, 28], 4);
    let mut r = Rng::new(5, 0);
    let labels: Vec<usize> = (0..64).map(|_| r.below(10) as usize).collect();
    let mut opt = Adam::new(AdamConfig::adam(2e-3)).expect("adam");
    let mut accuracy = 0.0;
    let mut steps = 0;
    for step in 0..300 {
        let tape = Tape::new();
        let logits = model.forward(&tape, &x, &ForwardCtx::train(0, step)).expect("forward");
        let loss = ops::cross_entropy(&tape, &logits, &labels).expect("loss");
        let grads = tape.backward(&loss).expect("backward");
        opt.step(&mut model, &grads, 2e-3).expect("step");
        steps = step + 1;
        if step % 10 == 9 {
            let logits = model.forward(&Tape::no_grad(), &x, &ForwardCtx::train(0, step)).expect("eval");
            let pred = argmax_rows(logits.data().expect("cpu"), 10);
            accuracy = pred.iter().zip(&labels).filter(|(p, y)| p == y).count() as f64 / 64.0;
            if accuracy >= 0.99 {
                break;
            }
        }
    }
    assert!(accuracy >= 0.99, "training accuracy {accuracy} after {steps} steps");
    println!("memorised 64 random labels in {steps} Adam steps");
}
