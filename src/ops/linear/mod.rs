//! Matrix product and the dense layer.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use super::rows_cols;
use crate::autograd::Tape;
use crate::cpu::gemm::{sgemm, Mat};
use crate::cpu::threads;
use crate::error::{Error, Result};
use crate::tensor::{fmt_shape, Tensor};

/// a [m, k] @ b [k, n].
pub fn matmul(tape: &Tape, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let [m, k] = a.dims::<2>("matmul lhs")?;
    let [k2, n] = b.dims::<2>("matmul rhs")?;
    if k != k2 {
        return Err(Error::shape(format!(
            "matmul: inner dimensions differ: {} @ {}",
            fmt_shape(a.shape()),
            fmt_shape(b.shape())
        )));
    }
    product(tape, "matmul", a, b, None, Product { m, k, n, rhs_t: false })
}

/// x [n, in] @ w[out, in]^T + b [out] (PyTorch's nn.Linear layout).
pub fn linear(tape: &Tape, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (n, fin) = rows_cols(x, "linear input")?;
    let [fout, fin2] = w.dims::<2>("linear weight")?;
    if fin != fin2 {
        return Err(Error::shape(format!(
            "linear: input {} does not fit weight {}",
            fmt_shape(x.shape()),
            fmt_shape(w.shape())
        )));
    }
    if let Some(b) = b {
        if b.shape() != [fout] {
            return Err(Error::shape(format!(
                "linear: bias {} does not fit weight {}",
                fmt_shape(b.shape()),
                fmt_shape(w.shape())
            )));
        }
    }
    product(tape, "linear", x, w, b, Product { m: n, k: fin, n: fout, rhs_t: true })
}

/// The sizes of `a [m, k] @ B (+ bias [n])`, where the right operand `b` is stored as `B` [k, n]
/// (`matmul`) or, when `rhs_t`, as `B^T` [n, k] (`linear`'s weight layout).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Product {
    /// Rows of `a` and of the result.
    pub m: usize,
    /// The inner dimension.
    pub k: usize,
    /// Columns of the result.
    pub n: usize,
    /// Whether `b` is stored [n, k] and used transposed.
    pub rhs_t: bool,
}

/// `a @ B (+ bias)` for shapes already checked, on the inputs' device, recorded on the tape.
fn product(tape: &Tape, what: &str, a: &Tensor, b: &Tensor, bias: Option<&Tensor>, p: Product) -> Result<Tensor> {
    let Product { m, k, n, rhs_t } = p;
    // Forward, and a gradient per operand that needs one (as for conv2d).
    let grads = 1 + u64::from(a.requires_grad()) + u64::from(b.requires_grad());
    crate::profile::add_flops(2 * (m * k * n) as u64 * grads);
    let mut inputs = vec![a, b];
    inputs.extend(bias);
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu(what, &inputs)? {
        return cuda::product(gpu, tape, a, b, bias, p);
    }
    #[cfg(not(feature = "cuda"))]
    let _ = what;
    let mut y = crate::pool::take(m * n);
    if let Some(bias) = bias {
        cpu::bias_rows_fwd(bias.data()?, &mut y);
    }
    sgemm(m, n, k, Mat::n(a.data()?), Mat { data: b.data()?, trans: rhs_t }, &mut y, bias.is_some(), threads());
    let out = Tensor::cpu(y, vec![m, n]);
    let (ac, bc, biasc) = (a.clone(), b.clone(), bias.cloned());
    Ok(tape.record(out, &inputs, move |g, grads| {
        let g = g.data()?;
        if ac.requires_grad() {
            let mut da = crate::pool::take(m * k);
            sgemm(m, k, n, Mat::n(g), Mat { data: bc.data()?, trans: !rhs_t }, &mut da, false, threads());
            grads.add_to(&ac, Tensor::cpu(da, vec![m, k]))?;
        }
        if bc.requires_grad() {
            let mut db = crate::pool::take(k * n);
            if rhs_t {
                sgemm(n, k, m, Mat::t(g), Mat::n(ac.data()?), &mut db, false, threads());
            } else {
                sgemm(k, n, m, Mat::t(ac.data()?), Mat::n(g), &mut db, false, threads());
            }
            grads.add_to(&bc, Tensor::cpu(db, bc.shape().to_vec()))?;
        }
        if let Some(biasc) = biasc.filter(|b| b.requires_grad()) {
            let mut dbias = vec![0.0f32; n];
            cpu::bias_grad_bwd(g, &mut dbias);
            grads.add_to(&biasc, Tensor::cpu(dbias, vec![n]))?;
        }
        Ok(())
    }))
}
