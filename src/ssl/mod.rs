//! Training objectives: the loss of one step for each method. They see batches of tensors and a
//! model, never a data format.

mod fixmatch;
mod mixmatch;
mod muscle;
mod pretrain;
mod supervised;

pub use fixmatch::fixmatch_loss;
pub use mixmatch::{mixmatch_loss, mixup_draw};
pub use muscle::muscle_loss;
pub use pretrain::pretrain_loss;
pub use supervised::supervised_loss;

use crate::autograd::Tape;
use crate::data::StepBatch;
use crate::error::{choice, Error, Result};
use crate::nn::{ForwardCtx, Model};
use crate::ops::Indices;
use crate::tensor::Tensor;

choice! {
    /// Which objective trains the model (config.json spells it as the CLI does).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(into = "String", try_from = "String")]
    pub enum Method {
        /// Cross-entropy on the labeled batch only (the baseline).
        Supervised = "supervised",
        /// Stand-alone MUSCLE: supervised loss + w_mi * IIC loss between two views of unlabeled images.
        Muscle = "muscle",
        /// MixMatch: label guessing, sharpening, MixUp, L_X + w_u L_U.
        MixMatch = "mixmatch",
        /// MixMatch + w_mi * IIC loss between the two label-guessing views (the paper's "incorporated").
        MixMatchMuscle = "mixmatch-muscle",
        /// FixMatch: cross-entropy of a strong view against the weak view's confident pseudo-label.
        FixMatch = "fixmatch",
        /// FixMatch + w_mi * IIC loss between the weak and the strong view.
        FixMatchMuscle = "fixmatch-muscle",
        /// Unsupervised pre-training: the IIC loss alone (`muscle pretrain`).
        Pretrain = "pretrain",
    }
    unknown(s) = Error::usage(format!(
        "--method: unknown method '{s}' (expected {})",
        Method::TRAIN.map(Method::name).join(", ")
    ));
}

impl Method {
    /// The methods `--method` offers: all but `pretrain`, which has its own command.
    pub const TRAIN: [Method; 6] = [
        Method::Supervised,
        Method::Muscle,
        Method::MixMatch,
        Method::MixMatchMuscle,
        Method::FixMatch,
        Method::FixMatchMuscle,
    ];

    /// Whether the method reads unlabeled batches.
    pub fn uses_unlabeled(self) -> bool {
        !matches!(self, Method::Supervised)
    }

    /// Whether the method is FixMatch's (a weak and a strong view, pseudo-labels).
    pub fn is_fixmatch(self) -> bool {
        matches!(self, Method::FixMatch | Method::FixMatchMuscle)
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
    /// The host method's unlabeled-loss weight w_u: MixMatch's maximum (75 for CIFAR-10),
    /// FixMatch's lambda_u (1, not ramped).
    pub w_u: f32,
    /// FixMatch's confidence threshold tau of the pseudo-labels.
    pub tau: f32,
    /// The processes of a data-parallel run (the MI term's joint is summed over them).
    pub world: &'static crate::dist::World,
    /// Batch norm's statistics over the whole batch of the processes (`--sync-bn`).
    pub sync_bn: bool,
    /// What the training forward's (and backward's) convolution products multiply.
    pub precision: crate::kernel_args::Precision,
    /// MixMatch's sharpening temperature T.
    pub temperature: f32,
    /// MixMatch's Beta(alpha, alpha) for MixUp.
    pub mixup_alpha: f32,
}

impl ObjectiveConfig {
    /// The training forward's context at `step` (with the processes to synchronise batch norm
    /// over when `sync_bn` is set and there are several).
    pub fn forward_ctx(&self, seed: u64, step: u64) -> ForwardCtx {
        let sync_bn = Some(self.world).filter(|w| self.sync_bn && w.size() > 1);
        ForwardCtx { sync_bn, precision: self.precision, ..ForwardCtx::train(seed, step) }
    }
}

/// The loss of one step: the total to differentiate and its terms (for logging), as tensors on
/// the model's device, so reading them is one transfer ([`LossTerms::values`]).
pub struct LossTerms {
    /// The scalar to differentiate.
    pub total: Tensor,
    /// Supervised term (None when the method has none: pre-training). A clone of `total` for
    /// the supervised baseline, so logging reads it from the same one download.
    pub sup: Option<Tensor>,
    /// MI term, unweighted (None when the method has none).
    pub mi: Option<Tensor>,
    /// The host method's unsupervised term (MixMatch's L_U; None otherwise).
    pub host: Option<Tensor>,
    /// Weight applied to the MI term this step.
    pub w_mi: f32,
    /// Weight applied to the host term this step (MixMatch's ramped w_u, FixMatch's lambda_u).
    pub w_u: f32,
    /// FixMatch's pseudo-label diagnostics (None for the other methods).
    pub pseudo: Option<PseudoLabelStats>,
}

/// FixMatch's pseudo-label diagnostics of one step, as scalars on the model's device.
pub struct PseudoLabelStats {
    /// Fraction of the unlabeled images whose weak prediction reached tau (the mask rate).
    pub kept: Tensor,
    /// Fraction of the unlabeled images kept with a pseudo-label equal to their true label.
    pub right: Tensor,
}

/// The values of a step's loss terms on the host (0 for a term the method has none of).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TermValues {
    /// The total.
    pub total: f32,
    /// Supervised term.
    pub sup: f32,
    /// MI term (unweighted).
    pub mi: f32,
    /// The host method's unsupervised term.
    pub host: f32,
}

impl LossTerms {
    /// The terms' values, copied to the host together (one download on a GPU).
    pub fn values(&self) -> Result<TermValues> {
        let terms = [Some(&self.total), self.sup.as_ref(), self.mi.as_ref(), self.host.as_ref()];
        let present: Vec<&Tensor> = terms.iter().flatten().copied().collect();
        let mut got = Tensor::scalars_to_host(&present)?.into_iter();
        let mut next = |t: Option<&Tensor>| t.and_then(|_| got.next()).unwrap_or(0.0);
        let [total, sup, mi, host] = terms.map(&mut next);
        Ok(TermValues { total, sup, mi, host })
    }
}

/// What every objective computes one step's loss from.
#[derive(Clone, Copy)]
pub struct StepInput<'a> {
    /// The tape the loss is recorded on.
    pub tape: &'a Tape,
    /// The step's batch.
    pub batch: &'a StepBatch,
    /// The step (keys dropout masks and random draws, and drives the ramp-ups).
    pub step: u64,
    /// The run seed (keys dropout masks and random draws).
    pub seed: u64,
    /// The index vectors of [`upload_indices`], on the batch's device (empty when the caller
    /// uploaded none; the objective then makes its own).
    pub indices: &'a [Indices],
}

impl StepInput<'_> {
    /// The first two unlabeled views of the batch, or a usage error naming `method`.
    fn two_views(&self, method: &str) -> Result<[&Tensor; 2]> {
        match self.batch.views.as_slice() {
            [a, b, ..] => Ok([a, b]),
            _ => Err(Error::usage(format!("{method} needs two unlabeled views per step"))),
        }
    }
}

/// The index vectors the objective of `cfg` will need at `step`, known before the batch goes to
/// the device so they travel in its one upload: MixUp's permutation for the MixMatch methods.
pub fn upload_indices(cfg: &ObjectiveConfig, batch: &StepBatch, step: u64, seed: u64) -> Vec<Vec<usize>> {
    match cfg.method {
        Method::MixMatch | Method::MixMatchMuscle => {
            let n = batch.labels.len() + 2 * batch.views.first().map_or(0, |v| v.shape()[0]);
            vec![mixup_draw(seed, step, cfg.mixup_alpha as f64, n).1]
        }
        // The true labels that score the pseudo-labels.
        Method::FixMatch | Method::FixMatchMuscle => vec![batch.unlabeled_labels.clone()],
        _ => Vec::new(),
    }
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
    step_loss_with(cfg, model, StepInput { tape, batch, step, seed, indices: &[] })
}

/// [`step_loss`] with the index vectors of [`upload_indices`] already on the batch's device.
pub fn step_loss_with(cfg: &ObjectiveConfig, model: &mut Model, input: StepInput<'_>) -> Result<LossTerms> {
    match cfg.method {
        Method::Supervised => supervised_loss(cfg, model, &input),
        Method::Muscle => muscle_loss(cfg, model, &input),
        Method::MixMatch | Method::MixMatchMuscle => mixmatch_loss(cfg, model, &input),
        Method::FixMatch | Method::FixMatchMuscle => fixmatch_loss(cfg, model, &input),
        Method::Pretrain => pretrain_loss(cfg, model, &input),
    }
}
