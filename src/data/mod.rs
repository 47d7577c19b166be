//! Data: file formats (IDX, CIFAR binary, image folder), the embedded default set, labeled /
//! unlabeled / validation splits, augmentation, and the prefetching batch loader.
//!
//! Images stay raw bytes (N x C x H x W, 0..255) in memory; they become normalised f32 only per
//! batch, so a data set costs a quarter of its f32 size and augmentation reads the original pixels.

mod augment;
pub(crate) mod cifar;
pub(crate) mod folder;
pub(crate) mod idx;
mod loader;
pub mod randaugment;
mod split;

pub use augment::{augment_into, augment_raw, normalize_into, Augment};
pub use cifar::{CIFAR100_CLASSES, CIFAR10_CLASSES};
pub use loader::{eval_batches, gather, BatchPlan, EvalBatches, Loader, Shard, StepBatch};
pub use split::{biased_counts, label_counts, split, Split};

use crate::error::{choice, Error, Result};
use std::path::Path;

/// Fashion-MNIST's class names, label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// MNIST's class names (the digits), label order.
pub const MNIST_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// An image-classification data set held as raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Short name (`fashion-mnist-10k`, `cifar10`, or the folder's name).
    pub name: String,
    /// Pixels, N x C x H x W, 0..255.
    pub images: Vec<u8>,
    /// One label per image, each below `classes`.
    pub labels: Vec<u16>,
    /// Channels per image (1 grey, 3 colour).
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Number of classes.
    pub classes: usize,
    /// One name per class, label order.
    pub class_names: Vec<String>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set has no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image (C x H x W).
    pub fn image_size(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Pixels of image `i` (C x H x W); panics if `i >= len()`, as slice indexing does.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_size();
        &self.images[i * n..(i + 1) * n]
    }

    /// Pixels of image `i`, or a usage error naming the index when it is out of range.
    pub fn try_image(&self, i: usize) -> Result<&[u8]> {
        let n = self.image_size();
        i.checked_mul(n)
            .and_then(|start| self.images.get(start..start.checked_add(n)?))
            .filter(|_| i < self.len())
            .ok_or_else(|| {
                Error::usage(format!("image index {i} out of range for {} ({} images)", self.name, self.len()))
            })
    }

    /// Label of image `i` as an index, or a usage error when `i` is out of range.
    pub fn label(&self, i: usize) -> Result<usize> {
        self.labels.get(i).map(|&l| l as usize).ok_or_else(|| {
            Error::usage(format!("image index {i} out of range for {} ({} images)", self.name, self.len()))
        })
    }

    /// Checks that the fields agree (pixel count, label range, class names); the loaders build
    /// consistent sets, this guards sets that callers assemble by hand.
    pub fn validate(&self) -> Result<()> {
        let chw = self.image_size();
        if chw == 0 || self.classes == 0 {
            return Err(Error::shape(format!(
                "{}: empty image shape {}x{}x{} or no classes",
                self.name, self.channels, self.height, self.width
            )));
        }
        if self.len().checked_mul(chw) != Some(self.images.len()) {
            return Err(Error::shape(format!(
                "{}: {} bytes of pixels for {} images of {chw} bytes",
                self.name,
                self.images.len(),
                self.len()
            )));
        }
        if self.class_names.len() != self.classes {
            return Err(Error::shape(format!(
                "{}: {} class names for {} classes",
                self.name,
                self.class_names.len(),
                self.classes
            )));
        }
        if let Some((i, l)) = self.labels.iter().enumerate().find(|(_, &l)| l as usize >= self.classes) {
            return Err(Error::shape(format!("{}: label {l} of image {i} is not below {}", self.name, self.classes)));
        }
        Ok(())
    }
}

/// A training set and its test set.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainTest {
    /// Training images (split further into labeled, unlabeled and validation).
    pub train: Dataset,
    /// Test images, for evaluation only.
    pub test: Dataset,
}

choice! {
    /// The data set formats `load` reads (config.json spells them as the CLI does).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
    #[serde(into = "String", try_from = "String")]
    pub enum DatasetKind {
        /// Fashion-MNIST, IDX files (gzipped or raw).
        FashionMnist = "fashion-mnist",
        /// MNIST, IDX files (gzipped or raw).
        Mnist = "mnist",
        /// CIFAR-10 binary version.
        Cifar10 = "cifar10",
        /// CIFAR-100 binary version (fine labels).
        Cifar100 = "cifar100",
        /// An image folder `root/{train,test}/<class>/*.png|jpg|jpeg`.
        Folder = "folder",
    }
    unknown(s) = Error::usage(format!("unknown --dataset '{s}' (valid: {})", DatasetKind::NAMES.join(", ")));
}

/// Loads the train and test sets of `kind` from `dir`.
///
/// `resize: Some(S)` resizes every image to S x S and `channels: Some(1 | 3)` converts to grey or
/// colour; both apply to image folders only (the fixed-format sets accept only their own values).
pub fn load(kind: DatasetKind, dir: &Path, resize: Option<usize>, channels: Option<usize>) -> Result<TrainTest> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::io(dir, std::io::Error::other("not a directory")));
    }
    let native = |size: usize, ch: usize| -> Result<()> {
        if resize.is_some_and(|s| s != size) || channels.is_some_and(|c| c != ch) {
            return Err(Error::usage(format!(
                "--resize and --channels apply to --dataset folder only ({kind} images are {size}x{size} with {ch} \
                 channel(s))"
            )));
        }
        Ok(())
    };
    match kind {
        DatasetKind::FashionMnist => {
            native(28, 1)?;
            idx::load_dir(dir, "fashion-mnist", &FASHION_MNIST_CLASSES)
        }
        DatasetKind::Mnist => {
            native(28, 1)?;
            idx::load_dir(dir, "mnist", &MNIST_CLASSES)
        }
        DatasetKind::Cifar10 => {
            native(32, 3)?;
            cifar::load_cifar10(dir)
        }
        DatasetKind::Cifar100 => {
            native(32, 3)?;
            cifar::load_cifar100(dir)
        }
        DatasetKind::Folder => folder::load(dir, resize, channels),
    }
}

/// The embedded files: compiled into the binary so that it works from any working directory.
const EMBEDDED: [(&str, &[u8]); 4] = [
    (
        "train-images-idx3-ubyte.gz",
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/fashion-mnist-10k/train-images-idx3-ubyte.gz")),
    ),
    (
        "train-labels-idx1-ubyte.gz",
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/fashion-mnist-10k/train-labels-idx1-ubyte.gz")),
    ),
    (
        "t10k-images-idx3-ubyte.gz",
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/fashion-mnist-10k/t10k-images-idx3-ubyte.gz")),
    ),
    (
        "t10k-labels-idx1-ubyte.gz",
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/fashion-mnist-10k/t10k-labels-idx1-ubyte.gz")),
    ),
];

/// The embedded default set: the first 10,000 training and 2,000 test images of Fashion-MNIST.
pub fn embedded() -> Result<TrainTest> {
    let part = |k: usize| -> Result<Dataset> {
        let (img_name, img) = EMBEDDED[2 * k];
        let (lab_name, lab) = EMBEDDED[2 * k + 1];
        idx::dataset_from_bytes(
            "fashion-mnist-10k",
            &FASHION_MNIST_CLASSES,
            (&format!("embedded fashion-mnist-10k/{img_name}"), img),
            (&format!("embedded fashion-mnist-10k/{lab_name}"), lab),
        )
    };
    Ok(TrainTest { train: part(0)?, test: part(1)? })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use std::path::PathBuf;
    use std::sync::OnceLock;

    /// The embedded set, decoded once for all tests of the module.
    pub(crate) fn emb() -> &'static TrainTest {
        static E: OnceLock<TrainTest> = OnceLock::new();
        E.get_or_init(|| match embedded() {
            Ok(e) => e,
            Err(e) => panic!("embedded set does not load: {e}"),
        })
    }

    /// A fresh, empty temporary folder for one test.
    pub(crate) fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("muscle-data-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// The committed CIFAR-10 fixture.
    pub(crate) fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cifar10-foolbox")
    }

    #[test]
    fn embedded_set_loads() {
        let e = emb();
        let (tr, te) = (&e.train, &e.test);
        assert_eq!((tr.len(), te.len()), (10_000, 2_000));
        for d in [tr, te] {
            assert_eq!((d.channels, d.height, d.width, d.classes), (1, 28, 28, 10));
            assert_eq!(d.name, "fashion-mnist-10k");
            assert_eq!(d.class_names[9], "Ankle boot");
            d.validate().unwrap();
        }
        // First labels as read with Python's gzip from the official files (they also match the
        // Debian copy below when it is installed).
        assert_eq!(tr.labels[..12], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5, 0, 9]);
        assert_eq!(te.labels[..12], [9, 2, 1, 1, 6, 1, 4, 6, 5, 7, 4, 5]);
        let hist = label_counts(tr, &(0..tr.len()).collect::<Vec<_>>()).unwrap();
        assert_eq!(hist, [942, 1027, 1016, 1019, 974, 989, 1021, 1022, 990, 1000]);
        assert!(hist.iter().all(|&c| (800..=1200).contains(&c)));
        // Pixel sums computed independently (Python) from the same files.
        let sum = |d: &Dataset| d.images.iter().map(|&b| b as u64).sum::<u64>();
        assert_eq!((sum(tr), sum(te)), (572_388_787, 114_763_281));
        assert_eq!(tr.image(0).iter().map(|&b| b as u64).sum::<u64>(), 76_247);
        assert_eq!(tr.image(0)[14 * 28..14 * 28 + 4], [0x00, 0x00, 0x01, 0x04]);
    }

    #[test]
    fn embedded_matches_the_official_files_when_installed() {
        let dir = Path::new("/usr/share/datasets/fashion-mnist");
        if !dir.join("train-labels-idx1-ubyte.gz").exists() {
            println!("skipped: {} not installed (apt-get install dataset-fashion-mnist)", dir.display());
            return;
        }
        let full = load(DatasetKind::FashionMnist, dir, None, None).unwrap();
        assert_eq!((full.train.len(), full.test.len()), (60_000, 10_000));
        let e = emb();
        assert_eq!(full.train.labels[..10_000], e.train.labels[..]);
        assert_eq!(full.train.images[..10_000 * 784], e.train.images[..]);
        assert_eq!(full.test.labels[..2_000], e.test.labels[..]);
        assert_eq!(full.test.images[..2_000 * 784], e.test.images[..]);
    }

    #[test]
    fn kinds_parse_and_unknown_is_usage() {
        for k in DatasetKind::ALL {
            assert_eq!(k.name().parse::<DatasetKind>().unwrap(), k);
        }
        let e = "imagenet".parse::<DatasetKind>().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage);
        for part in ["--dataset", "imagenet", "fashion-mnist", "cifar100", "folder"] {
            assert!(e.message().contains(part), "{e}");
        }
    }

    #[test]
    fn missing_dir_is_io_and_resize_of_fixed_formats_is_usage() {
        let missing = Path::new("/nonexistent/muscle-data");
        for k in DatasetKind::ALL {
            let e = load(k, missing, None, None).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Io);
            assert!(e.message().contains("/nonexistent/muscle-data"), "{e}");
        }
        let e = load(DatasetKind::Cifar10, &fixture(), Some(28), None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage);
        assert!(load(DatasetKind::Cifar10, &fixture(), Some(32), Some(3)).is_ok());
    }

    #[test]
    fn validate_and_try_image_catch_inconsistent_sets() {
        let mut d = emb().test.clone();
        assert!(d.try_image(1999).is_ok());
        assert_eq!(d.try_image(2000).unwrap_err().kind(), ErrorKind::Usage);
        assert_eq!(d.try_image(usize::MAX).unwrap_err().kind(), ErrorKind::Usage);
        d.labels[5] = 10;
        assert!(d.validate().is_err());
        d.labels[5] = 0;
        d.images.pop();
        assert!(d.validate().is_err());
    }
}
