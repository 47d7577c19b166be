//! NumPy `.npy` files (format 1.0-3.0): reading 2-d little-endian f32/f64 C-order arrays, and
//! writing f64 ones. Enough for exchanging logit matrices with other implementations.

use crate::error::{Error, Result};
use std::path::Path;

/// A 2-d array of f64 values, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// rows x cols values.
    pub data: Vec<f64>,
}

fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let at = header.find(&format!("'{key}'"))?;
    let rest = header[at + key.len() + 2..].trim_start().strip_prefix(':')?.trim_start();
    Some(rest)
}

/// Parses `.npy` bytes; `path` names the file in errors.
pub fn parse_npy(bytes: &[u8], path: &Path) -> Result<Matrix> {
    let bad = |why: &str| Error::format(format!("{}: not a 2-d f32/f64 .npy array: {why}", path.display()));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("missing the \\x93NUMPY magic"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(bad(&format!("unsupported format version {v}"))),
    };
    let header = bytes.get(start..start + hlen).ok_or_else(|| bad("header longer than the file"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;
    let descr = header_value(header, "descr").ok_or_else(|| bad("no 'descr'"))?;
    let width = if descr.starts_with("'<f8'") {
        8
    } else if descr.starts_with("'<f4'") {
        4
    } else {
        return Err(bad(&format!("dtype {} (only '<f4' and '<f8')", descr.split(',').next().unwrap_or("?"))));
    };
    if !header_value(header, "fortran_order").is_some_and(|v| v.starts_with("False")) {
        return Err(bad("fortran_order must be False"));
    }
    let shape = header_value(header, "shape").ok_or_else(|| bad("no 'shape'"))?;
    let inner = shape.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or_else(|| bad("malformed shape"))?;
    let dims: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| bad("malformed shape")))
        .collect::<Result<_>>()?;
    let [rows, cols] = dims[..] else {
        return Err(bad(&format!("shape {dims:?} is not 2-d")));
    };
    let data = &bytes[start + hlen..];
    let n = rows.checked_mul(cols).ok_or_else(|| bad("shape overflows"))?;
    if data.len() != n * width {
        return Err(bad(&format!("{} data bytes for shape ({rows}, {cols}) of {width}-byte values", data.len())));
    }
    let values = if width == 8 {
        data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
    } else {
        data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])) as f64).collect()
    };
    Ok(Matrix { rows, cols, data: values })
}

/// Reads a `.npy` file.
pub fn read_npy(path: &Path) -> Result<Matrix> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_npy(&bytes, path)
}

/// The `.npy` (format 1.0) bytes of an f64 matrix.
pub fn npy_bytes(m: &Matrix) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': ({}, {}), }}", m.rows, m.cols);
    // Pad with spaces so that the data starts 64-byte aligned, ending the header with a newline.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    m.data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejections() {
        let m = Matrix { rows: 2, cols: 3, data: vec![1.0, -2.5, 3.0, 1e-300, 0.0, 7.0] };
        let b = npy_bytes(&m);
        assert_eq!(parse_npy(&b, Path::new("m.npy")).expect("parse"), m);
        assert!(parse_npy(&b[..b.len() - 1], Path::new("m.npy")).expect_err("short").message().contains("m.npy"));
        assert!(parse_npy(b"junk", Path::new("j.npy")).is_err());
        let mut i4 = b.clone();
        let at = i4.windows(3).position(|w| w == b"<f8").expect("descr");
        i4[at + 1] = b'i';
        assert!(parse_npy(&i4, Path::new("i.npy")).expect_err("int").message().contains("dtype"));
    }
}
