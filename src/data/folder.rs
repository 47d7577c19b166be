//! Image folders: `root/<split>/<class>/*.png|jpg|jpeg`, split = `train` and `test`.
//!
//! Classes are the sorted union of the class folder names of both splits (so that both splits
//! number classes alike even when one lacks a class), images within a class are in file-name
//! order, and hidden entries (names starting with '.') are skipped.

use super::{Dataset, TrainTest};
use crate::error::{Error, Result};
use image::imageops::FilterType;
use image::{DynamicImage, ImageReader};
use rayon::prelude::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// File extensions read as images (compared without case).
const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Names of the visible entries of `dir` that satisfy `keep`, sorted.
fn entries(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && keep(&entry.path()) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn is_image(p: &Path) -> bool {
    p.is_file()
        && p.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// The image files of one split with their labels, class by class.
fn list_split(split_dir: &Path, classes: &[String]) -> Result<Vec<(PathBuf, u16)>> {
    let mut files = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let d = split_dir.join(class);
        if !d.is_dir() {
            continue; // this split has no images of the class
        }
        for name in entries(&d, is_image)? {
            files.push((d.join(name), label as u16));
        }
    }
    if files.is_empty() {
        return Err(Error::format(format!(
            "{}: no .png/.jpg/.jpeg images in its class folders (expected {}/<class>/<image>)",
            split_dir.display(),
            split_dir.display()
        )));
    }
    Ok(files)
}

/// Decodes one image file; a file that opens but does not decode (truncated too) is a format
/// error naming it.
fn decode(path: &Path) -> Result<DynamicImage> {
    let reader = ImageReader::open(path).and_then(|r| r.with_guessed_format()).map_err(|e| Error::io(path, e))?;
    reader.decode().map_err(|e| Error::format(format!("{}: {e}", path.display())))
}

/// The target shape of every image: (channels, height, width), and the file it was taken from.
struct Shape {
    channels: usize,
    height: u32,
    width: u32,
    first: PathBuf,
    resize: bool,
}

/// One image as C x H x W bytes in the target shape.
fn convert(path: &Path, img: DynamicImage, shape: &Shape) -> Result<Vec<u8>> {
    let (w, h) = (img.width(), img.height());
    if !shape.resize && (w, h) != (shape.width, shape.height) {
        return Err(Error::format(format!(
            "{}: image is {w}x{h}, but {} is {}x{}; pass --resize S to resize every image to S x S",
            path.display(),
            shape.first.display(),
            shape.width,
            shape.height
        )));
    }
    let fit = |w2: u32, h2: u32| shape.resize && (w2, h2) != (shape.width, shape.height);
    if shape.channels == 1 {
        let mut g = img.to_luma8();
        if fit(w, h) {
            g = image::imageops::resize(&g, shape.width, shape.height, FilterType::Triangle);
        }
        Ok(g.into_raw())
    } else {
        let mut c = img.to_rgb8();
        if fit(w, h) {
            c = image::imageops::resize(&c, shape.width, shape.height, FilterType::Triangle);
        }
        // HWC (interleaved) to CHW (planes).
        let hw = (shape.width * shape.height) as usize;
        let raw = c.into_raw();
        let mut out = vec![0u8; 3 * hw];
        for (p, px) in raw.chunks_exact(3).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                out[ch * hw + p] = v;
            }
        }
        Ok(out)
    }
}

/// Decodes `files` in parallel into one data set; on failure, the error of the first failing
/// file in list order, so that the message does not depend on thread scheduling. `split` names
/// the folder in messages.
fn read_split(
    name: &str,
    split: &Path,
    files: &[(PathBuf, u16)],
    shape: &Shape,
    class_names: &[String],
) -> Result<Dataset> {
    let per = shape.channels as u64 * shape.height as u64 * shape.width as u64;
    let total = files.len() as u64 * per;
    let what = || {
        let flag = if shape.resize { format!("--resize {}: ", shape.width) } else { String::new() };
        format!(
            "{flag}{}: {} images of {}x{}x{} (held twice while decoding)",
            split.display(),
            files.len(),
            shape.channels,
            shape.height,
            shape.width
        )
    };
    // Before decoding: for a moment every image is held twice (decoded, then packed).
    crate::memory::check_host_alloc(total.saturating_mul(2), what)?;
    let decoded: Vec<Result<Vec<u8>>> =
        files.par_iter().map(|(p, _)| decode(p).and_then(|img| convert(p, img, shape))).collect();
    let mut images = crate::memory::try_with_capacity(usize::try_from(total).unwrap_or(usize::MAX), what)?;
    for r in decoded {
        images.extend_from_slice(&r?);
    }
    Ok(Dataset {
        name: name.to_string(),
        images,
        labels: files.iter().map(|(_, l)| *l).collect(),
        channels: shape.channels,
        height: shape.height as usize,
        width: shape.width as usize,
        classes: class_names.len(),
        class_names: class_names.to_vec(),
    })
}

/// Loads `root/train` and `root/test`; see the module doc for the layout.
pub(crate) fn load(root: &Path, resize: Option<usize>, channels: Option<usize>) -> Result<TrainTest> {
    if let Some(c) = channels.filter(|&c| c != 1 && c != 3) {
        return Err(Error::usage(format!("--channels {c}: must be 1 (grey) or 3 (colour)")));
    }
    let resize = match resize {
        Some(s) if s == 0 || s > 65_535 => {
            return Err(Error::usage(format!("--resize {s}: must be between 1 and 65535")));
        }
        other => other.map(|s| s as u32),
    };
    let (train_dir, test_dir) = (root.join("train"), root.join("test"));
    let mut classes = BTreeSet::new();
    for d in [&train_dir, &test_dir] {
        classes.extend(entries(d, |p| p.is_dir())?);
    }
    let classes: Vec<String> = classes.into_iter().collect();
    if classes.len() > u16::MAX as usize {
        return Err(Error::format(format!("{}: {} class folders, at most 65535", root.display(), classes.len())));
    }
    let train_files = list_split(&train_dir, &classes)?;
    let test_files = list_split(&test_dir, &classes)?;
    // The first training image fixes the size (unless resized) and the channel count.
    let first = &train_files[0].0;
    let img = decode(first)?;
    let shape = Shape {
        channels: channels.unwrap_or(if img.color().has_color() { 3 } else { 1 }),
        height: resize.unwrap_or(img.height()),
        width: resize.unwrap_or(img.width()),
        first: first.clone(),
        resize: resize.is_some(),
    };
    if shape.height == 0 || shape.width == 0 {
        return Err(Error::format(format!("{}: empty image", first.display())));
    }
    let name = root
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "folder".to_string());
    let train = read_split(&name, &train_dir, &train_files, &shape, &classes)?;
    let test = read_split(&name, &test_dir, &test_files, &shape, &classes)?;
    Ok(TrainTest { train, test })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{fixture, temp_dir};
    use super::super::{gather, load, Augment, DatasetKind};
    use super::*;
    use crate::error::ErrorKind;

    /// Copies a directory tree (files and folders only).
    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if p.is_dir() {
                copy_tree(&p, &to.join(e.file_name()));
            } else {
                std::fs::copy(&p, to.join(e.file_name())).unwrap();
            }
        }
    }

    /// The fixture's image folder copied into a fresh temp dir.
    fn folder_copy(name: &str) -> PathBuf {
        let root = temp_dir(name);
        copy_tree(&fixture().join("train"), &root.join("train"));
        copy_tree(&fixture().join("test"), &root.join("test"));
        root
    }

    #[test]
    fn folder_and_binary_give_identical_data() {
        let bin = load(DatasetKind::Cifar10, &fixture(), None, None).unwrap();
        let fol = load(DatasetKind::Folder, &fixture(), None, None).unwrap();
        assert_eq!(fol.train.name, "cifar10-foolbox");
        assert_eq!(fol.train.class_names[0], "0-airplane");
        assert_eq!(fol.train.class_names[9], "9-truck");
        for (b, f) in [(&bin.train, &fol.train), (&bin.test, &fol.test)] {
            assert_eq!((f.channels, f.height, f.width, f.classes, f.len()), (3, 32, 32, 10, 10));
            // The folder lists images by class, then file name (= record order within a class): a
            // stable sort of the records by label gives the same order.
            let mut order: Vec<usize> = (0..b.len()).collect();
            order.sort_by_key(|&i| b.labels[i]);
            for (j, &i) in order.iter().enumerate() {
                assert_eq!(f.labels[j], b.labels[i]);
                assert_eq!(f.image(j), b.image(i), "image {j} of the folder differs from record {i}");
            }
            // And the tensors the trainer sees are bit-identical.
            let aug = Augment::for_dataset(DatasetKind::Cifar10, b);
            let (tb, lb) = gather(b, &order, &aug, None).unwrap();
            let all: Vec<usize> = (0..f.len()).collect();
            let (tf, lf) = gather(f, &all, &aug, None).unwrap();
            assert_eq!(tb.shape(), [10, 3, 32, 32]);
            assert_eq!(tb.data().unwrap(), tf.data().unwrap());
            assert_eq!(lb, lf);
            let (ta, _) = gather(b, &order, &aug, Some((1, 2, 3))).unwrap();
            let (tc, _) = gather(f, &all, &aug, Some((1, 2, 3))).unwrap();
            assert_eq!(ta.data().unwrap(), tc.data().unwrap());
        }
    }

    #[test]
    fn resize_and_channel_overrides() {
        let fol = load(DatasetKind::Folder, &fixture(), Some(16), Some(1)).unwrap();
        assert_eq!((fol.train.channels, fol.train.height, fol.train.width), (1, 16, 16));
        assert_eq!(fol.test.images.len(), 10 * 16 * 16);
        fol.train.validate().unwrap();
        let same = load(DatasetKind::Folder, &fixture(), Some(32), None).unwrap();
        assert_eq!(same, load(DatasetKind::Folder, &fixture(), None, None).unwrap());
        for (r, c) in [(Some(0), None), (None, Some(2))] {
            let e = load(DatasetKind::Folder, &fixture(), r, c).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
        }
    }

    #[test]
    fn another_size_is_an_error_naming_the_file() {
        let root = folder_copy("folder-size");
        let victim = root.join("test/7-horse/cifar10_17_7.png");
        let img = decode(&victim).unwrap().resize_exact(30, 30, FilterType::Triangle);
        img.save(&victim).unwrap();
        let e = load(DatasetKind::Folder, &root, None, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Format);
        assert!(e.message().contains("cifar10_17_7.png") && e.message().contains("30x30"), "{e}");
        // --resize accepts it.
        let t = load(DatasetKind::Folder, &root, Some(32), None).unwrap();
        assert_eq!(t.test.len(), 10);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn corrupt_image_and_missing_split_are_errors() {
        let root = folder_copy("folder-corrupt");
        let victim = root.join("train/6-frog/cifar10_05_6.png");
        let bytes = std::fs::read(&victim).unwrap();
        std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
        let e = load(DatasetKind::Folder, &root, None, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Format);
        assert!(e.message().contains("cifar10_05_6.png"), "{e}");
        assert!(!e.message().contains('\n'));
        std::fs::remove_dir_all(root.join("test")).unwrap();
        let e = load(DatasetKind::Folder, &root, None, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.message().contains("test"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
        let empty = temp_dir("folder-empty");
        std::fs::create_dir_all(empty.join("train/a")).unwrap();
        std::fs::create_dir_all(empty.join("test/a")).unwrap();
        let e = load(DatasetKind::Folder, &empty, None, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Format);
        let _ = std::fs::remove_dir_all(&empty);
    }
}
