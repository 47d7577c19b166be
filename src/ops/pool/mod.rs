//! Max-pool and global average pool.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::tensor::{fmt_shape, Tensor};
use cpu as k;

/// k x k max-pool with stride k (floor), NCHW.
pub fn max_pool2d(tape: &Tape, x: &Tensor, size: usize) -> Result<Tensor> {
    let _p = crate::profile::scope("max_pool.fwd");
    let [n, c, h, w] = x.dims::<4>("max_pool2d input")?;
    if size == 0 || size > h || size > w || size > 15 {
        return Err(Error::shape(format!("max_pool2d: window {size} does not fit input {}", fmt_shape(x.shape()))));
    }
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("max_pool2d", &[x])? {
        return cuda::max_pool2d(gpu, tape, x, size, [n, c, h, w]);
    }
    let (ho, wo) = (h / size, w / size);
    let mut y = crate::pool::take(n * c * ho * wo);
    let mut arg = vec![0u8; y.len()];
    k::maxpool_fwd(x.data()?, n * c, h, w, size, &mut y, &mut arg);
    let out = Tensor::cpu(y, vec![n, c, ho, wo]);
    // The winners' offsets are all the backward reads: holding x itself would keep the
    // activation alive until then.
    let xr = x.identity();
    Ok(tape.record(out, &[x], move |g, grads| {
        let _p = crate::profile::scope("max_pool.bwd");
        let mut dx = crate::pool::take(n * c * h * w);
        k::maxpool_bwd(g.data()?, &arg, n * c, h, w, size, &mut dx);
        grads.add_to_ref(&xr, Tensor::cpu(dx, xr.shape().to_vec()))
    }))
}

/// Mean over H and W: [n, c, h, w] -> [n, c].
pub fn global_avg_pool(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let [n, c, h, w] = x.dims::<4>("global_avg_pool input")?;
    if h * w == 0 {
        return Err(Error::shape(format!("global_avg_pool: empty planes in {}", fmt_shape(x.shape()))));
    }
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("global_avg_pool", &[x])? {
        return cuda::global_avg_pool(gpu, tape, x, [n, c, h, w]);
    }
    let mut y = crate::pool::take(n * c);
    k::avgpool_fwd(x.data()?, h * w, &mut y);
    let out = Tensor::cpu(y, vec![n, c]);
    // The backward needs only x's shape.
    let xr = x.identity();
    Ok(tape.record(out, &[x], move |g, grads| {
        let mut dx = crate::pool::take(n * c * h * w);
        k::avgpool_bwd(g.data()?, h * w, &mut dx);
        grads.add_to_ref(&xr, Tensor::cpu(dx, xr.shape().to_vec()))
    }))
}
