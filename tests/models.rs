//! Model definitions: parameter counts, PyTorch names, and BN bookkeeping.

use muscle::nn::{ForwardCtx, Model, ModelKind, ModelSpec, Module, Role};
use muscle::testing::randn;
use muscle::Tape;

use crate::common::assert_summary;

fn spec(kind: ModelKind, c: usize, hw: usize) -> ModelSpec {
    ModelSpec { kind, in_channels: c, height: hw, width: hw, classes: 10 }
}

fn names(m: &Model) -> Vec<String> {
    let mut v = Vec::new();
    m.visit(&mut |n, _, _| v.push(n.to_string()));
    v
}

#[test]
fn parameter_counts_match_the_pytorch_definitions() {
    let convnet = Model::new(spec(ModelKind::ConvNet { width: 32 }, 1, 28), 0).expect("convnet");
    assert_eq!(convnet.num_parameters(), 140_458);
    let wrn = Model::new(spec(ModelKind::Wrn28x2, 3, 32), 0).expect("wrn");
    assert_eq!(wrn.num_parameters(), 1_467_610);
    // CNN-13 without weight norm or conv biases, counted by hand from its layer list.
    let cnn13 = Model::new(spec(ModelKind::Cnn13, 3, 32), 0).expect("cnn13");
    assert_eq!(cnn13.num_parameters(), 3_121_802);
}

#[test]
fn state_dict_names_follow_pytorch() {
    let convnet = Model::new(spec(ModelKind::ConvNet { width: 32 }, 1, 28), 0).expect("convnet");
    let n = names(&convnet);
    assert_eq!(
        &n[..6],
        [
            "features.0.weight",
            "features.1.weight",
            "features.1.bias",
            "features.1.running_mean",
            "features.1.running_var",
            "features.1.num_batches_tracked"
        ]
    );
    for want in [
        "features.3.weight",
        "features.7.weight",
        "features.10.weight",
        "features.14.weight",
        "features.15.running_var",
    ] {
        assert!(n.iter().any(|x| x == want), "missing {want}");
    }
    assert_eq!(&n[n.len() - 2..], ["fc.weight", "fc.bias"]);
    assert_eq!(n.len(), 5 * 6 + 2);

    let wrn = Model::new(spec(ModelKind::Wrn28x2, 3, 32), 0).expect("wrn");
    let n = names(&wrn);
    assert_eq!(n[0], "conv1.weight");
    assert_eq!(n[1], "block1.layer.0.bn1.weight");
    for want in [
        "block1.layer.0.convShortcut.weight",
        "block2.layer.0.convShortcut.weight",
        "block3.layer.3.conv2.weight",
        "block3.layer.0.bn1.running_mean",
        "bn1.num_batches_tracked",
    ] {
        assert!(n.iter().any(|x| x == want), "missing {want}");
    }
    assert!(!n.iter().any(|x| x == "block1.layer.1.convShortcut.weight"));
    assert_eq!(&n[n.len() - 2..], ["fc.weight", "fc.bias"]);

    let cnn13 = Model::new(spec(ModelKind::Cnn13, 3, 32), 0).expect("cnn13");
    let n = names(&cnn13);
    for want in [
        "features.0.weight",
        "features.11.weight",
        "features.22.weight",
        "features.28.weight",
        "features.29.running_mean",
    ] {
        assert!(n.iter().any(|x| x == want), "missing {want}");
    }
}

#[test]
fn init_follows_pytorch_defaults_and_is_seeded() {
    let a = Model::new(spec(ModelKind::ConvNet { width: 8 }, 1, 28), 1).expect("model");
    let b = Model::new(spec(ModelKind::ConvNet { width: 8 }, 1, 28), 1).expect("model");
    let c = Model::new(spec(ModelKind::ConvNet { width: 8 }, 1, 28), 2).expect("model");
    let first = |m: &Model| {
        let mut v = Vec::new();
        m.visit(&mut |n, _, t| {
            if n == "features.3.weight" {
                v = t.to_vec().expect("cpu")
            }
        });
        v
    };
    assert_eq!(first(&a), first(&b));
    assert_ne!(first(&a), first(&c));
    // kaiming_uniform(a = sqrt 5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 8 * 9.
    let w = first(&a);
    let bound = 1.0 / (72f32).sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound));
    let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
    assert!((var - bound * bound / 3.0).abs() < 0.15 * bound * bound / 3.0, "variance {var}");
}

#[test]
fn batch_norm_updates_running_statistics_only_in_training() {
    let mut m = Model::new(spec(ModelKind::ConvNet { width: 4 }, 1, 8), 0).expect("model");
    let x = randn(&[6, 1, 8, 8], 3);
    let stats = |m: &Model| {
        let mut v = Vec::new();
        m.visit(&mut |_, r, t| {
            if matches!(r, Role::RunningMean | Role::RunningVar | Role::NumBatchesTracked) {
                v.extend(t.to_vec().expect("cpu"))
            }
        });
        v
    };
    let before = stats(&m);
    m.forward(&Tape::no_grad(), &x, &ForwardCtx::eval()).expect("eval");
    assert_eq!(before, stats(&m));
    m.forward(&Tape::new(), &x, &ForwardCtx::train(0, 0)).expect("train");
    let after = stats(&m);
    assert_ne!(before, after);
    // First BN: running_mean = 0.9 * 0 + 0.1 * batch mean of conv output; counter = 1.
    let mut counter = 0.0;
    m.visit(&mut |n, _, t| {
        if n == "features.1.num_batches_tracked" {
            counter = t.item().expect("scalar")
        }
    });
    assert_eq!(counter, 1.0);
}

#[test]
fn every_model_runs_forward_and_backward() {
    for (kind, c, hw) in
        [(ModelKind::ConvNet { width: 4 }, 1, 28), (ModelKind::Wrn28x2, 3, 32), (ModelKind::Cnn13, 3, 32)]
    {
        let mut m = Model::new(spec(kind, c, hw), 0).expect("model");
        let tape = Tape::new();
        let logits = m.forward(&tape, &randn(&[2, c, hw, hw], 1), &ForwardCtx::train(0, 0)).expect("forward");
        assert_eq!(logits.shape(), [2, 10]);
        let loss = muscle::ops::cross_entropy(&tape, &logits, &[1, 7]).expect("loss");
        let grads = tape.backward(&loss).expect("backward");
        let mut missing = Vec::new();
        m.visit(&mut |n, r, t| {
            // The dead bn1 of the WRN's width-changing blocks gets no gradient, by design.
            let dead = n.starts_with("block2.layer.0.bn1") || n.starts_with("block3.layer.0.bn1");
            if r.is_trainable() && !dead && grads.get(t).is_none() {
                missing.push(n.to_string())
            }
        });
        assert!(missing.is_empty(), "{kind}: no gradient for {missing:?}");
    }
}

/// `value` of scripts/model-reference-torch.py: the fixture's weights, a formula of the tensor's
/// rank among the sorted state_dict names and of the element index.
fn fixture_value(name: &str, rank: usize, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let leaf = name.rsplit('.').next().unwrap_or(name);
    (0..n)
        .map(|i| {
            let s = fixture_uniform(rank, i);
            let v = match leaf {
                "running_var" => 1.0 + 0.5 * s.abs(),
                "running_mean" | "bias" => 0.1 * s,
                "num_batches_tracked" => 0.0,
                _ if shape.len() == 1 => 1.0 + 0.2 * s,
                _ => s / ((n / shape[0]) as f64).sqrt(),
            };
            v as f32
        })
        .collect()
}

/// The fixture's number in [-1, 1) for element `i` of the tensor of sorted rank `rank`
/// (splitmix64's finaliser; `uniform` in scripts/model-reference-torch.py).
fn fixture_uniform(rank: usize, i: usize) -> f64 {
    let mut h = (i as u64)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((rank as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    h ^= h >> 31;
    h = h.wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^= h >> 29;
    (h >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

fn assert_logits(what: &str, got: &[f32], want: &serde_json::Value) {
    let want: Vec<f64> = want.as_array().expect("logits").iter().map(|v| v.as_f64().expect("f")).collect();
    assert_eq!(got.len(), want.len(), "{what}: logit count");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (k, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((*g as f64 - w).abs() <= 1e-4 * scale, "{what}: logit {k}: {g} vs PyTorch {w}");
    }
}

#[test]
fn forward_backward_and_bn_statistics_match_pytorch() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/reference.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("reference.json")).expect("json");
    let batch = fixture["batch"].as_u64().expect("batch") as usize;
    let cases = fixture["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 3);
    for case in cases {
        let name = case["model"].as_str().expect("model");
        let (kind, c, side) = match name {
            "convnet-8" => (ModelKind::ConvNet { width: 8 }, 1, 28),
            "wrn-28-2" => (ModelKind::Wrn28x2, 3, 32),
            "cnn13" => (ModelKind::Cnn13, 3, 32),
            other => panic!("unknown fixture model {other}"),
        };
        let mut m = Model::new(spec(kind, c, side), 0).expect("model");
        let mut sorted = names(&m);
        sorted.sort();
        m.visit_mut(&mut |n, _, t| {
            let rank = sorted.iter().position(|s| s == n).expect("name");
            let v = fixture_value(n, rank, t.shape());
            t.data_mut().expect("cpu").copy_from_slice(&v);
        });
        let count = batch * c * side * side;
        let xs: Vec<f32> = (0..count).map(|i| (1.5 * (0.013 * i as f64 + 0.5).sin()) as f32).collect();
        let x = muscle::Tensor::from_vec(xs, &[batch, c, side, side]).expect("input");
        let labels: Vec<usize> = (0..batch).map(|i| i % 10).collect();

        if case.get("logits_train").is_some() {
            let tape = Tape::new();
            let logits = m.forward(&tape, &x, &ForwardCtx::train(0, 0)).expect("forward");
            assert_logits(&format!("{name} train"), &logits.to_vec().expect("cpu"), &case["logits_train"]);
            let loss = muscle::ops::cross_entropy(&tape, &logits, &labels).expect("loss");
            let want = case["loss"].as_f64().expect("loss");
            assert!((loss.item().expect("loss") as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "{name}: loss");
            let grads = tape.backward(&loss).expect("backward");
            let (mut checked, mut buffers) = (0, 0);
            m.visit(&mut |n, r, t| {
                if r.is_trainable() {
                    if let Some(want) = case["grads"].get(n) {
                        let g = grads.get(t).unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
                        // Both convolution paths (direct, im2col + GEMM) land within 2e-4; PyTorch's
                        // own float32 gradients are within 2e-6 of float64 on these weights.
                        assert_summary(&format!("{name}: grad {n}"), &g.to_vec().expect("cpu"), want, 1e-3);
                        checked += 1;
                    }
                } else if let Some(want) = case["buffers_after"].get(n) {
                    // The WRN's dead bn1 (its output unused) updates its statistics in PyTorch
                    // only: muscle skips that work (METHOD.md).
                    let dead = n.starts_with("block2.layer.0.bn1") || n.starts_with("block3.layer.0.bn1");
                    if !dead {
                        assert_summary(&format!("{name}: buffer {n}"), &t.to_vec().expect("cpu"), want, 1e-4);
                        buffers += 1;
                    }
                }
            });
            assert_eq!(checked, case["grads"].as_object().expect("grads").len(), "{name}: gradients checked");
            assert!(buffers > 0, "{name}: no buffers checked");
        }
        let logits = m.forward(&Tape::no_grad(), &x, &ForwardCtx::eval()).expect("eval forward");
        assert_logits(&format!("{name} eval"), &logits.to_vec().expect("cpu"), &case["logits_eval"]);
    }
}
