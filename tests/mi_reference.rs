//! `muscle mi` against PyTorch autograd in f64 (IIC's IID_losses.py), on vectors committed by
//! scripts/mi-reference-torch.py.

use muscle::npy::read_npy;
use muscle::train::checkpoint::{Checkpoint, Values};
use std::path::Path;
use std::process::Command;

#[test]
fn muscle_mi_matches_pytorch_autograd_in_f64() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mi");
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).expect("cases.json")).expect("json");
    let cases = cases["cases"].as_array().expect("cases");
    assert!(cases.len() >= 4);
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mi-{name}.safetensors"));
        let o = Command::new(env!("CARGO_BIN_EXE_muscle"))
            .env_remove("MUSCLE_CUDA_EMU")
            .arg("mi")
            .arg("--logits-a")
            .arg(dir.join(format!("{name}_a.npy")))
            .arg("--logits-b")
            .arg(dir.join(format!("{name}_b.npy")))
            .arg("--lambda")
            .arg(c["lambda"].as_f64().expect("lambda").to_string())
            .arg("--out")
            .arg(&out)
            .output()
            .expect("run");
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        let (loss, want) = (r["loss"].as_f64().expect("loss"), c["loss"].as_f64().expect("loss"));
        assert!((loss - want).abs() <= 1e-12, "{name}: loss {loss} vs torch {want}");
        let grads = Checkpoint::load(&out).expect("gradients");
        for g in ["grad_a", "grad_b"] {
            let want = read_npy(&dir.join(format!("{name}_{g}.npy"))).expect("npy");
            let Some(Values::F64(got)) = grads.get(g).map(|e| &e.values) else { panic!("{name}: no f64 {g}") };
            let scale = want.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            for (x, y) in got.iter().zip(&want.data) {
                assert!((x - y).abs() <= 1e-12 * scale.max(1e-3), "{name} {g}: {x} vs torch {y} (max {scale})");
            }
        }
    }
}
