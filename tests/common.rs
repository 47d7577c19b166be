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
