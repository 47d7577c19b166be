//! The Hungarian method: a one-to-one assignment of clusters to classes that maximises the
//! number of correctly matched images (clustering accuracy, as IIC reports it).

/// For a `rows` x `cols` weight matrix (row-major), the column assigned to each row (None when
/// rows > cols leaves it unmatched) maximising the summed weight. O(n^3) (Kuhn-Munkres with
/// potentials, on the square matrix padded with zeros).
pub fn max_weight_assignment(w: &[f64], rows: usize, cols: usize) -> Vec<Option<usize>> {
    let n = rows.max(cols);
    // Minimise cost = max - weight on the padded square matrix.
    let max = w.iter().cloned().fold(0.0f64, f64::max);
    let cost = |i: usize, j: usize| if i < rows && j < cols { max - w[i * cols + j] } else { max };
    let inf = f64::INFINITY;
    // 1-based arrays as in the classic formulation; p[j] = row matched to column j.
    let (mut u, mut v) = (vec![0.0; n + 1], vec![0.0; n + 1]);
    let (mut p, mut way) = (vec![0usize; n + 1], vec![0usize; n + 1]);
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0;
        let mut minv = vec![inf; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let (mut delta, mut j1) = (inf, 0);
            for j in 1..=n {
                if !used[j] {
                    let cur = cost(i0 - 1, j - 1) - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut assign = vec![None; rows];
    for j in 1..=n {
        if p[j] >= 1 && p[j] <= rows && j <= cols {
            assign[p[j] - 1] = Some(j - 1);
        }
    }
    assign
}

/// Clustering accuracy from a confusion matrix [true class][predicted cluster]: the fraction of
/// images whose cluster is matched to their class by the best one-to-one matching.
pub fn clustering_accuracy(confusion: &[Vec<u64>]) -> f64 {
    let classes = confusion.len();
    let clusters = confusion.first().map_or(0, Vec::len);
    let total: u64 = confusion.iter().flatten().sum();
    if total == 0 || clusters == 0 {
        return 0.0;
    }
    let w: Vec<f64> = confusion.iter().flatten().map(|&c| c as f64).collect();
    let assign = max_weight_assignment(&w, classes, clusters);
    let matched: u64 = assign.iter().enumerate().filter_map(|(c, k)| k.map(|k| confusion[c][k])).sum();
    matched as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Best assignment by trying every permutation (small n only).
    fn brute(w: &[f64], n: usize) -> f64 {
        fn go(w: &[f64], n: usize, row: usize, used: &mut Vec<bool>) -> f64 {
            if row == n {
                return 0.0;
            }
            let mut best = f64::NEG_INFINITY;
            for j in 0..n {
                if !used[j] {
                    used[j] = true;
                    best = best.max(w[row * n + j] + go(w, n, row + 1, used));
                    used[j] = false;
                }
            }
            best
        }
        go(w, n, 0, &mut vec![false; n])
    }

    #[test]
    fn matches_brute_force_on_random_matrices() {
        let mut r = crate::rng::Rng::new(4, 0);
        for n in 1..=6 {
            for _ in 0..20 {
                let w: Vec<f64> = (0..n * n).map(|_| r.below(50) as f64).collect();
                let a = max_weight_assignment(&w, n, n);
                let got: f64 = a.iter().enumerate().map(|(i, j)| w[i * n + j.expect("square: all matched")]).sum();
                assert_eq!(got, brute(&w, n), "{w:?}");
            }
        }
    }

    #[test]
    fn clustering_accuracy_is_invariant_to_cluster_names() {
        // Clusters are a permutation of the classes: accuracy counts the diagonal after matching.
        let conf = vec![vec![0, 9, 1], vec![8, 2, 0], vec![0, 0, 10]];
        assert!((clustering_accuracy(&conf) - 27.0 / 30.0).abs() < 1e-12);
        // More clusters than classes: one-to-one leaves the extra cluster unmatched.
        let conf = vec![vec![5, 5, 0, 0], vec![0, 0, 10, 0]];
        assert!((clustering_accuracy(&conf) - 15.0 / 20.0).abs() < 1e-12);
    }
}
