//! Training objectives: the loss of one step for each method. They see batches of tensors and a
//! model, never a data format.

mod muscle;
mod supervised;

pub use muscle::muscle_loss;
pub use supervised::supervised_loss;

use crate::autograd::Tape;
use crate::data::StepBatch;
use crate::error::{Error, Result};
use crate::nn::Model;
use crate::tensor::Tensor;
use std::fmt;
use std::str::FromStr;

/// Which objective trains the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Cross-entropy on the labeled batch only (the baseline).
    Supervised,
    /// Stand-alone MUSCLE: supervised loss + w_mi * IIC loss between two views of unlabeled images.
    Muscle,
}

impl Method {
    /// Every method, as the CLI spells them.
    pub const ALL: [&'static str; 2] = ["supervised", "muscle"];

    /// Whether the method reads unlabeled batches.
    pub fn uses_unlabeled(self) -> bool {
        !matches!(self, Method::Supervised)
    }
}

impl FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        match s {
            "supervised" => Ok(Method::Supervised),
            "muscle" => Ok(Method::Muscle),
            _ => Err(Error::usage(format!("--method: unknown method '{s}' (expected {})", Method::ALL.join(", ")))),
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Supervised => "supervised",
            Method::Muscle => "muscle",
        })
    }
}

/// Hyper-parameters of the objective.
#[derive(Clone, Debug)]
pub struct ObjectiveConfig {
    /// The method.
    pub method: Method,
    /// Maximum weight of the MI term.
    pub w_mi: f32,
    /// IIC's lambda (1 = mutual information; > 1 weighs the marginal entropy more).
    pub lambda: f32,
    /// Steps of the linear ramp-up of the unsupervised weights.
    pub ramp_steps: u64,
    /// Also feed the labeled images' two views into the MI term.
    pub mi_labeled: bool,
}

/// The loss of one step: the total to differentiate and its terms (for logging).
pub struct LossTerms {
    /// The scalar to differentiate.
    pub total: Tensor,
    /// Supervised term.
    pub sup: f32,
    /// MI term (unweighted; 0 when the method has none).
    pub mi: f32,
    /// Weight applied to the MI term this step.
    pub w_mi: f32,
}

/// The loss of `method` at `step` for one batch, recorded on `tape`.
pub fn step_loss(
    cfg: &ObjectiveConfig,
    model: &mut Model,
    tape: &Tape,
    batch: &StepBatch,
    step: u64,
    seed: u64,
) -> Result<LossTerms> {
    match cfg.method {
        Method::Supervised => supervised_loss(model, tape, batch, step, seed),
        Method::Muscle => muscle_loss(cfg, model, tape, batch, step, seed),
    }
}
