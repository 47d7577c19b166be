//! Models to and from checkpoint files: PyTorch state_dict names, and metadata that lets
//! `muscle eval` rebuild the model and its input normalisation from the file alone.

use super::checkpoint::{Checkpoint, Entry};
use super::config::TrainConfig;
use crate::data::{Augment, Dataset};
use crate::error::{Error, Result};
use crate::nn::{load_named, Model, ModelKind, ModelSpec, Module, Role};
use std::path::Path;

/// What a checkpoint says about its model and data.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointInfo {
    /// Architecture and sizes.
    pub spec: ModelSpec,
    /// Per-channel normalisation mean.
    pub mean: Vec<f32>,
    /// Per-channel normalisation std.
    pub std: Vec<f32>,
    /// Training data set name.
    pub dataset: String,
    /// Class names.
    pub class_names: Vec<String>,
    /// Steps trained.
    pub step: u64,
}

impl CheckpointInfo {
    /// The info of a run at `step`.
    pub fn new(train: &Dataset, aug: &Augment, step: u64, cfg: &TrainConfig) -> CheckpointInfo {
        CheckpointInfo {
            spec: ModelSpec {
                kind: cfg.model_kind(),
                in_channels: train.channels,
                height: train.height,
                width: train.width,
                classes: train.classes,
            },
            mean: aug.mean.clone(),
            std: aug.std.clone(),
            dataset: train.name.clone(),
            class_names: train.class_names.clone(),
            step,
        }
    }
}

/// The model's tensors under PyTorch names (BN counters as int64) with the metadata of `info`.
pub fn checkpoint_of(model: &Model, info: &CheckpointInfo) -> Result<Checkpoint> {
    let mut ck = Checkpoint::default();
    let mut err = None;
    model.visit(&mut |name, role, t| {
        let e = if role == Role::NumBatchesTracked { Entry::i64(name, t) } else { Entry::f32(name, t) };
        match e {
            Ok(e) => ck.entries.push(e),
            Err(e) => err = Some(e),
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    let s = &info.spec;
    let width = match s.kind {
        ModelKind::ConvNet { width } => width,
        _ => 0,
    };
    let m = &mut ck.metadata;
    m.insert("format".into(), "muscle-checkpoint-1".into());
    m.insert("model".into(), s.kind.to_string());
    m.insert("model_width".into(), width.to_string());
    m.insert("classes".into(), s.classes.to_string());
    m.insert("input_shape".into(), format!("[{}, {}, {}]", s.in_channels, s.height, s.width));
    m.insert("normalize_mean".into(), serde_json::to_string(&info.mean).unwrap_or_default());
    m.insert("normalize_std".into(), serde_json::to_string(&info.std).unwrap_or_default());
    m.insert("dataset".into(), info.dataset.clone());
    m.insert("class_names".into(), serde_json::to_string(&info.class_names).unwrap_or_default());
    m.insert("step".into(), info.step.to_string());
    Ok(ck)
}

fn parse<T: serde::de::DeserializeOwned>(ck: &Checkpoint, key: &str, path: &Path) -> Result<T> {
    let raw = ck.meta(key, path)?;
    serde_json::from_str(raw).map_err(|e| {
        Error::format(format!("{}: checkpoint metadata '{key}' = '{raw}' is invalid: {e}", path.display()))
    })
}

/// Loads a checkpoint's weights into `model` for fine-tuning: every tensor must be present with
/// the same shape, except the classifier head (`fc.*`), which keeps its fresh initialisation when
/// its size differs (a pre-training head with another number of clusters).
pub fn init_from_checkpoint(model: &mut Model, path: &Path) -> Result<()> {
    let ck = Checkpoint::load(path)?;
    let kind = ck.meta("model", path)?;
    if kind != model.spec().kind.to_string() {
        return Err(Error::format(format!(
            "{}: a checkpoint of model '{kind}' cannot initialise a '{}'",
            path.display(),
            model.spec().kind
        )));
    }
    let mut named = Vec::new();
    let mut err = None;
    model.visit(&mut |name, _, t| {
        let found = ck.get(name);
        match found {
            Some(e) if e.shape == t.shape() => match e.to_tensor() {
                Ok(v) => named.push((name.to_string(), v)),
                Err(x) => err = Some(x),
            },
            Some(_) | None if name.starts_with("fc.") => named.push((name.to_string(), t.clone())),
            Some(e) => {
                err = Some(Error::format(format!(
                    "{}: tensor '{name}' has shape {:?}, the model needs {:?}",
                    path.display(),
                    e.shape,
                    t.shape()
                )))
            }
            None => err = Some(Error::format(format!("{}: no tensor '{name}'", path.display()))),
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    load_named(model, &named)
}

/// Rebuilds the model a checkpoint file holds (weights loaded) and its metadata.
pub fn model_from_checkpoint(path: &Path) -> Result<(Model, CheckpointInfo)> {
    let ck = Checkpoint::load(path)?;
    let mut kind: ModelKind =
        ck.meta("model", path)?.parse().map_err(|e: Error| Error::format(format!("{}: {e}", path.display())))?;
    if let ModelKind::ConvNet { width } = &mut kind {
        *width = parse(&ck, "model_width", path)?;
    }
    let [in_channels, height, width]: [usize; 3] = parse(&ck, "input_shape", path)?;
    let spec = ModelSpec { kind, in_channels, height, width, classes: parse(&ck, "classes", path)? };
    let info = CheckpointInfo {
        spec,
        mean: parse(&ck, "normalize_mean", path)?,
        std: parse(&ck, "normalize_std", path)?,
        dataset: ck.meta("dataset", path)?.to_string(),
        class_names: parse(&ck, "class_names", path)?,
        step: parse(&ck, "step", path)?,
    };
    let mut model = Model::new(spec, 0).map_err(|e| Error::format(format!("{}: {e}", path.display())))?;
    let named = ck.entries.iter().map(|e| Ok((e.name.clone(), e.to_tensor()?))).collect::<Result<Vec<_>>>()?;
    load_named(&mut model, &named).map_err(|e| Error::format(format!("{}: {e}", path.display())))?;
    Ok((model, info))
}
