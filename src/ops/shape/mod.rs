//! Reshape, flatten, and row (batch-axis) concatenation and slicing.

#[cfg(feature = "cuda")]
mod cuda;

use crate::autograd::Tape;
use crate::error::{Error, Result};
use crate::tensor::{fmt_shape, Tensor};

/// The same elements under another shape of the same size.
pub fn reshape(tape: &Tape, x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let out = x.reshaped(shape)?.detach();
    let xc = x.clone();
    Ok(tape.record(out, &[x], move |g, grads| grads.add_to(&xc, g.reshaped(xc.shape())?.detach())))
}

/// [n, ...] -> [n, prod(...)].
pub fn flatten(tape: &Tape, x: &Tensor) -> Result<Tensor> {
    let n = *x.shape().first().ok_or_else(|| Error::shape("flatten: a 0-d tensor has no batch axis"))?;
    let rest = x.numel().checked_div(n).unwrap_or(0);
    reshape(tape, x, &[n, rest])
}

/// Concatenates tensors along axis 0; the other axes must agree.
pub fn concat_rows(tape: &Tape, parts: &[&Tensor]) -> Result<Tensor> {
    let first = parts.first().ok_or_else(|| Error::shape("concat_rows: no tensors"))?;
    if first.shape().is_empty() {
        return Err(Error::shape("concat_rows: a 0-d tensor has no rows"));
    }
    let _p = crate::profile::scope("concat_rows");
    let tail = &first.shape()[1..];
    let mut rows = 0;
    for p in parts {
        if p.shape().is_empty() || &p.shape()[1..] != tail {
            return Err(Error::shape(format!(
                "concat_rows: shapes differ beyond axis 0: {} vs {}",
                fmt_shape(first.shape()),
                fmt_shape(p.shape())
            )));
        }
        rows += p.shape()[0];
    }
    let mut shape = first.shape().to_vec();
    shape[0] = rows;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("concat_rows", parts)? {
        return cuda::concat_rows(gpu, tape, parts, shape);
    }
    let mut data = crate::pool::take(parts.iter().map(|p| p.numel()).sum());
    let mut at = 0;
    for p in parts {
        data[at..at + p.numel()].copy_from_slice(p.data()?);
        at += p.numel();
    }
    let out = Tensor::cpu(data, shape);
    let kept: Vec<Tensor> = parts.iter().map(|p| (*p).clone()).collect();
    Ok(tape.record(out, parts, move |g, grads| {
        let gd = g.data()?;
        let mut off = 0;
        for p in &kept {
            let n = p.numel();
            let mut part = crate::pool::take(n);
            part.copy_from_slice(&gd[off..off + n]);
            grads.add_to(p, Tensor::cpu(part, p.shape().to_vec()))?;
            off += n;
        }
        Ok(())
    }))
}

/// Rows [start, start + len) of `x` along axis 0.
pub fn narrow_rows(tape: &Tape, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    let rows = *x.shape().first().ok_or_else(|| Error::shape("narrow_rows: a 0-d tensor has no rows"))?;
    if start + len > rows {
        return Err(Error::shape(format!(
            "narrow_rows: rows {start}..{} out of range for shape {}",
            start + len,
            fmt_shape(x.shape())
        )));
    }
    let row = x.numel() / rows.max(1);
    let mut shape = x.shape().to_vec();
    shape[0] = len;
    #[cfg(feature = "cuda")]
    if let Some(gpu) = crate::ops::gpu::on_gpu("narrow_rows", &[x])? {
        return cuda::narrow(gpu, tape, x, start * row, len * row, shape);
    }
    let mut data = crate::pool::take(len * row);
    data.copy_from_slice(&x.data()?[start * row..(start + len) * row]);
    let out = Tensor::cpu(data, shape);
    let xc = x.clone();
    Ok(tape.record(out, &[x], move |g, grads| {
        let mut dx = crate::pool::zeros(xc.numel());
        dx[start * row..(start + len) * row].copy_from_slice(g.data()?);
        grads.add_to(&xc, Tensor::cpu(dx, xc.shape().to_vec()))
    }))
}
