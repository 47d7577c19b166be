//! `muscle eval`: a checkpoint's accuracy on a data set's test split, as one JSON line.

use crate::data::{self, Augment, DatasetKind};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::train::{self, TrainConfig};
use std::path::PathBuf;

/// The options of `muscle eval`.
#[derive(Clone, Debug, clap::Args)]
pub struct EvalArgs {
    /// checkpoint.safetensors written by `muscle train`.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Data set format (as for train).
    #[arg(long, default_value = "fashion-mnist")]
    pub dataset: String,
    /// Folder with the data set; without it, the embedded Fashion-MNIST test images.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Compute device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `muscle eval`: rebuilds the model from the checkpoint alone, evaluates it and prints the
/// accuracy and per-class accuracy as JSON.
pub fn command(a: &EvalArgs) -> Result<()> {
    let device: Device = a.device.parse()?;
    device.check_available()?;
    crate::cpu::set_threads(a.threads.unwrap_or_else(|| TrainConfig::DEFAULT.threads()))?;
    let (mut model, info) = train::model_from_checkpoint(&a.checkpoint)?;
    model.to_device(device)?;
    let kind: DatasetKind = a.dataset.parse()?;
    let test = match &a.data {
        None => data::embedded()?.test,
        Some(dir) => data::load(kind, dir, None, None)?.test,
    };
    if (test.channels, test.height, test.width, test.classes)
        != (info.spec.in_channels, info.spec.height, info.spec.width, info.spec.classes)
    {
        return Err(Error::format(format!(
            "{}: the checkpoint's model takes {}x{}x{} images and {} classes; {} has {}x{}x{} and {}",
            a.checkpoint.display(),
            info.spec.in_channels,
            info.spec.height,
            info.spec.width,
            info.spec.classes,
            test.name,
            test.channels,
            test.height,
            test.width,
            test.classes
        )));
    }
    let aug = Augment::normalize_only(info.mean.clone(), info.std.clone());
    let r = train::evaluate(&mut model, &test, None, &aug, 500)?;
    println!(
        "{}",
        serde_json::json!({"checkpoint": a.checkpoint.display().to_string(), "dataset": test.name, "images": r.images, "test_accuracy": r.accuracy, "per_class_accuracy": r.per_class_accuracy})
    );
    Ok(())
}
