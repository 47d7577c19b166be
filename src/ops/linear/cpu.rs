//! The dense layer's bias: broadcast over rows (forward) and summed over rows (backward).
//! CUDA twins: `bias_rows_fwd_f32` and `bias_grad_bwd_f32` in kernels/elementwise.cu.

/// y[r, j] = b[j] for every row of the rows x `b.len()` matrix `y`.
pub fn bias_rows_fwd(b: &[f32], y: &mut [f32]) {
    if b.is_empty() {
        return;
    }
    y.chunks_mut(b.len()).for_each(|r| r.copy_from_slice(b));
}

/// db[j] = sum over rows of g[r, j], in row order (the GPU kernel sums in the same order).
pub fn bias_grad_bwd(g: &[f32], db: &mut [f32]) {
    db.fill(0.0);
    if db.is_empty() {
        return;
    }
    for r in g.chunks(db.len()) {
        db.iter_mut().zip(r).for_each(|(a, b)| *a += b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_and_sum_are_adjoint() {
        let b = [1.0, -2.0, 0.5];
        let mut y = vec![0.0; 12];
        bias_rows_fwd(&b, &mut y);
        assert_eq!(&y[9..], &b);
        let g: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut db = [9.0; 3];
        bias_grad_bwd(&g, &mut db);
        assert_eq!(db, [18.0, 22.0, 26.0]);
    }
}
