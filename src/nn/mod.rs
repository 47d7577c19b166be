//! Layers and models, with PyTorch's parameter and buffer names and initialisation.

mod init;
mod layers;
mod param;
mod sequential;
mod wrn;

pub use init::Init;
pub use layers::{BatchNorm2d, Conv2d, ForwardCtx, Linear};
pub use param::{Module, Role};
pub use sequential::{cnn13_plan, convnet_plan, Block, Layer, Sequential};
pub use wrn::WideResNet;

use crate::autograd::Tape;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{fmt_shape, Tensor};
use std::fmt;
use std::str::FromStr;

/// Which architecture (config.json spells it by name, as the CLI does; the width is its own option).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum ModelKind {
    /// The CPU-sized conv net with base width `width`.
    ConvNet {
        /// Channels of the first stage (32 by default).
        width: usize,
    },
    /// WRN-28-2.
    Wrn28x2,
    /// Mean Teacher's conv-large.
    Cnn13,
}

impl FromStr for ModelKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<ModelKind> {
        match s {
            "convnet" => Ok(ModelKind::ConvNet { width: 32 }),
            "wrn-28-2" | "wrn28-2" => Ok(ModelKind::Wrn28x2),
            "cnn13" | "cnn-13" => Ok(ModelKind::Cnn13),
            _ => Err(Error::usage(format!("--model: unknown model '{s}' (expected convnet, wrn-28-2 or cnn13)"))),
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelKind::ConvNet { .. } => f.write_str("convnet"),
            ModelKind::Wrn28x2 => f.write_str("wrn-28-2"),
            ModelKind::Cnn13 => f.write_str("cnn13"),
        }
    }
}

crate::error::string_conversions!(ModelKind);

/// An architecture and the input and output sizes it is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// Architecture.
    pub kind: ModelKind,
    /// Input channels.
    pub in_channels: usize,
    /// Input height.
    pub height: usize,
    /// Input width.
    pub width: usize,
    /// Number of outputs (classes, or clusters for pre-training).
    pub classes: usize,
}

#[derive(Clone, Debug)]
enum Net {
    Seq(Sequential),
    Wrn(Box<WideResNet>),
}

/// A model: an architecture with its parameters and buffers.
#[derive(Clone, Debug)]
pub struct Model {
    spec: ModelSpec,
    net: Net,
    device: Device,
}

/// Init stream key purpose.
const INIT: u64 = 0x1417;

impl Model {
    /// A freshly initialised model; the weights are a pure function of `seed`.
    pub fn new(spec: ModelSpec, seed: u64) -> Result<Model> {
        if spec.in_channels == 0 || spec.classes == 0 {
            return Err(Error::usage(format!("model {}: zero input channels or classes", spec.kind)));
        }
        let min_side = match spec.kind {
            ModelKind::ConvNet { .. } => 4,
            ModelKind::Wrn28x2 => 4,
            ModelKind::Cnn13 => 12,
        };
        if spec.height < min_side || spec.width < min_side {
            return Err(Error::usage(format!(
                "model {}: input {}x{} is smaller than {min_side}x{min_side}",
                spec.kind, spec.height, spec.width
            )));
        }
        let mut rng = Rng::keyed(seed, &[INIT]);
        let net = match spec.kind {
            ModelKind::ConvNet { width } => {
                if width == 0 {
                    return Err(Error::usage("--width: must be at least 1"));
                }
                Net::Seq(Sequential::build(spec.in_channels, spec.classes, &convnet_plan(width), &mut rng))
            }
            ModelKind::Cnn13 => Net::Seq(Sequential::build(spec.in_channels, spec.classes, &cnn13_plan(), &mut rng)),
            ModelKind::Wrn28x2 => Net::Wrn(Box::new(WideResNet::new(spec.in_channels, spec.classes, 28, 2, &mut rng))),
        };
        Ok(Model { spec, net, device: Device::Cpu })
    }

    /// What the model was built for.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Where the parameters live (and where `forward` runs).
    pub fn device(&self) -> Device {
        self.device
    }

    /// Moves the parameters and buffers to `device` (identities kept). The batch counters of
    /// batch norm stay on the host: they are bookkeeping, never an operand of a kernel.
    pub fn to_device(&mut self, device: Device) -> Result<()> {
        self.try_visit_mut(&mut |name, role, t| {
            if role != Role::NumBatchesTracked {
                *t = t.to_device(device).map_err(|e| e.context(format!("moving {name} to {device}")))?;
            }
            Ok(())
        })?;
        self.device = device;
        Ok(())
    }

    /// Logits [n, classes] for images [n, c, h, w] (uploaded first when the model is on a GPU).
    pub fn forward(&mut self, tape: &Tape, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let [_, c, h, w] = x.dims::<4>("model input")?;
        if (c, h, w) != (self.spec.in_channels, self.spec.height, self.spec.width) {
            return Err(Error::shape(format!(
                "model {} expects images of {}x{}x{}, got input {}",
                self.spec.kind,
                self.spec.in_channels,
                self.spec.height,
                self.spec.width,
                fmt_shape(x.shape())
            )));
        }
        let x = x.to_device(self.device)?;
        match &mut self.net {
            Net::Seq(s) => s.forward(tape, &x, ctx),
            Net::Wrn(m) => m.forward(tape, &x, ctx),
        }
    }

    /// Copies every named tensor of `other` (same architecture) into this model.
    pub fn load_from(&mut self, other: &Model) -> Result<()> {
        let mut src = Vec::new();
        other.visit(&mut |name, _, t| src.push((name.to_string(), t.clone())));
        load_named(self, &src)
    }
}

/// Writes `tensors` (name, value) into `model`'s tensors of the same names; every model tensor
/// must be present with the same shape. Values are copied, identities kept.
pub fn load_named(model: &mut dyn Module, tensors: &[(String, Tensor)]) -> Result<()> {
    let map: std::collections::HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    model.try_visit_mut(&mut |name, _, dst| match map.get(name) {
        None => Err(Error::format(format!("missing tensor '{name}'"))),
        Some(src) if src.shape() != dst.shape() => Err(Error::format(format!(
            "tensor '{name}': shape {} does not fit the model's {}",
            fmt_shape(src.shape()),
            fmt_shape(dst.shape())
        ))),
        Some(src) => dst.assign(src),
    })
}

impl Module for Model {
    fn visit(&self, f: &mut dyn FnMut(&str, Role, &Tensor)) {
        match &self.net {
            Net::Seq(s) => s.visit(f),
            Net::Wrn(m) => m.visit(f),
        }
    }
    fn visit_mut(&mut self, f: &mut dyn FnMut(&str, Role, &mut Tensor)) {
        match &mut self.net {
            Net::Seq(s) => s.visit_mut(f),
            Net::Wrn(m) => m.visit_mut(f),
        }
    }
}
