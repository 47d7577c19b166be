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
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("matmul", &[a, b])? {
        return cuda::matmul(gpu, tape, a, b, m, k, n);
    }
    let mut y = crate::pool::take(m * n);
    sgemm(m, n, k, Mat::n(a.data()?), Mat::n(b.data()?), &mut y, false, threads());
    let out = Tensor::cpu(y, vec![m, n]);
    let (ac, bc) = (a.clone(), b.clone());
    Ok(tape.record(out, &[a, b], move |g, grads| {
        let g = g.data()?;
        if ac.requires_grad() {
            let mut da = crate::pool::take(m * k);
            sgemm(m, k, n, Mat::n(g), Mat::t(bc.data()?), &mut da, false, threads());
            grads.add_to(&ac, Tensor::cpu(da, vec![m, k]))?;
        }
        if bc.requires_grad() {
            let mut db = crate::pool::take(k * n);
            sgemm(k, n, m, Mat::t(ac.data()?), Mat::n(g), &mut db, false, threads());
            grads.add_to(&bc, Tensor::cpu(db, vec![k, n]))?;
        }
        Ok(())
    }))
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
    let mut all = vec![x, w];
    all.extend(b);
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("linear", &all)? {
        return cuda::linear(gpu, tape, x, w, b, (n, fin, fout));
    }
    let mut y = crate::pool::take(n * fout);
    if let Some(b) = b {
        cpu::bias_rows_fwd(b.data()?, &mut y);
    }
    sgemm(n, fout, fin, Mat::n(x.data()?), Mat::t(w.data()?), &mut y, b.is_some(), threads());
    let out = Tensor::cpu(y, vec![n, fout]);
    let (xc, wc, bc) = (x.clone(), w.clone(), b.cloned());
    let mut inputs = vec![x, w];
    inputs.extend(b);
    Ok(tape.record(out, &inputs, move |g, grads| {
        let g = g.data()?;
        if xc.requires_grad() {
            let mut dx = crate::pool::take(n * fin);
            sgemm(n, fin, fout, Mat::n(g), Mat::n(wc.data()?), &mut dx, false, threads());
            grads.add_to(&xc, Tensor::cpu(dx, vec![n, fin]))?;
        }
        if wc.requires_grad() {
            let mut dw = crate::pool::take(fout * fin);
            sgemm(fout, fin, n, Mat::t(g), Mat::n(xc.data()?), &mut dw, false, threads());
            grads.add_to(&wc, Tensor::cpu(dw, vec![fout, fin]))?;
        }
        if let Some(bc) = bc.filter(|b| b.requires_grad()) {
            let mut db = vec![0.0f32; fout];
            cpu::bias_grad_bwd(g, &mut db);
            grads.add_to(&bc, Tensor::cpu(db, vec![fout]))?;
        }
        Ok(())
    }))
}
