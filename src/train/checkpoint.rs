//! Safetensors files: written by us in a fixed order (identical runs give identical bytes),
//! read through the `safetensors` crate's validating parser, replaced atomically on disk.

use crate::error::{Error, Result};
use crate::npy::{self, Matrix};
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// The values of one stored tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// 64-bit integers (BN's num_batches_tracked, counters).
    I64(Vec<i64>),
    /// 64-bit floats (reference computations).
    F64(Vec<f64>),
}

/// A named tensor of a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// PyTorch-style name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub values: Values,
}

impl Entry {
    /// An f32 entry from a tensor.
    pub fn f32(name: impl Into<String>, t: &Tensor) -> Result<Entry> {
        Ok(Entry { name: name.into(), shape: t.shape().to_vec(), values: Values::F32(t.to_vec()?) })
    }
    /// An int64 entry from a tensor of integral values (BN counters).
    pub fn i64(name: impl Into<String>, t: &Tensor) -> Result<Entry> {
        let v = t.to_vec()?.iter().map(|&x| x as i64).collect();
        Ok(Entry { name: name.into(), shape: t.shape().to_vec(), values: Values::I64(v) })
    }
    /// The values as an f32 tensor (int64 converted).
    pub fn to_tensor(&self) -> Result<Tensor> {
        let data = match &self.values {
            Values::F32(v) => v.clone(),
            Values::I64(v) => v.iter().map(|&x| x as f32).collect(),
            Values::F64(v) => v.iter().map(|&x| x as f32).collect(),
        };
        Tensor::from_vec(data, &self.shape)
    }
}

/// A checkpoint: tensors in a fixed order and string metadata.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Checkpoint {
    /// Tensors, in the order written.
    pub entries: Vec<Entry>,
    /// Metadata (sorted by key when written).
    pub metadata: BTreeMap<String, String>,
}

impl Checkpoint {
    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// A metadata value, or an error naming the key and `path`.
    pub fn meta(&self, key: &str, path: &Path) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| Error::format(format!("{}: checkpoint metadata has no '{key}'", path.display())))
    }

    /// The safetensors bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut header = String::from("{");
        if !self.metadata.is_empty() {
            let m = serde_json::to_string(&self.metadata).unwrap_or_else(|_| "{}".into());
            header.push_str(&format!("\"__metadata__\":{m},"));
        }
        let mut offset = 0usize;
        for (i, e) in self.entries.iter().enumerate() {
            let (dtype, bytes) = match &e.values {
                Values::F32(v) => ("F32", v.len() * 4),
                Values::I64(v) => ("I64", v.len() * 8),
                Values::F64(v) => ("F64", v.len() * 8),
            };
            let name = serde_json::to_string(&e.name).unwrap_or_else(|_| "\"?\"".into());
            header.push_str(&format!(
                "{}{name}:{{\"dtype\":\"{dtype}\",\"shape\":{:?},\"data_offsets\":[{offset},{}]}}",
                if i == 0 { "" } else { "," },
                e.shape,
                offset + bytes
            ));
            offset += bytes;
        }
        header.push('}');
        // The format pads the header with spaces so the data starts 8-byte aligned.
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let mut out = Vec::with_capacity(8 + header.len() + offset);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for e in &self.entries {
            match &e.values {
                Values::F32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Values::I64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                Values::F64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            }
        }
        out
    }

    /// Parses safetensors bytes (F32 and I64 tensors); `path` names the file in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Checkpoint> {
        let bad =
            |e: &dyn std::fmt::Display| Error::format(format!("{}: not a valid safetensors file: {e}", path.display()));
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(&e))?;
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(&e))?;
        let mut entries = Vec::new();
        // Keep the file's own order (by data offset) so a read-write round trip is byte-identical.
        let mut views = st.tensors();
        let order: std::collections::HashMap<String, usize> =
            meta.tensors().iter().map(|(n, info)| (n.clone(), info.data_offsets.0)).collect();
        views.sort_by_key(|(n, _)| order.get(n).copied().unwrap_or(usize::MAX));
        for (name, view) in views {
            let data = view.data();
            let values = match view.dtype() {
                safetensors::Dtype::F32 => {
                    Values::F32(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
                }
                safetensors::Dtype::I64 => Values::I64(
                    data.chunks_exact(8)
                        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                        .collect(),
                ),
                safetensors::Dtype::F64 => Values::F64(
                    data.chunks_exact(8)
                        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                        .collect(),
                ),
                other => {
                    return Err(bad(&format!("tensor '{name}' has dtype {other:?}; only F32, F64 and I64 are read")))
                }
            };
            entries.push(Entry { name, shape: view.shape().to_vec(), values });
        }
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(Checkpoint { entries, metadata })
    }

    /// Reads a checkpoint file.
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let bytes = crate::memory::read_file(path)?;
        Checkpoint::from_bytes(&bytes, path)
    }

    /// Writes atomically: a temporary file in the same folder, synced, then renamed over `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes())
    }
}

/// Reads an n x C matrix (logits, for `muscle mi`) from a .npy file, or from the single 2-d f32 or
/// f64 tensor of a .safetensors file.
pub fn read_matrix(path: &Path) -> Result<Matrix> {
    if path.extension().is_some_and(|e| e == "npy") {
        return npy::read_npy(path);
    }
    let ck = Checkpoint::load(path)?;
    let [e] = ck.entries.as_slice() else {
        return Err(Error::format(format!(
            "{}: expected exactly one tensor, found {}",
            path.display(),
            ck.entries.len()
        )));
    };
    let [rows, cols] = e.shape[..] else {
        return Err(Error::format(format!(
            "{}: tensor '{}' of shape {:?} is not 2-d",
            path.display(),
            e.name,
            e.shape
        )));
    };
    let data = match &e.values {
        Values::F64(v) => v.clone(),
        Values::F32(v) => v.iter().map(|&x| x as f64).collect(),
        Values::I64(_) => {
            return Err(Error::format(format!("{}: tensor '{}' is not f32 or f64", path.display(), e.name)))
        }
    };
    Ok(Matrix { rows, cols, data })
}

/// Writes `bytes` to `path` so that a crash or a full disk leaves either the old file or the new
/// one (and no temporary file after an error).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| Error::usage(format!("{}: not a file path", path.display())))?;
    // One temporary name per process and call: two workers (or threads) writing the same file at
    // once (a shared sweep's tables) must not write into, or rename away, each other's file.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.{}-{call}.tmp", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        crate::fault::write_all(&mut f, bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Sync the directory so the rename itself survives a power loss.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e: std::io::Error| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_byte_identical_and_validated() {
        let mut ck = Checkpoint::default();
        ck.entries.push(Entry {
            name: "b.weight".into(),
            shape: vec![2, 2],
            values: Values::F32(vec![1.0, -2.0, 3.5, 0.0]),
        });
        ck.entries.push(Entry { name: "a.num_batches_tracked".into(), shape: vec![], values: Values::I64(vec![7]) });
        ck.metadata.insert("model".into(), "convnet".into());
        ck.metadata.insert("classes".into(), "10".into());
        let bytes = ck.to_bytes();
        let back = Checkpoint::from_bytes(&bytes, Path::new("x")).expect("parse");
        assert_eq!(back, ck);
        assert_eq!(back.to_bytes(), bytes);
        // Truncated and garbage inputs are errors that name the file, not panics.
        for bad in [&bytes[..bytes.len() - 3], &bytes[..5], b"\xff\xff\xff\xff\xff\xff\xff\x7fjunk".as_slice()] {
            let e = Checkpoint::from_bytes(bad, Path::new("ck.safetensors")).expect_err("must fail");
            assert!(e.message().contains("ck.safetensors"), "{e}");
        }
    }
}
