//! A GPU-resident training step: outside logging and evaluation, one step of `supervised`,
//! `muscle` and `mixmatch-muscle` copies to the device once (the batch: every view's images, the
//! labels and MixUp's permutation) and back once (the packed loss terms), counted by the device
//! layer.

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
        unlabeled_labels: (0..nu).map(|i| i % 10).collect(),
    }
}

fn new_trainer(method: Method, device: Device) -> Trainer {
    trainer_for(&TrainConfig { method, device, ..TrainConfig::DEFAULT })
}

fn trainer_for(cfg: &TrainConfig) -> Trainer {
    let device = cfg.device;
    let spec = ModelSpec { kind: ModelKind::ConvNet { width: 8 }, in_channels: 1, height: 28, width: 28, classes: 10 };
    let mut model = Model::new(spec, 3).expect("model");
    model.to_device(device).expect("to device");
    Trainer::new(cfg, model).expect("trainer")
}

/// The transfers of step 1 (after step 0 has made every lasting buffer); step 0's loss terms
/// are checked against the same step on the CPU (the batch and its labels arrived intact).
fn step_transfers(method: Method) -> muscle::cuda::Transfers {
    let mut trainer = new_trainer(method, Device::Cuda(0));
    let on_gpu = trainer.step(&batch(0, 8, 16), 0).expect("step 0");
    let on_cpu = new_trainer(method, Device::Cpu).step(&batch(0, 8, 16), 0).expect("cpu step 0");
    for (what, g, c) in [
        ("loss", on_gpu.loss, on_cpu.loss),
        ("sup", on_gpu.sup, on_cpu.sup),
        ("mi", on_gpu.mi, on_cpu.mi),
        ("host", on_gpu.host, on_cpu.host),
    ] {
        assert!((g - c).abs() <= 1e-4 * c.abs().max(1.0), "{method} step 0 {what}: gpu {g} vs cpu {c}");
    }
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
        for method in [Method::Supervised, Method::Muscle, Method::MixMatchMuscle, Method::FixMatchMuscle] {
            let t = step_transfers(method);
            assert_eq!((t.h2d, t.d2h), (1, 1), "{method}: host-to-device and device-to-host copies per step: {t:?}");
            assert!(t.d2h_bytes <= 64, "{method}: {} bytes downloaded per step (at most 64)", t.d2h_bytes);
        }
    });
}

#[test]
fn fixmatch_pseudo_label_statistics_match_the_cpu() {
    with_gpu("fixmatch_pseudo_label_statistics_match_the_cpu", |_| {
        // A threshold an untrained model's largest probabilities straddle (0.14 keeps every row
        // here, 0.2 none), so the mask is neither all nor none: 0.72 of the rows were kept.
        let cfg = |device| TrainConfig { method: Method::FixMatchMuscle, tau: 0.16, device, ..TrainConfig::DEFAULT };
        let (mut gpu, mut cpu) = (trainer_for(&cfg(Device::Cuda(0))), trainer_for(&cfg(Device::Cpu)));
        for step in 0..2 {
            let (g, c) =
                (gpu.step(&batch(step, 8, 16), step).expect("gpu"), cpu.step(&batch(step, 8, 16), step).expect("cpu"));
            assert!(
                (g.host - c.host).abs() <= 1e-4 * c.host.abs().max(1.0),
                "step {step} L_U: gpu {} vs cpu {}",
                g.host,
                c.host
            );
        }
        let g = gpu.take_pseudo_label_stats().expect("gpu stats").expect("some");
        let c = cpu.take_pseudo_label_stats().expect("cpu stats").expect("some");
        assert!(c.mask_rate > 0.0 && c.mask_rate < 1.0, "mask rate {} proves nothing", c.mask_rate);
        assert_eq!(g, c, "pseudo-label statistics");
        assert_eq!(gpu.take_pseudo_label_stats().expect("again"), None, "the sums restart after a read");
    });
}
