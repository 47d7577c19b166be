//! Plain argument types that kernels of both devices take: a leaf, so
//! that CPU kernels, CUDA launchers and ops import them without importing each other.

crate::error::choice! {
    /// What a convolution's products multiply: f32, or bf16 operands with f32 sums (the 3x3,
    /// stride-1 layers' Winograd products on CPUs with AVX512-BF16; `--precision`).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(into = "String", try_from = "String")]
    pub enum Precision {
        /// f32 operands (the default).
        #[default]
        F32 = "f32",
        /// bf16 operands rounded to nearest even, f32 accumulation; weights stay f32 (master
        /// weights) and every other op stays f32.
        Bf16 = "bf16",
    }
    unknown(s) = crate::error::Error::usage(format!(
        "--precision: unknown precision '{s}' (expected {})",
        crate::error::or_list(&Precision::NAMES)
    ));
}

/// Geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    /// Batch size.
    pub n: usize,
    /// Input channels.
    pub ci: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Output channels.
    pub co: usize,
    /// Kernel height.
    pub kh: usize,
    /// Kernel width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes).
    pub pad: usize,
}

impl ConvShape {
    /// Output height.
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    /// Output width.
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    /// Rows of the im2col matrix (ci * kh * kw).
    pub fn k(&self) -> usize {
        self.ci * self.kh * self.kw
    }
    /// Output pixels per channel.
    pub fn p(&self) -> usize {
        self.ho() * self.wo()
    }
    /// Whether the input itself is the im2col matrix (1x1, stride 1, no padding).
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Elements of the input (and of dX): n x ci x h x w.
    pub fn x_len(&self) -> usize {
        self.n * self.ci * self.h * self.w
    }
    /// Elements of the weights (and of dW): co x ci x kh x kw.
    pub fn w_len(&self) -> usize {
        self.co * self.k()
    }
    /// Elements of the output (and of dY): n x co x ho x wo.
    pub fn y_len(&self) -> usize {
        self.n * self.co * self.p()
    }
    /// Multiply-adds of the forward pass.
    pub fn macs(&self) -> usize {
        self.n * self.co * self.p() * self.k()
    }

    /// W'[ci, co, i, j] = W[co, ci, k-1-i, k-1-j].
    pub fn flip_weights(&self, w: &[f32]) -> Vec<f32> {
        let s = self;
        let (kh, kw) = (s.kh, s.kw);
        let mut out = vec![0.0f32; w.len()];
        for o in 0..s.co {
            for c in 0..s.ci {
                for i in 0..kh {
                    for j in 0..kw {
                        out[((c * s.co + o) * kh + (kh - 1 - i)) * kw + (kw - 1 - j)] =
                            w[((o * s.ci + c) * kh + i) * kw + j];
                    }
                }
            }
        }
        out
    }
}

/// The geometry and constants of one batch norm of an NCHW batch (statistics per channel over N,
/// H and W), with the LeakyReLU that follows it fused when `slope` is given.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormArgs {
    /// Images.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Pixels per plane (H W).
    pub hw: usize,
    /// Added to the variance before the square root.
    pub eps: f32,
    /// Slope of the fused LeakyReLU; None: no activation.
    pub slope: Option<f32>,
}

/// Per-step scalars of one Adam/AdamW update of one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamScalars {
    /// Factor on the parameter before the update: 1 - lr * wd for AdamW, 1 otherwise.
    pub param_scale: f32,
    /// L2 coefficient added to the gradient (Adam's coupled decay), 0 otherwise.
    pub grad_decay: f32,
    /// Weight of the gradient in the first-moment lerp: 1 - beta1.
    pub one_minus_beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// Weight of the squared gradient in the second moment: 1 - beta2.
    pub one_minus_beta2: f32,
    /// lr / (1 - beta1^t).
    pub step_size: f32,
    /// sqrt(1 - beta2^t).
    pub bias_correction2_sqrt: f32,
    /// Added to the denominator.
    pub eps: f32,
}

impl AdamScalars {
    /// The scalars of step `step` (1-based, already incremented, as PyTorch counts); `decoupled`
    /// selects AdamW's decay of the parameter over Adam's decay added to the gradient.
    pub fn new(
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        decoupled: bool,
        step: u64,
    ) -> AdamScalars {
        let (lr, b1, b2, wd) = (lr as f64, beta1 as f64, beta2 as f64, weight_decay as f64);
        // powi takes an i32; beyond that range beta^t has long underflowed to 0 anyway.
        let t = step.min(i32::MAX as u64) as i32;
        let bias_correction1 = 1.0 - b1.powi(t);
        let bias_correction2 = 1.0 - b2.powi(t);
        AdamScalars {
            param_scale: if decoupled { (1.0 - lr * wd) as f32 } else { 1.0 },
            grad_decay: if decoupled { 0.0 } else { weight_decay },
            one_minus_beta1: (1.0 - b1) as f32,
            beta2,
            one_minus_beta2: (1.0 - b2) as f32,
            step_size: (lr / bias_correction1) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps,
        }
    }
}

/// Per-step scalars of one SGD update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdScalars {
    /// Learning rate of this step.
    pub lr: f32,
    /// Momentum factor (dampening is 0).
    pub momentum: f32,
    /// L2 coefficient added to the gradient.
    pub weight_decay: f32,
    /// Nesterov's look-ahead: the update uses g + momentum * buf instead of buf.
    pub nesterov: bool,
}

/// A batch buffer shared by parallel tasks that each write a disjoint slice of it.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);
// SAFETY: users only form disjoint slices from it (see `slice`).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl SyncPtr {
    /// The base pointer (a method, so closures capture the whole Sync wrapper).
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }

    /// A mutable view of `len` elements at `offset`.
    ///
    /// # Safety
    /// No two live views overlap, and the buffer outlives the view.
    pub(crate) unsafe fn slice<'a>(self, offset: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(offset), len)
    }
}

/// A per-channel affine and LeakyReLU of a convolution's input, applied as a kernel reads x
/// (the Winograd weight gradient's input transform): act(x scale[c] + shift[c]), batch norm's `normalize_plane` arithmetic (a
/// product, then a sum, each rounded; then `slope` z where z <= 0), so the transform sees the
/// bits of the batch-normalised tensor without anyone writing that tensor out.
#[derive(Clone, Copy, Debug)]
pub struct InputAffine<'a> {
    /// Per input channel factor.
    pub scale: &'a [f32],
    /// Per input channel offset.
    pub shift: &'a [f32],
    /// LeakyReLU slope, when the activation is fused.
    pub slope: Option<f32>,
}
