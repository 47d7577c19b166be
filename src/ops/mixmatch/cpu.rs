//! MixMatch's label guess and MixUp on the host: the reference the kernels of
//! kernels/mixmatch.cu are tested against.

/// Sharpens each row of probabilities: p^(1/T) / sum p^(1/T).
pub fn sharpen(p: &[f32], classes: usize, temperature: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; p.len()];
    for (src, dst) in p.chunks(classes).zip(out.chunks_mut(classes)) {
        // Powers of probabilities relative to the row's largest keep 1/T large without underflow
        // to an all-zero row.
        let m = src.iter().cloned().fold(0.0f32, f32::max).max(f32::MIN_POSITIVE);
        let mut s = 0.0f32;
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = (v / m).powf(1.0 / temperature);
            s += *d;
        }
        dst.iter_mut().for_each(|d| *d /= s);
    }
    out
}

/// The guess of `nu` rows from the 2nu x C probabilities of two views: the average of each
/// image's two rows, sharpened. Twin of `mixmatch_guess_fwd_f32`.
pub fn guess(p: &[f32], nu: usize, classes: usize, temperature: f32) -> Vec<f32> {
    let avg: Vec<f32> = (0..nu * classes).map(|i| 0.5 * (p[i] + p[nu * classes + i])).collect();
    sharpen(&avg, classes, temperature)
}

/// One-hot rows of `labels` over `classes`. Twin of `one_hot_fwd_f32`.
pub fn one_hot(labels: &[usize], classes: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; labels.len() * classes];
    for (i, &t) in labels.iter().enumerate() {
        if t < classes {
            y[i * classes + t] = 1.0;
        }
    }
    y
}

/// rows' = mu * rows + (1 - mu) * rows[perm], for an [n, ...] buffer of `row` elements per row.
/// Twin of `mix_rows_fwd_f32`.
pub fn mix_rows(data: &[f32], row: usize, mu: f32, perm: &[usize]) -> Vec<f32> {
    let mut out = crate::pool::take(data.len());
    for (i, &j) in perm.iter().enumerate() {
        let (a, b) = (&data[i * row..(i + 1) * row], &data[j * row..(j + 1) * row]);
        for ((o, &x), &y) in out[i * row..(i + 1) * row].iter_mut().zip(a).zip(b) {
            *o = mu * x + (1.0 - mu) * y;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharpening_matches_the_formula_and_keeps_rows_normalised() {
        let p = [0.1, 0.2, 0.7, 0.5, 0.25, 0.25];
        let q = sharpen(&p, 3, 0.5);
        let row = |a: f32, b: f32, c: f32| {
            let s = a * a + b * b + c * c;
            [a * a / s, b * b / s, c * c / s]
        };
        let want: Vec<f32> = row(0.1, 0.2, 0.7).into_iter().chain(row(0.5, 0.25, 0.25)).collect();
        for (a, b) in q.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // A very small temperature gives (nearly) one-hot rows, never NaN.
        let hard = sharpen(&[1e-3, 2e-3, 1e-3], 3, 0.01);
        assert!(hard.iter().all(|v| v.is_finite()) && hard[1] > 0.999);
    }

    #[test]
    fn mixing_rows_and_one_hot_rows() {
        let rows = [1.0, 2.0, 10.0, 20.0];
        assert_eq!(mix_rows(&rows, 2, 0.75, &[1, 0]), vec![3.25, 6.5, 7.75, 15.5]);
        assert_eq!(one_hot(&[2, 0], 3), vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
        let g = guess(&[0.2, 0.8, 0.6, 0.4], 1, 2, 1.0);
        assert!((g[0] - 0.4).abs() < 1e-7 && (g[1] - 0.6).abs() < 1e-7, "{g:?}");
    }
}
