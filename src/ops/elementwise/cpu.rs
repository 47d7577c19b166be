//! Elementwise activations and arithmetic.

use rayon::prelude::*;

/// Below this many elements a loop is cheaper than waking the thread pool.
const PAR_MIN: usize = 1 << 15;

/// y = x > 0 ? x : slope * x (slope 0 is ReLU).
pub fn leaky_relu_fwd(x: &[f32], slope: f32, y: &mut [f32]) {
    let f = |(d, &v): (&mut f32, &f32)| *d = if v > 0.0 { v } else { slope * v };
    if x.len() < PAR_MIN {
        y.iter_mut().zip(x).for_each(f);
    } else {
        y.par_iter_mut().zip(x.par_iter()).with_min_len(PAR_MIN / 4).for_each(f);
    }
}

/// dx = dy * (x > 0 ? 1 : slope).
pub fn leaky_relu_bwd(x: &[f32], dy: &[f32], slope: f32, dx: &mut [f32]) {
    let f = |((d, &g), &v): ((&mut f32, &f32), &f32)| *d = if v > 0.0 { g } else { slope * g };
    if x.len() < PAR_MIN {
        dx.iter_mut().zip(dy).zip(x).for_each(f);
    } else {
        dx.par_iter_mut().zip(dy.par_iter()).zip(x.par_iter()).with_min_len(PAR_MIN / 4).for_each(f);
    }
}

/// y = a + b.
pub fn add_fwd(a: &[f32], b: &[f32], y: &mut [f32]) {
    let f = |((d, &u), &v): ((&mut f32, &f32), &f32)| *d = u + v;
    if a.len() < PAR_MIN {
        y.iter_mut().zip(a).zip(b).for_each(f);
    } else {
        y.par_iter_mut().zip(a.par_iter()).zip(b.par_iter()).with_min_len(PAR_MIN / 4).for_each(f);
    }
}

/// y = s * x.
pub fn scale_fwd(x: &[f32], s: f32, y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(d, &v)| *d = s * v);
}
