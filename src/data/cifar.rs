//! CIFAR-10 / CIFAR-100 binary version: fixed-size records of label byte(s) + 3072 pixel bytes
//! (R, G, B planes of 32 x 32, row-major). CIFAR-100 records carry (coarse, fine) labels; we use fine.

use super::{Dataset, TrainTest};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Pixel bytes per record: 3 x 32 x 32.
const PIXELS: usize = 3 * 32 * 32;

/// CIFAR-10 class names, label order (as in `batches.meta.txt`).
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// CIFAR-100 fine class names, label order (as in `fine_label_names.txt`: alphabetical).
pub const CIFAR100_CLASSES: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

/// Number of CIFAR-100 coarse classes (checked, then dropped).
const COARSE: usize = 20;

/// Appends the records of one binary file to `images` / `labels`.
///
/// `label_bytes` is 1 (CIFAR-10) or 2 (CIFAR-100: coarse, fine); the last label byte is kept.
/// The record count comes from the file length, which is checked to be a whole number of records.
pub(crate) fn parse_into(
    name: &str,
    bytes: &[u8],
    label_bytes: usize,
    classes: usize,
    images: &mut Vec<u8>,
    labels: &mut Vec<u16>,
) -> Result<()> {
    let record = label_bytes + PIXELS;
    if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
        return Err(Error::format(format!(
            "{name}: {} bytes is not a whole, non-zero number of {record}-byte CIFAR records (truncated or not CIFAR-{classes} binary)",
            bytes.len()
        )));
    }
    let n = bytes.len() / record;
    images.reserve(n * PIXELS);
    labels.reserve(n);
    for (i, rec) in bytes.chunks_exact(record).enumerate() {
        let (lab, px) = rec.split_at(label_bytes);
        if label_bytes == 2 && lab[0] as usize >= COARSE {
            return Err(Error::format(format!(
                "{name}: coarse label {} of record {i} is out of range 0..{COARSE}",
                lab[0]
            )));
        }
        let l = lab[label_bytes - 1];
        if l as usize >= classes {
            return Err(Error::format(format!("{name}: label {l} of record {i} is out of range 0..{classes}")));
        }
        labels.push(l as u16);
        images.extend_from_slice(px);
    }
    Ok(())
}

/// A data set from whole files, in order.
fn read_set(files: &[PathBuf], set_name: &str, label_bytes: usize, class_names: &[&str]) -> Result<Dataset> {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for f in files {
        let bytes = crate::memory::read_file(f)?;
        parse_into(&f.display().to_string(), &bytes, label_bytes, class_names.len(), &mut images, &mut labels)?;
    }
    Ok(Dataset {
        name: set_name.to_string(),
        images,
        labels,
        channels: 3,
        height: 32,
        width: 32,
        classes: class_names.len(),
        class_names: class_names.iter().map(|s| s.to_string()).collect(),
    })
}

/// `dir` itself if it holds `marker`, else `dir/sub` if that does, else `dir` (so that the error
/// names the file expected there).
fn locate(dir: &Path, sub: &str, marker: &str) -> PathBuf {
    let nested = dir.join(sub);
    if !dir.join(marker).exists() && nested.join(marker).exists() {
        nested
    } else {
        dir.to_path_buf()
    }
}

/// CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin` in `dir` or in
/// `dir/cifar-10-batches-bin/`. All five training batches are required, so that a missing one
/// cannot silently shrink the training set.
pub(crate) fn load_cifar10(dir: &Path) -> Result<TrainTest> {
    let d = locate(dir, "cifar-10-batches-bin", "test_batch.bin");
    let train: Vec<PathBuf> = (1..=5).map(|k| d.join(format!("data_batch_{k}.bin"))).collect();
    Ok(TrainTest {
        train: read_set(&train, "cifar10", 1, &CIFAR10_CLASSES)?,
        test: read_set(&[d.join("test_batch.bin")], "cifar10", 1, &CIFAR10_CLASSES)?,
    })
}

/// CIFAR-100: `train.bin` and `test.bin` in `dir` or in `dir/cifar-100-binary/`; fine labels.
pub(crate) fn load_cifar100(dir: &Path) -> Result<TrainTest> {
    let d = locate(dir, "cifar-100-binary", "test.bin");
    Ok(TrainTest {
        train: read_set(&[d.join("train.bin")], "cifar100", 2, &CIFAR100_CLASSES)?,
        test: read_set(&[d.join("test.bin")], "cifar100", 2, &CIFAR100_CLASSES)?,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{fixture, temp_dir};
    use super::super::{load, DatasetKind};
    use super::*;
    use crate::error::ErrorKind;

    /// Labels of foolbox's cifar10_00..19 files (the digit in each file name).
    const TRAIN_LABELS: [u16; 10] = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1];
    const TEST_LABELS: [u16; 10] = [0, 9, 5, 7, 9, 8, 5, 7, 8, 6];

    /// A copy of the fixture's binary files in a fresh temp dir (optionally under `sub`).
    fn copy_bins(name: &str, sub: &str) -> (PathBuf, PathBuf) {
        let root = temp_dir(name);
        let d = root.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"] {
            std::fs::copy(fixture().join(format!("{f}.bin")), d.join(format!("{f}.bin"))).unwrap();
        }
        (root, d)
    }

    fn expect_err(dir: &Path, kind: ErrorKind, file: &str) {
        let e = load(DatasetKind::Cifar10, dir, None, None).unwrap_err();
        assert_eq!(e.kind(), kind, "{e}");
        assert!(e.message().contains(file), "message does not name {file}: {e}");
    }

    #[test]
    fn fixture_binary_loads() {
        let t = load(DatasetKind::Cifar10, &fixture(), None, None).unwrap();
        assert_eq!((t.train.len(), t.test.len()), (10, 10));
        assert_eq!(t.train.labels, TRAIN_LABELS);
        assert_eq!(t.test.labels, TEST_LABELS);
        assert_eq!((t.train.channels, t.train.height, t.train.width, t.train.classes), (3, 32, 32, 10));
        assert_eq!(t.train.class_names[3], "cat");
        t.train.validate().unwrap();
        t.test.validate().unwrap();
        // The nested layout of the official tarball works too.
        let (root, _) = copy_bins("cifar-nested", "cifar-10-batches-bin");
        assert_eq!(load(DatasetKind::Cifar10, &root, None, None).unwrap(), t);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn corrupt_cifar10_files_are_errors_naming_the_file() {
        let (root, d) = copy_bins("cifar-corrupt", "");
        let good = std::fs::read(d.join("test_batch.bin")).unwrap();
        std::fs::write(d.join("test_batch.bin"), &good[..good.len() - 100]).unwrap();
        expect_err(&d, ErrorKind::Format, "test_batch.bin");
        std::fs::write(d.join("test_batch.bin"), []).unwrap();
        expect_err(&d, ErrorKind::Format, "test_batch.bin");
        let mut bad = good.clone();
        bad[3073 * 4] = 10; // label of record 4
        std::fs::write(d.join("test_batch.bin"), &bad).unwrap();
        expect_err(&d, ErrorKind::Format, "test_batch.bin");
        let e = load(DatasetKind::Cifar10, &d, None, None).unwrap_err();
        assert!(e.message().contains("record 4"), "{e}");
        // CIFAR-100 records (3074 bytes) are not a whole number of CIFAR-10 records here.
        let mut long = good.clone();
        long.extend_from_slice(&[0; 10]);
        std::fs::write(d.join("test_batch.bin"), &long).unwrap();
        expect_err(&d, ErrorKind::Format, "test_batch.bin");
        std::fs::write(d.join("test_batch.bin"), &good).unwrap();
        std::fs::remove_file(d.join("data_batch_3.bin")).unwrap();
        expect_err(&d, ErrorKind::Io, "data_batch_3.bin");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn cifar100_fine_labels_and_range_checks() {
        // CIFAR-100 records made from the real CIFAR-10 pixels: coarse = label, fine = 10 label + 7.
        let root = temp_dir("cifar100");
        let t10 = load(DatasetKind::Cifar10, &fixture(), None, None).unwrap();
        let write = |name: &str, d: &Dataset, coarse_bump: u8, fine_bump: u8| {
            let mut b = Vec::new();
            for i in 0..d.len() {
                let l = d.labels[i] as u8;
                b.extend_from_slice(&[l + coarse_bump, 10 * l + 7 + fine_bump]);
                b.extend_from_slice(d.image(i));
            }
            std::fs::write(root.join(name), b).unwrap();
        };
        write("train.bin", &t10.train, 0, 0);
        write("test.bin", &t10.test, 0, 0);
        let t = load(DatasetKind::Cifar100, &root, None, None).unwrap();
        assert_eq!(t.train.classes, 100);
        assert_eq!(t.train.class_names.len(), 100);
        assert_eq!(t.train.images, t10.train.images);
        let fine: Vec<u16> = TRAIN_LABELS.iter().map(|l| 10 * l + 7).collect();
        assert_eq!(t.train.labels, fine);
        // The fine label of class 9 + 7 + 10 = 107 is out of range; so is a coarse label of 20.
        write("test.bin", &t10.test, 0, 10);
        let e = load(DatasetKind::Cifar100, &root, None, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Format);
        assert!(e.message().contains("test.bin") && e.message().contains("107"), "{e}");
        write("test.bin", &t10.test, 11, 0);
        let e = load(DatasetKind::Cifar100, &root, None, None).unwrap_err();
        assert!(e.message().contains("test.bin") && e.message().contains("coarse"), "{e}");
        // CIFAR-10 files are not CIFAR-100 files.
        let e = load(DatasetKind::Cifar100, &fixture(), None, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.message().contains("train.bin"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn class_name_tables_are_complete() {
        assert_eq!(CIFAR100_CLASSES.len(), 100);
        assert!(CIFAR100_CLASSES.windows(2).all(|w| w[0] < w[1]), "fine_label_names.txt is alphabetical");
    }
}
