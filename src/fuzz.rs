//! Property-based fuzzing of every reader of untrusted bytes (IDX raw and gzipped, CIFAR binary,
//! image files through the folder reader, checkpoints, .npy): valid inputs mutated at random
//! (byte edits, truncation, extension) must give Ok or an Err naming the file, never a panic, and
//! never an allocation sized by an unchecked header (a lying header on a short file fails fast).
//! Case counts are fixed so CI time is bounded; `PROPTEST_CASES` raises them for a longer run.

use crate::data::{cifar, folder, idx};
use crate::npy::{npy_bytes, parse_npy, Matrix};
use crate::train::checkpoint::{Checkpoint, Entry, Values};
use proptest::prelude::*;
use std::io::Write;
use std::path::Path;

/// Mutations: (position, new byte) edits, then an optional cut and an optional tail.
fn mutations() -> impl Strategy<Value = (Vec<(usize, u8)>, Option<usize>, Vec<u8>)> {
    (
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        prop::option::of(any::<usize>()),
        prop::collection::vec(any::<u8>(), 0..4),
    )
}

fn mutate(seed: &[u8], (edits, cut, tail): &(Vec<(usize, u8)>, Option<usize>, Vec<u8>)) -> Vec<u8> {
    let mut b = seed.to_vec();
    for &(pos, v) in edits {
        if !b.is_empty() {
            let i = pos % b.len();
            b[i] = v;
        }
    }
    if let Some(c) = cut {
        b.truncate(c % (b.len() + 1));
    }
    b.extend_from_slice(tail);
    b
}

fn idx_images() -> Vec<u8> {
    let mut b = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 4];
    b.extend((0..48).map(|i| i as u8));
    b
}

fn idx_labels() -> Vec<u8> {
    vec![0, 0, 8, 1, 0, 0, 0, 3, 1, 9, 0]
}

fn gz(raw: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = e.write_all(raw);
    e.finish().unwrap_or_default()
}

fn cases(n: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(n);
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn idx_reader_never_panics(m in mutations(), zipped in any::<bool>(), which in 0usize..2) {
        let (img, lab) = (idx_images(), idx_labels());
        let (mut img, mut lab) = if zipped { (gz(&img), gz(&lab)) } else { (img, lab) };
        if which == 0 { img = mutate(&img, &m) } else { lab = mutate(&lab, &m) }
        if let Err(e) = idx::dataset_from_bytes("fuzz", &["a"; 10], ("img.idx", &img), ("lab.idx", &lab)) {
            prop_assert!(e.message().contains(".idx") || e.message().contains("fuzz"), "{}", e);
        }
    }

    #[test]
    fn cifar_reader_never_panics(m in mutations(), label_bytes in 1usize..3) {
        let mut seed = Vec::new();
        for r in 0..2u8 {
            seed.extend(std::iter::repeat_n(r, label_bytes));
            seed.extend((0..3072).map(|i| (i % 251) as u8));
        }
        let bytes = mutate(&seed, &m);
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        if let Err(e) = cifar::parse_into("data_batch_1.bin", &bytes, label_bytes, 10, &mut images, &mut labels) {
            prop_assert!(e.message().contains("data_batch_1.bin"), "{}", e);
        }
    }

    #[test]
    fn checkpoint_reader_never_panics(m in mutations()) {
        let mut ck = Checkpoint::default();
        ck.entries.push(Entry { name: "w".into(), shape: vec![2, 3], values: Values::F32(vec![1.0; 6]) });
        ck.entries.push(Entry { name: "n".into(), shape: vec![], values: Values::I64(vec![3]) });
        ck.metadata.insert("model".into(), "convnet".into());
        let bytes = mutate(&ck.to_bytes(), &m);
        if let Err(e) = Checkpoint::from_bytes(&bytes, Path::new("fuzz.safetensors")) {
            prop_assert!(e.message().contains("fuzz.safetensors"), "{}", e);
        }
    }

    #[test]
    fn npy_reader_never_panics(m in mutations()) {
        let seed = npy_bytes(&Matrix { rows: 3, cols: 2, data: vec![0.5; 6] });
        if let Err(e) = parse_npy(&mutate(&seed, &m), Path::new("fuzz.npy")) {
            prop_assert!(e.message().contains("fuzz.npy"), "{}", e);
        }
    }
}

proptest! {
    // Each case writes a small image tree to disk, so fewer cases.
    #![proptest_config(cases(150))]

    #[test]
    fn image_folder_reader_never_panics(m in mutations()) {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar10-foolbox/test/0-airplane");
        let png = std::fs::read_dir(&fixture)
            .ok()
            .and_then(|mut d| d.find_map(|e| e.ok().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "png"))));
        let Some(png) = png else { return Ok(()) };
        let seed = std::fs::read(&png).unwrap_or_default();
        let root = std::env::temp_dir().join(format!("muscle-fuzz-folder-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for split in ["train", "test"] {
            let d = root.join(split).join("a");
            let _ = std::fs::create_dir_all(&d);
            let _ = std::fs::write(d.join("x.png"), mutate(&seed, &m));
        }
        if let Err(e) = folder::load(&root, None, None) {
            prop_assert!(e.message().contains("muscle-fuzz-folder"), "{}", e);
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}
