//! Row softmax, log-softmax and the fused softmax + cross-entropy (hard and soft targets).
//!
//! The fused kernels return the loss and the gradient of the mean loss with respect to the
//! logits in one pass over the logits, so the backward is a scale by the upstream gradient.

/// Softmax of one row into `out` (max subtracted first so exp never overflows).
pub fn softmax_row(x: &[f32], out: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = 0.0f32;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - m).exp();
        s += *o;
    }
    let inv = 1.0 / s;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// Log-sum-exp of one row.
pub fn logsumexp_row(x: &[f32]) -> f32 {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    m + x.iter().map(|&v| (v - m).exp()).sum::<f32>().ln()
}

/// Row softmax of an n x c matrix.
pub fn softmax_forward(x: &[f32], c: usize, y: &mut [f32]) {
    for (xr, yr) in x.chunks(c).zip(y.chunks_mut(c)) {
        softmax_row(xr, yr);
    }
}

/// dx = y * (dy - <y, dy>) per row.
pub fn softmax_backward(y: &[f32], dy: &[f32], c: usize, dx: &mut [f32]) {
    for ((yr, gr), dr) in y.chunks(c).zip(dy.chunks(c)).zip(dx.chunks_mut(c)) {
        let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
        for ((d, &p), &g) in dr.iter_mut().zip(yr).zip(gr) {
            *d = p * (g - dot);
        }
    }
}

/// Row log-softmax of an n x c matrix.
pub fn log_softmax_forward(x: &[f32], c: usize, y: &mut [f32]) {
    for (xr, yr) in x.chunks(c).zip(y.chunks_mut(c)) {
        let l = logsumexp_row(xr);
        for (o, &v) in yr.iter_mut().zip(xr) {
            *o = v - l;
        }
    }
}

/// dx = dy - softmax * sum(dy) per row, from the log-softmax output y.
pub fn log_softmax_backward(y: &[f32], dy: &[f32], c: usize, dx: &mut [f32]) {
    for ((yr, gr), dr) in y.chunks(c).zip(dy.chunks(c)).zip(dx.chunks_mut(c)) {
        let s: f32 = gr.iter().sum();
        for ((d, &l), &g) in dr.iter_mut().zip(yr).zip(gr) {
            *d = g - l.exp() * s;
        }
    }
}

/// Mean cross-entropy of logits (n x c) against class indices; `grad` gets d(mean loss)/d logits.
pub fn cross_entropy_hard(x: &[f32], labels: &[usize], c: usize, grad: &mut [f32]) -> f32 {
    let n = labels.len();
    let mut total = 0.0f64;
    for ((xr, gr), &y) in x.chunks(c).zip(grad.chunks_mut(c)).zip(labels) {
        let l = logsumexp_row(xr);
        total += (l - xr[y]) as f64;
        for (g, &v) in gr.iter_mut().zip(xr) {
            *g = (v - l).exp() / n as f32;
        }
        gr[y] -= 1.0 / n as f32;
    }
    (total / n as f64) as f32
}

/// Mean over rows of -sum_c q_c log softmax(x)_c for target rows q (n x c); `grad` as above.
pub fn cross_entropy_soft(x: &[f32], q: &[f32], c: usize, grad: &mut [f32]) -> f32 {
    let n = x.len() / c;
    let mut total = 0.0f64;
    for ((xr, qr), gr) in x.chunks(c).zip(q.chunks(c)).zip(grad.chunks_mut(c)) {
        let l = logsumexp_row(xr);
        let qsum: f32 = qr.iter().sum();
        for ((g, &v), &t) in gr.iter_mut().zip(xr).zip(qr) {
            total -= (t * (v - l)) as f64;
            *g = ((v - l).exp() * qsum - t) / n as f32;
        }
    }
    (total / n as f64) as f32
}
