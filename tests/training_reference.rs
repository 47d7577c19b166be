//! A few MUSCLE training steps against PyTorch: the fixture from scripts/training-reference-torch.py
//! runs METHOD.md's recipe (the PyTorch peer's convnet and IIC loss) on batches this test rebuilds
//! exactly from the embedded Fashion-MNIST subset, from the same initial weights. It checks what
//! the per-op tests cannot: the objective's composition over one batch-norm forward of
//! [labeled, view 1, view 2], the MI term's gradient through the whole network, and the optimizer,
//! schedule, ramp and EMA over a trajectory.

use muscle::data::{self, StepBatch};
use muscle::nn::{ForwardCtx, Model, ModelKind, ModelSpec, Module};
use muscle::ssl::{step_loss, Method, ObjectiveConfig};
use muscle::train::{TrainConfig, Trainer};
use muscle::{ops, Tape, Tensor};

use crate::common::{assert_summary, assert_summary_tol};

const MEAN: f32 = 0.2860;
const STD: f32 = 0.3530;
const PAD: usize = 2;
const SIDE: usize = 28;

fn fixture() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/training/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("reference.json")).expect("json")
}

fn get(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("fixture: no number '{key}'"))
}

/// `hashed_uniform` of the script: numbers in [-1, 1) from a splitmix64-style hash of (rank, index).
fn hashed_uniform(rank: usize, n: usize) -> Vec<f64> {
    (0..n as u64)
        .map(|i| {
            let mut x = (i + 1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add((rank as u64 + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9));
            x ^= x >> 31;
            x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 29;
            2.0 * (x >> 11) as f64 / (1u64 << 53) as f64 - 1.0
        })
        .collect()
}

/// The script's `init`: kernels and the dense bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)) through the
/// hash of the tensor's rank among the sorted state_dict names; BN tensors keep their defaults.
fn initial_model() -> Model {
    let spec =
        ModelSpec { kind: ModelKind::ConvNet { width: 32 }, in_channels: 1, height: SIDE, width: SIDE, classes: 10 };
    let mut m = Model::new(spec, 0).expect("convnet");
    let mut names = Vec::new();
    m.visit(&mut |n, _, _| names.push(n.to_string()));
    names.sort();
    let fc_fan_in = 128.0f64;
    m.visit_mut(&mut |n, _, t| {
        let rank = names.iter().position(|s| s == n).expect("name");
        let fan_in = if n.starts_with("fc.") {
            fc_fan_in
        } else if t.shape().len() > 1 {
            t.shape()[1..].iter().product::<usize>() as f64
        } else {
            return;
        };
        let v: Vec<f32> = hashed_uniform(rank, t.numel()).iter().map(|u| (u / fan_in.sqrt()) as f32).collect();
        t.data_mut().expect("cpu").copy_from_slice(&v);
    });
    m
}

/// The script's crop offsets and flip of image `i` of step `k`, view `v` (0 labeled, 1, 2).
fn draw(k: usize, i: usize, v: usize) -> (usize, usize, bool) {
    ((k + 3 * i + 2 * v) % 5, (2 * k + i + 3 * v + 1) % 5, (i + k + v) % 2 == 1)
}

/// Images `idx` of `ds` padded with zeros, cropped and flipped as `draw` says, then normalised.
fn render(ds: &data::Dataset, idx: &[usize], k: usize, v: usize) -> Tensor {
    let mut out = Vec::with_capacity(idx.len() * SIDE * SIDE);
    for (i, &img) in idx.iter().enumerate() {
        let px = &ds.images[img * SIDE * SIDE..(img + 1) * SIDE * SIDE];
        let (dy, dx, flip) = draw(k, i, v);
        for y in 0..SIDE {
            for x in 0..SIDE {
                let (sy, sx) = (y + dy, if flip { SIDE - 1 - x } else { x } + dx);
                let inside = (PAD..PAD + SIDE).contains(&sy) && (PAD..PAD + SIDE).contains(&sx);
                let raw = if inside { px[(sy - PAD) * SIDE + sx - PAD] } else { 0 };
                out.push((raw as f32 / 255.0 - MEAN) / STD);
            }
        }
    }
    Tensor::from_vec(out, &[idx.len(), 1, SIDE, SIDE]).expect("batch")
}

/// The script's batch of step `k`: labeled and unlabeled indices by formula, views by `draw`.
fn batch(ds: &data::Dataset, k: usize, b: usize, u: usize) -> StepBatch {
    let li: Vec<usize> = (0..b).map(|j| (7919 * (k * b + j) + 11) % 10000).collect();
    let ui: Vec<usize> = (0..u).map(|i| (104729 * (k * u + i) + 5) % 10000).collect();
    StepBatch {
        step: k as u64,
        labeled: render(ds, &li, k, 0),
        labels: li.iter().map(|&i| ds.labels[i] as usize).collect(),
        views: vec![render(ds, &ui, k, 1), render(ds, &ui, k, 2)],
        labeled_view2: None,
        labeled_idx: li,
        unlabeled_labels: ui.iter().map(|&i| ds.labels[i] as usize).collect(),
        unlabeled_idx: ui,
    }
}

fn objective(ramp_steps: u64) -> ObjectiveConfig {
    ObjectiveConfig {
        method: Method::Muscle,
        w_mi: 1.0,
        lambda: 1.0,
        ramp_steps,
        mi_labeled: false,
        w_u: 0.0,
        tau: 0.95,
        world: muscle::dist::world(),
        sync_bn: false,
        precision: Default::default(),
        temperature: 0.5,
        mixup_alpha: 0.75,
    }
}

fn assert_close(what: &str, got: f64, want: f64, rel: f64) {
    assert!((got - want).abs() <= rel * want.abs().max(1e-3), "{what}: {got} vs PyTorch {want}");
}

#[test]
fn the_muscle_objective_and_its_gradients_match_pytorch() {
    let fx = fixture();
    let (b, u) = (get(&fx, "batch") as usize, get(&fx, "unlabeled_batch") as usize);
    let first = &fx["first_gradient"];
    let train = data::embedded().expect("embedded data").train;
    let sb = batch(&train, 0, b, u);
    let mut model = initial_model();
    model.visit_mut(&mut |n, _, t| {
        if n == "fc.weight" {
            t.data_mut().expect("cpu").iter_mut().for_each(|w| *w *= get(first, "fc_scale") as f32);
        }
    });
    let probe = model.clone();

    // L_sup + L_mi through the engine's objective (ramp finished).
    let tape = Tape::new();
    let terms = step_loss(&objective(0), &mut model, &tape, &sb, 0, 0).expect("loss");
    assert_close("L_mi", terms.values().expect("values").mi as f64, get(first, "mi"), 1e-3);
    assert_close("L_sup + L_mi", terms.total.item().expect("loss") as f64, get(first, "total"), 1e-5);
    let grads = tape.backward(&terms.total).expect("backward");
    let mut checked = 0;
    model.visit(&mut |n, r, t| {
        if r.is_trainable() {
            let g = grads.get(t).unwrap_or_else(|| panic!("no gradient for {n}"));
            assert_summary(
                &format!("grad of L_sup + L_mi: {n}"),
                &g.to_vec().expect("cpu"),
                &first["grads_total"][n],
                5e-3,
            );
            checked += 1;
        }
    });
    assert_eq!(checked, first["grads_total"].as_object().expect("grads").len());

    // L_mi alone: its gradient through the network, from the same weights.
    let mut model = probe;
    let tape = Tape::new();
    let x = ops::concat_rows(&tape, &[&sb.labeled, &sb.views[0], &sb.views[1]]).expect("concat");
    let logits = model.forward(&tape, &x, &ForwardCtx::train(0, 0)).expect("forward");
    let za = ops::narrow_rows(&tape, &logits, b, u).expect("view 1");
    let zb = ops::narrow_rows(&tape, &logits, b + u, u).expect("view 2");
    let mi = ops::mutual_info_loss(&tape, &za, &zb, 1.0).expect("mi");
    let grads = tape.backward(&mi).expect("backward");
    model.visit(&mut |n, r, t| {
        if r.is_trainable() {
            let g = grads.get(t).unwrap_or_else(|| panic!("no MI gradient for {n}"));
            assert_summary(&format!("grad of L_mi: {n}"), &g.to_vec().expect("cpu"), &first["grads_mi"][n], 5e-3);
        }
    });
}

#[test]
fn a_muscle_training_trajectory_matches_pytorch() {
    let fx = fixture();
    let (b, u) = (get(&fx, "batch") as usize, get(&fx, "unlabeled_batch") as usize);
    let steps = get(&fx, "steps") as u64;
    let cfg = TrainConfig {
        steps,
        batch: Some(b),
        unlabeled_batch: Some(u),
        lr: Some(get(&fx, "lr") as f32),
        weight_decay: Some(get(&fx, "weight_decay") as f32),
        w_mi: get(&fx, "w_mi") as f32,
        threads: Some(2),
        ..TrainConfig::default()
    };
    assert_eq!(cfg.ramp_steps(), get(&fx, "ramp_steps") as u64, "the fixture's ramp is the config's");
    let train = data::embedded().expect("embedded data");
    let mut trainer = Trainer::new(&cfg, initial_model()).expect("trainer");
    let trajectory = fx["trajectory"].as_array().expect("trajectory");
    for (k, want) in trajectory.iter().enumerate() {
        let s = trainer.step(&batch(&train.train, k, b, u), k as u64).expect("step");
        assert_close(&format!("step {k}: lr"), s.lr as f64, get(want, "lr"), 1e-6);
        assert_close(&format!("step {k}: w_mi"), s.w_mi as f64, get(want, "w_mi"), 1e-6);
        assert_close(&format!("step {k}: L_sup"), s.sup as f64, get(want, "sup"), 1e-3);
        assert_close(&format!("step {k}: L_mi"), s.mi as f64, get(want, "mi"), 1e-2);
        assert_close(&format!("step {k}: loss"), s.loss as f64, get(want, "loss"), 1e-3);
    }

    let mut ema_model = trainer.model.clone();
    trainer.ema.apply_to(&mut ema_model).expect("EMA");
    let x = Tensor::from_vec(
        (0..get(&fx, "eval_images") as usize)
            .flat_map(|i| train.test.images[i * SIDE * SIDE..(i + 1) * SIDE * SIDE].to_vec())
            .map(|p| (p as f32 / 255.0 - MEAN) / STD)
            .collect(),
        &[get(&fx, "eval_images") as usize, 1, SIDE, SIDE],
    )
    .expect("test images");
    for (what, model) in [("trained", &mut trainer.model), ("ema", &mut ema_model)] {
        let want = &fx[what];
        let mut checked = 0;
        model.visit(&mut |n, _, t| {
            let Some(w) = want["tensors"].get(n) else { return };
            // Adam moves every element by about lr whatever its gradient's size, so rounding noise
            // in a near-zero gradient (the BN shifts': sums over the batch that nearly cancel)
            // becomes an lr-sized difference, which the BN statistics then carry. The kernels and
            // BN scales stay within float noise; a wrong weight decay (0.5 here: 1e-3 of each
            // weight per step) would show in their sums of squares.
            let leaf = n.rsplit('.').next().unwrap_or(n);
            let (sumsq_rel, entry_rel) = match (leaf, t.shape().len()) {
                ("bias" | "running_mean" | "running_var", 1) => (3e-2, 1.5e-1),
                _ => (2e-4, 1e-2),
            };
            let v = t.to_vec().expect("cpu");
            assert_summary_tol(&format!("{what}: {n} after {steps} steps"), &v, w, sumsq_rel, entry_rel);
            checked += 1;
        });
        assert_eq!(checked, want["tensors"].as_object().expect("tensors").len(), "{what}: tensors checked");
        let logits = model.forward(&Tape::no_grad(), &x, &ForwardCtx::eval()).expect("eval").to_vec().expect("cpu");
        let want_logits = want["logits_eval"].as_array().expect("logits");
        let scale = want_logits.iter().fold(1.0f64, |m, v| m.max(v.as_f64().expect("f").abs()));
        for (i, (g, w)) in logits.iter().zip(want_logits).enumerate() {
            let w = w.as_f64().expect("f");
            assert!((*g as f64 - w).abs() <= 2e-3 * scale, "{what}: eval logit {i}: {g} vs PyTorch {w}");
        }
    }
}
