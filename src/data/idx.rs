//! IDX files (MNIST, Fashion-MNIST), gzipped or raw: magic `00 00 08 <ndims>`, big-endian u32
//! dimensions, then the unsigned bytes.

use super::Dataset;
use super::TrainTest;
use crate::error::{Error, Result};
use flate2::read::GzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Type code of unsigned bytes, the only element type MNIST-like files use.
const UBYTE: u8 = 0x08;

/// The dimensions and payload of an IDX file of `ndims` dimensions; `name` is used in messages.
///
/// gzip is recognised by its magic bytes, not by the file name. The payload is never allocated
/// from the header's claim: a raw file's length is checked first, and a gzip stream is read through
/// a limit of header size + 1 into a buffer that grows only with the data actually decompressed.
pub(crate) fn parse(name: &str, bytes: &[u8], ndims: u8) -> Result<(Vec<usize>, Vec<u8>)> {
    let corrupt = |e: std::io::Error| Error::format(format!("{name}: corrupt or truncated gzip data ({e})"));
    let header_len = 4 + 4 * ndims as usize;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut dec = GzDecoder::new(bytes);
        let mut header = vec![0u8; header_len];
        dec.read_exact(&mut header).map_err(corrupt)?;
        let (dims, size) = header_dims(name, &header, ndims)?;
        // The header's claim is checked against the memory limit before anything grows.
        crate::memory::check_host_alloc(size as u64, || format!("{name}: decoding {dims:?}"))?;
        let mut data = Vec::new();
        dec.take(size as u64 + 1).read_to_end(&mut data).map_err(corrupt)?;
        if data.len() != size {
            return Err(length_error(name, &dims, size, data.len(), "after decompression "));
        }
        Ok((dims, data))
    } else {
        let header = bytes.get(..header_len).ok_or_else(|| {
            Error::format(format!("{name}: {} bytes is too short for an IDX header of {header_len} bytes", bytes.len()))
        })?;
        let (dims, size) = header_dims(name, header, ndims)?;
        let data = &bytes[header_len..];
        if data.len() != size {
            return Err(length_error(name, &dims, size, data.len(), ""));
        }
        Ok((dims, data.to_vec()))
    }
}

/// Checks the magic number and returns the dimensions and their product.
fn header_dims(name: &str, header: &[u8], ndims: u8) -> Result<(Vec<usize>, usize)> {
    if header.get(..4) != Some(&[0, 0, UBYTE, ndims][..]) {
        let magic: Vec<String> = header.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return Err(Error::format(format!(
            "{name}: not an IDX file of unsigned bytes with {ndims} dimension(s) (magic {}, expected 00 00 08 {ndims:02x})",
            magic.join(" ")
        )));
    }
    let dims: Vec<usize> =
        header[4..].chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let size = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::format(format!("{name}: header dimensions {dims:?} overflow the address space")))?;
    Ok((dims, size))
}

fn length_error(name: &str, dims: &[usize], size: usize, got: usize, when: &str) -> Error {
    let how = if got < size { "truncated" } else { "wrong length" };
    let more = if got > size { "at least " } else { "" };
    Error::format(format!("{name}: {how}: header {dims:?} needs {size} bytes of data, {when}the file has {more}{got}"))
}

/// A data set from an images file and a labels file, each given as (name for messages, bytes).
pub(crate) fn dataset_from_bytes(
    set_name: &str,
    class_names: &[&str],
    images: (&str, &[u8]),
    labels: (&str, &[u8]),
) -> Result<Dataset> {
    let (dims, pixels) = parse(images.0, images.1, 3)?;
    let (ldims, labs) = parse(labels.0, labels.1, 1)?;
    let (n, h, w) = (dims[0], dims[1], dims[2]);
    if h == 0 || w == 0 {
        return Err(Error::format(format!("{}: images of {h}x{w} pixels", images.0)));
    }
    if ldims[0] != n {
        return Err(Error::format(format!("{}: {} labels for the {n} images of {}", labels.0, ldims[0], images.0)));
    }
    let classes = class_names.len();
    if let Some((i, &l)) = labs.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
        return Err(Error::format(format!("{}: label {l} of image {i} is out of range 0..{classes}", labels.0)));
    }
    Ok(Dataset {
        name: set_name.to_string(),
        images: pixels,
        labels: labs.into_iter().map(u16::from).collect(),
        channels: 1,
        height: h,
        width: w,
        classes,
        class_names: class_names.iter().map(|s| s.to_string()).collect(),
    })
}

/// `dir/stem.gz` if it exists, else `dir/stem`; an Io error naming both when neither does.
fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    let gz = dir.join(format!("{stem}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    let raw = dir.join(stem);
    if raw.is_file() {
        return Ok(raw);
    }
    Err(Error::io(&raw, std::io::Error::new(std::io::ErrorKind::NotFound, "not found (nor with .gz)")))
}

/// Loads `train-*` and `t10k-*` IDX files from `dir`.
pub(crate) fn load_dir(dir: &Path, set_name: &str, class_names: &[&str]) -> Result<TrainTest> {
    let part = |prefix: &str| -> Result<Dataset> {
        let ip = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
        let lp = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
        let ib = crate::memory::read_file(&ip)?;
        let lb = crate::memory::read_file(&lp)?;
        dataset_from_bytes(set_name, class_names, (&ip.display().to_string(), &ib), (&lp.display().to_string(), &lb))
    };
    Ok(TrainTest { train: part("train")?, test: part("t10k")? })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{emb, temp_dir};
    use super::super::{load, DatasetKind, EMBEDDED, FASHION_MNIST_CLASSES};
    use super::*;
    use crate::error::ErrorKind;
    use std::io::Write;

    fn gunzip(b: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        GzDecoder::new(b).read_to_end(&mut out).unwrap();
        out
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(b).unwrap();
        enc.finish().unwrap()
    }

    /// The embedded test images and labels, decompressed.
    fn raw_test_files() -> (Vec<u8>, Vec<u8>) {
        (gunzip(EMBEDDED[2].1), gunzip(EMBEDDED[3].1))
    }

    /// Loading `images` + `labels` as the t10k files of a temp dir (train = the good test files).
    fn load_with(name: &str, images: &[u8], labels: &[u8]) -> Result<TrainTest> {
        let d = temp_dir(name);
        let (gi, gl) = raw_test_files();
        std::fs::write(d.join("train-images-idx3-ubyte"), gi).unwrap();
        std::fs::write(d.join("train-labels-idx1-ubyte"), gl).unwrap();
        std::fs::write(d.join("t10k-images-idx3-ubyte"), images).unwrap();
        std::fs::write(d.join("t10k-labels-idx1-ubyte"), labels).unwrap();
        let r = load(DatasetKind::FashionMnist, &d, None, None);
        let _ = std::fs::remove_dir_all(&d);
        r
    }

    fn assert_format_err(r: Result<TrainTest>, file: &str) {
        match r {
            Ok(_) => panic!("corrupt {file} loaded"),
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::Format, "{e}");
                assert!(e.message().contains(file), "message does not name {file}: {e}");
                assert!(!e.message().contains('\n'), "{e}");
            }
        }
    }

    #[test]
    fn raw_and_gz_names_both_load() {
        let (img, lab) = raw_test_files();
        let t = load_with("raw-ok", &img, &lab).unwrap();
        assert_eq!(t.train, t.test);
        assert_eq!(t.test.images, emb().test.images);
        assert_eq!(t.test.labels, emb().test.labels);
        assert_eq!(t.test.name, "fashion-mnist");
        // A gz copy written by another encoder decodes to the same set.
        let (a, b) = (gzip(&img), gzip(&lab));
        let d = dataset_from_bytes("x", &FASHION_MNIST_CLASSES, ("i.gz", &a), ("l.gz", &b)).unwrap();
        assert_eq!(d.images, emb().test.images);
    }

    #[test]
    fn truncated_files_are_format_errors_naming_the_file() {
        let (img, lab) = raw_test_files();
        assert_format_err(load_with("trunc-img", &img[..img.len() - 1], &lab), "t10k-images-idx3-ubyte");
        assert_format_err(load_with("trunc-lab", &img, &lab[..lab.len() - 7]), "t10k-labels-idx1-ubyte");
        assert_format_err(load_with("trunc-head", &img[..10], &lab), "t10k-images-idx3-ubyte");
        assert_format_err(load_with("empty", &[], &lab), "t10k-images-idx3-ubyte");
        // A gzip stream cut short, and one whose payload is one byte short.
        let gz = EMBEDDED[2].1;
        let r = dataset_from_bytes("x", &FASHION_MNIST_CLASSES, ("cut.gz", &gz[..gz.len() / 2]), ("l", &lab));
        assert!(r.unwrap_err().message().contains("cut.gz"));
        let short = gzip(&img[..img.len() - 1]);
        let e = dataset_from_bytes("x", &FASHION_MNIST_CLASSES, ("short.gz", &short), ("l", &lab)).unwrap_err();
        assert!(e.message().contains("short.gz") && e.message().contains("truncated"), "{e}");
        // A gzip stream with a corrupted trailer (CRC) is caught too.
        let mut bad = EMBEDDED[3].1.to_vec();
        let n = bad.len();
        bad[n - 6] ^= 0xff;
        let e = dataset_from_bytes("x", &FASHION_MNIST_CLASSES, ("i", &img), ("crc.gz", &bad)).unwrap_err();
        assert!(e.message().contains("crc.gz"), "{e}");
    }

    #[test]
    fn wrong_magic_and_wrong_length_are_format_errors() {
        let (img, lab) = raw_test_files();
        let mut m = img.clone();
        m[3] = 1; // a 1-dimensional file where images are expected
        assert_format_err(load_with("magic-img", &m, &lab), "t10k-images-idx3-ubyte");
        let mut m = lab.clone();
        m[2] = 0x0d; // float elements
        assert_format_err(load_with("magic-lab", &img, &m), "t10k-labels-idx1-ubyte");
        // Swapped files: labels where images belong.
        assert_format_err(load_with("swapped", &lab, &img), "t10k-images-idx3-ubyte");
        // Trailing bytes.
        let mut long = img.clone();
        long.extend_from_slice(&[0; 5]);
        assert_format_err(load_with("long", &long, &lab), "t10k-images-idx3-ubyte");
        // Label count that disagrees with the image count (header and payload both consistent).
        let mut fewer = lab[..lab.len() - 1].to_vec();
        fewer[4..8].copy_from_slice(&1999u32.to_be_bytes());
        assert_format_err(load_with("count", &img, &fewer), "t10k-labels-idx1-ubyte");
        // A header claiming 2^32 - 1 images of 65535 x 65535 pixels fails before any allocation.
        let mut huge = img[..64].to_vec();
        huge[4..16].copy_from_slice(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0xff, 0xff, 0, 0, 0, 28]);
        assert_format_err(load_with("huge", &huge, &lab), "t10k-images-idx3-ubyte");
        let e = dataset_from_bytes("x", &FASHION_MNIST_CLASSES, ("huge.gz", &gzip(&huge)), ("l", &lab)).unwrap_err();
        assert!(e.message().contains("huge.gz"), "{e}");
        // Dimensions whose product overflows.
        huge[4..16].fill(0xff);
        assert_format_err(load_with("overflow", &huge, &lab), "t10k-images-idx3-ubyte");
    }

    #[test]
    fn label_out_of_range_is_a_format_error() {
        let (img, lab) = raw_test_files();
        let mut bad = lab.clone();
        bad[8 + 1234] = 10;
        assert_format_err(load_with("label", &img, &bad), "t10k-labels-idx1-ubyte");
        let e = load_with("label2", &img, &bad).unwrap_err();
        assert!(e.message().contains("image 1234"), "{e}");
    }

    #[test]
    fn missing_file_is_io() {
        let d = temp_dir("idx-missing");
        let (img, _) = raw_test_files();
        std::fs::write(d.join("train-images-idx3-ubyte.gz"), gzip(&img)).unwrap();
        let e = load(DatasetKind::Mnist, &d, None, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.message().contains("train-labels-idx1-ubyte"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
