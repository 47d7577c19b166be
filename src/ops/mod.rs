//! Ops: one file per family, forward and backward side by side. Each checks shapes (an `Err`
//! naming both shapes, never a panic), runs the device's kernel, and records its backward on the
//! tape when an input needs a gradient.

mod activation;
mod arith;
mod batchnorm;
mod conv;
#[cfg(feature = "cuda")]
mod cuda;
mod dropout;
mod linear;
mod loss;
mod mutual_info;
mod pool;
mod shape;
mod softmax;

pub use activation::{leaky_relu, relu};
pub use arith::{add, scale};
pub use batchnorm::{batch_norm_act_eval, batch_norm_act_train, batch_norm_eval, batch_norm_train, BatchMoments};
pub use conv::{conv2d, Conv2dParams};
pub use dropout::dropout;
pub use linear::{linear, matmul};
pub use loss::{cross_entropy, cross_entropy_soft, mse};
pub use mutual_info::{mutual_info_loss, mutual_info_loss_with_stats, MiStats};
pub use pool::{global_avg_pool, max_pool2d};
pub use shape::{concat_rows, flatten, narrow_rows, reshape};
pub use softmax::{log_softmax, softmax};

#[cfg(feature = "cuda")]
pub(crate) use cuda::add_assign;

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
