//! Helpers shared by the integration tests.

use muscle::tensor::Tensor;

/// Distinct, well-separated values (a scaled permutation), so max-pool windows have no near-ties.
pub fn distinct(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut idx: Vec<usize> = (0..n).collect();
    let mut r = muscle::rng::Rng::new(seed, 5);
    for i in (1..n).rev() {
        idx.swap(i, r.below(i as u32 + 1) as usize);
    }
    // Half-step offset: no value sits on the ReLU kink at 0.
    let data: Vec<f32> = idx.iter().map(|&i| (i as f32 - n as f32 / 2.0 + 0.5) * 0.1).collect();
    Tensor::from_vec(data, shape).expect("shape")
}

/// Summary of a tensor as the fixture records it: sum, sum of squares, first entries.
pub fn summarise(v: &[f32]) -> (f64, f64, Vec<f64>) {
    let sum = v.iter().map(|&x| x as f64).sum();
    let sumsq = v.iter().map(|&x| x as f64 * x as f64).sum();
    (sum, sumsq, v.iter().take(6).map(|&x| x as f64).collect())
}

/// Asserts a summary matches the fixture's: the sum of squares within `rel` relative, each recorded
/// entry within `rel` of the tensor's RMS, and the sum within 20 `rel` of sqrt(n) RMS (the sum of a
/// gradient feeding a batch norm nearly cancels, so its rounding is large against its size).
pub fn assert_summary(what: &str, got: &[f32], want: &serde_json::Value, rel: f64) {
    assert_summary_tol(what, got, want, rel, rel)
}

/// `assert_summary` with separate tolerances for the sum of squares (`sumsq_rel`, relative) and
/// for the recorded entries and the sum (`entry_rel`, of the RMS as above).
pub fn assert_summary_tol(what: &str, got: &[f32], want: &serde_json::Value, sumsq_rel: f64, entry_rel: f64) {
    let f = |k: &str| want[k].as_f64().unwrap_or_else(|| panic!("{what}: {k}"));
    let (sum, sumsq, first) = summarise(got);
    let n = got.len() as f64;
    let rms = (f("sumsq") / n).sqrt().max(1e-30);
    assert!(
        (sumsq - f("sumsq")).abs() <= sumsq_rel * f("sumsq") + 1e-30,
        "{what}: sum of squares {sumsq} vs {}",
        f("sumsq")
    );
    assert!((sum - f("sum")).abs() <= 20.0 * entry_rel * rms * n.sqrt(), "{what}: sum {sum} vs {}", f("sum"));
    let want_first: Vec<f64> =
        want["first"].as_array().expect("first").iter().map(|v| v.as_f64().expect("f")).collect();
    for (k, (g, w)) in first.iter().zip(&want_first).enumerate() {
        assert!((g - w).abs() <= entry_rel * rms, "{what}[{k}]: {g} vs {w} (rms {rms:e})");
    }
}
