//! Pooling: k x k max-pool with stride k (floor), and global average pool.

use rayon::prelude::*;

/// Max-pool each [h, w] plane by k x k windows (stride k); `arg` keeps the winner's offset in
/// the window for the backward.
pub fn maxpool_fwd(x: &[f32], planes: usize, h: usize, w: usize, k: usize, y: &mut [f32], arg: &mut [u8]) {
    let (ho, wo) = (h / k, w / k);
    y.par_chunks_mut(ho * wo).zip(arg.par_chunks_mut(ho * wo)).zip(x.par_chunks(h * w)).with_min_len(16).for_each(
        |((yp, ap), xp)| {
            if k == 2 {
                return maxpool2_plane(xp, w, ho, wo, yp, ap);
            }
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut best = f32::NEG_INFINITY;
                    let mut at = 0u8;
                    for i in 0..k {
                        for j in 0..k {
                            let v = xp[(oy * k + i) * w + ox * k + j];
                            // A NaN wins too, so NaN propagates as in PyTorch.
                            if v > best || (v.is_nan() && !best.is_nan()) {
                                best = v;
                                at = (i * k + j) as u8;
                            }
                        }
                    }
                    yp[oy * wo + ox] = best;
                    ap[oy * wo + ox] = at;
                }
            }
        },
    );
    debug_assert_eq!(y.len(), planes * ho * wo);
}

/// The 2x2 case (every model here): two input rows per output row, no inner window loops.
fn maxpool2_plane(xp: &[f32], w: usize, ho: usize, wo: usize, yp: &mut [f32], ap: &mut [u8]) {
    for oy in 0..ho {
        let r0 = &xp[2 * oy * w..2 * oy * w + 2 * wo];
        let r1 = &xp[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * wo];
        let yr = &mut yp[oy * wo..(oy + 1) * wo];
        let ar = &mut ap[oy * wo..(oy + 1) * wo];
        for ox in 0..wo {
            let (a, b, c, d) = (r0[2 * ox], r0[2 * ox + 1], r1[2 * ox], r1[2 * ox + 1]);
            // Same winner as the general loop: the first maximum in row-major window order.
            let (mut best, mut at) = (a, 0u8);
            if b > best || b.is_nan() && !best.is_nan() {
                (best, at) = (b, 1);
            }
            if c > best || c.is_nan() && !best.is_nan() {
                (best, at) = (c, 2);
            }
            if d > best || d.is_nan() && !best.is_nan() {
                (best, at) = (d, 3);
            }
            yr[ox] = best;
            ar[ox] = at;
        }
    }
}

/// Routes each output gradient to its window's winner; dx is overwritten.
pub fn maxpool_bwd(dy: &[f32], arg: &[u8], planes: usize, h: usize, w: usize, k: usize, dx: &mut [f32]) {
    let (ho, wo) = (h / k, w / k);
    dx.par_chunks_mut(h * w).zip(dy.par_chunks(ho * wo)).zip(arg.par_chunks(ho * wo)).with_min_len(16).for_each(
        |((dxp, dyp), ap)| {
            dxp.fill(0.0);
            for oy in 0..ho {
                for ox in 0..wo {
                    let a = ap[oy * wo + ox] as usize;
                    dxp[(oy * k + a / k) * w + ox * k + a % k] += dyp[oy * wo + ox];
                }
            }
        },
    );
    debug_assert_eq!(dx.len(), planes * h * w);
}

/// Mean of each plane of `hw` elements.
pub fn avgpool_fwd(x: &[f32], hw: usize, y: &mut [f32]) {
    for (d, p) in y.iter_mut().zip(x.chunks(hw)) {
        *d = p.iter().sum::<f32>() / hw as f32;
    }
}

/// Spreads each plane's gradient evenly over its `hw` elements.
pub fn avgpool_bwd(dy: &[f32], hw: usize, dx: &mut [f32]) {
    for (p, &g) in dx.chunks_mut(hw).zip(dy) {
        p.fill(g / hw as f32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first maximum of each window in row-major order, NaN winning, by plain loops.
    fn naive(x: &[f32], planes: usize, h: usize, w: usize, k: usize) -> (Vec<f32>, Vec<u8>) {
        let (ho, wo) = (h / k, w / k);
        let (mut y, mut a) = (Vec::new(), Vec::new());
        for p in 0..planes {
            for oy in 0..ho {
                for ox in 0..wo {
                    let win: Vec<f32> =
                        (0..k * k).map(|t| x[p * h * w + (oy * k + t / k) * w + ox * k + t % k]).collect();
                    let at = win.iter().position(|v| v.is_nan()).unwrap_or_else(|| {
                        let m = win.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                        win.iter().position(|&v| v == m).unwrap_or(0)
                    });
                    y.push(win[at]);
                    a.push(at as u8);
                }
            }
        }
        (y, a)
    }

    #[test]
    fn two_by_two_and_general_paths_match_plain_loops_with_ties_and_nan() {
        let (planes, h, w) = (3, 7, 6);
        let mut x: Vec<f32> = (0..planes * h * w).map(|i| ((i * 7919) % 13) as f32).collect();
        x[5] = f32::NAN;
        x[50] = f32::NAN;
        for k in [2, 3] {
            let (ho, wo) = (h / k, w / k);
            let (mut y, mut a) = (vec![0.0; planes * ho * wo], vec![0u8; planes * ho * wo]);
            maxpool_fwd(&x, planes, h, w, k, &mut y, &mut a);
            let (yr, ar) = naive(&x, planes, h, w, k);
            assert_eq!(a, ar, "k = {k}");
            for (u, v) in y.iter().zip(&yr) {
                assert!(u == v || (u.is_nan() && v.is_nan()), "k = {k}: {u} vs {v}");
            }
        }
    }
}
