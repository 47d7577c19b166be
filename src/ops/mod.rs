//! Ops: one folder per family. A family's `mod.rs` is its API: it checks shapes (an `Err` naming
//! both shapes, never a panic), makes the one device dispatch, and records the backward on the
//! tape when an input needs a gradient; `cpu.rs` holds its CPU kernels on slices and `cuda.rs`
//! its launchers of `kernels/<family>.cu` and its GPU path, each the other's twin.

pub mod batchnorm;
pub mod conv;
pub mod elementwise;
#[cfg(feature = "cuda")]
pub(crate) mod gpu;
pub mod indices;
pub mod linear;
pub mod mixmatch;
pub mod mutual_info;
pub mod pool;
pub mod shape;
pub mod softmax;

pub use batchnorm::{batch_norm_eval, batch_norm_train, BatchMoments};
pub use conv::{conv2d, Conv2dParams};
pub use elementwise::{add, dropout, leaky_relu, relu, scale};
pub use indices::Indices;
pub use linear::{linear, matmul};
pub use mutual_info::{mutual_info_loss, mutual_info_loss_across, mutual_info_loss_with_stats, MiStats};
pub use pool::{global_avg_pool, max_pool2d};
pub use shape::{concat_rows, flatten, narrow_rows, reshape};
pub use softmax::{
    cross_entropy, cross_entropy_labels, cross_entropy_pseudo, cross_entropy_soft, log_softmax, mse, softmax,
    PseudoLabelLoss,
};

use crate::error::{Error, Result};
use crate::tensor::{fmt_shape, Tensor};

/// Checks that `x` is a matrix (n x c) and returns (n, c).
pub(crate) fn rows_cols(x: &Tensor, what: &str) -> Result<(usize, usize)> {
    let [n, c] = x.dims::<2>(what)?;
    if c == 0 {
        return Err(Error::shape(format!("{what}: zero columns in shape {}", fmt_shape(x.shape()))));
    }
    Ok((n, c))
}
