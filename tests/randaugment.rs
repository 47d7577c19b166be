//! RandAugment's 14 operations and Cutout against Pillow's own output
//! (tests/fixtures/randaugment, written by scripts/randaugment-fixtures.py with Pillow 13.0.0):
//! three inputs (grey 28x28, colour 32x32, colour 24x40), every op at 1-3 magnitudes (both signs
//! for the geometric ops, factors near both ends), and Cutout at three centres and sides.
//!
//! Tolerance: none. Every op is required to match Pillow exactly, pixel for pixel. The LUT ops
//! (AutoContrast, Equalize, Solarize, Posterize) are integer or f64 rules Pillow computes the same
//! way; the blends (Color, Contrast, Brightness, Sharpness) repeat Pillow's float32 expressions in
//! its order (no fused multiply-add on either side), so they truncate alike; the geometric ops
//! follow Geometry.c's three sampling paths (16.16 fixed point for rotate and shear, pretabulated
//! doubles for translate), so even half-pixel ties floor alike. Measured: 0 differing values in all
//! 120 records (Pillow 13.0.0 on x86-64). The wrong-mapping test shows that a flipped sign or a
//! factor mapped as 1 + f does not match.

use muscle::data::randaugment::{apply, cutout, Op};
use std::path::Path;

struct Record {
    input: String,
    op: String,
    magnitude: f32,
    shape: (usize, usize, usize),
    pixels: Vec<u8>,
    centre: Option<(usize, usize)>,
}

fn records() -> Vec<Record> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/randaugment");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("index.json")).expect("index.json")).expect("json");
    let blob = std::fs::read(dir.join("images.bin")).expect("images.bin");
    assert_eq!(index["grey"], 127, "the fixtures' fill must be our GREY");
    let field = |r: &serde_json::Value, k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}")) as usize;
    index["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| {
            let (c, h, w) = (field(r, "c"), field(r, "h"), field(r, "w"));
            let at = field(r, "offset");
            Record {
                input: r["input"].as_str().expect("input").to_string(),
                op: r["op"].as_str().expect("op").to_string(),
                magnitude: r["magnitude"].as_f64().expect("magnitude") as f32,
                shape: (c, h, w),
                pixels: blob[at..at + c * h * w].to_vec(),
                centre: r.get("cy").map(|_| (field(r, "cy"), field(r, "cx"))),
            }
        })
        .collect()
}

fn input_of<'a>(all: &'a [Record], name: &str) -> &'a [u8] {
    &all.iter().find(|r| r.input == name && r.op == "input").expect("input record").pixels
}

/// Ours for record `r`, with `magnitude` in place of the record's.
fn ours(all: &[Record], r: &Record, magnitude: f32) -> Vec<u8> {
    let (c, h, w) = r.shape;
    let mut img = input_of(all, &r.input).to_vec();
    match r.centre {
        Some((cy, cx)) => cutout(&mut img, c, h, w, cy, cx, magnitude as usize).unwrap(),
        None => apply(r.op.parse().unwrap(), magnitude, &mut img, c, h, w).unwrap(),
    }
    img
}

/// How many values of `got` differ from `want` (the tolerance: none may).
fn differing(got: &[u8], want: &[u8]) -> usize {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).filter(|(a, b)| a != b).count()
}

#[test]
fn every_op_matches_pillow() {
    let all = records();
    let mut seen = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for r in all.iter().filter(|r| r.op != "input") {
        seen.insert(r.op.clone());
        let diff = differing(&ours(&all, r, r.magnitude), &r.pixels);
        if diff > 0 {
            failures.push(format!("{} {}({}): {diff} values differ", r.input, r.op, r.magnitude));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(seen.len(), 15, "every op and Cutout has fixtures: {seen:?}");
    assert!(Op::ALL.iter().all(|op| seen.contains(op.name())));
}

#[test]
fn a_wrong_magnitude_mapping_does_not_match() {
    let all = records();
    let wrong = |r: &Record| -> Option<f32> {
        match r.op.as_str() {
            "ShearX" | "ShearY" | "TranslateX" | "TranslateY" | "Rotate" => Some(-r.magnitude),
            "Brightness" | "Color" | "Contrast" | "Sharpness" => Some(1.0 + r.magnitude),
            _ => None,
        }
    };
    let mut checked = 0;
    for r in &all {
        // A 1-channel Color is the identity whatever the factor.
        let Some(m) = wrong(r).filter(|_| !(r.op == "Color" && r.shape.0 == 1)) else { continue };
        assert!(
            differing(&ours(&all, r, m), &r.pixels) > 0,
            "{} {}: magnitude {m} instead of {} still matches",
            r.input,
            r.op,
            r.magnitude
        );
        checked += 1;
    }
    assert!(checked >= 60, "{checked} records checked");
}
