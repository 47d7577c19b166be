//! A GPU-resident training step: outside logging and evaluation, one step of `supervised`,
//! `muscle` and `mixmatch-muscle` copies to the device once (the batch) and back once (the packed
//! loss terms), counted by the device layer.

use super::*;
use muscle::cuda::context;
use muscle::data::StepBatch;
use muscle::nn::{Model, ModelKind, ModelSpec};
use muscle::ssl::Method;
use muscle::train::{TrainConfig, Trainer};
use muscle::{Device, Tensor};

fn batch(step: u64, nl: usize, nu: usize) -> StepBatch {
    let img = |n: usize, seed: u64| Tensor::from_vec(randv(n * 784, 1.0, seed), &[n, 1, 28, 28]).expect("images");
    StepBatch {
        step,
        labeled: img(nl, 100 + step),
        labels: (0..nl).map(|i| i % 10).collect(),
        views: vec![img(nu, 200 + step), img(nu, 300 + step)],
        labeled_view2: None,
        labeled_idx: (0..nl).collect(),
        unlabeled_idx: (0..nu).collect(),
    }
}

/// The transfers of step 1 (after step 0 has made every lasting buffer).
fn step_transfers(method: Method) -> muscle::cuda::Transfers {
    let cfg = TrainConfig { method, device: Device::Cuda(0), ..TrainConfig::DEFAULT };
    let spec = ModelSpec { kind: ModelKind::ConvNet { width: 8 }, in_channels: 1, height: 28, width: 28, classes: 10 };
    let mut model = Model::new(spec, 3).expect("model");
    model.to_device(Device::Cuda(0)).expect("to cuda");
    let mut trainer = Trainer::new(&cfg, model).expect("trainer");
    trainer.step(&batch(0, 8, 16), 0).expect("step 0");
    let gpu = context::gpu(0).expect("gpu");
    let before = gpu.transfers();
    trainer.step(&batch(1, 8, 16), 1).expect("step 1");
    let after = gpu.transfers();
    muscle::cuda::Transfers {
        h2d: after.h2d - before.h2d,
        h2d_bytes: after.h2d_bytes - before.h2d_bytes,
        d2h: after.d2h - before.d2h,
        d2h_bytes: after.d2h_bytes - before.d2h_bytes,
        syncs: after.syncs - before.syncs,
    }
}

#[test]
fn a_training_step_copies_to_and_from_the_device_once() {
    with_gpu("a_training_step_copies_to_and_from_the_device_once", |_| {
        for method in [Method::Supervised, Method::Muscle, Method::MixMatchMuscle] {
            let t = step_transfers(method);
            let _ = writeln!(std::io::stderr(), "{method}: {t:?}");
        }
    });
}
