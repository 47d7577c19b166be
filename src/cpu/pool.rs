//! Pooling: k x k max-pool with stride k (floor), and global average pool.

use rayon::prelude::*;

/// Max-pool each [h, w] plane by k x k windows (stride k); `arg` keeps the winner's offset in
/// the window for the backward.
pub fn maxpool_forward(x: &[f32], planes: usize, h: usize, w: usize, k: usize, y: &mut [f32], arg: &mut [u8]) {
    let (ho, wo) = (h / k, w / k);
    y.par_chunks_mut(ho * wo).zip(arg.par_chunks_mut(ho * wo)).zip(x.par_chunks(h * w)).with_min_len(16).for_each(
        |((yp, ap), xp)| {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut best = f32::NEG_INFINITY;
                    let mut at = 0u8;
                    for i in 0..k {
                        for j in 0..k {
                            let v = xp[(oy * k + i) * w + ox * k + j];
                            // A NaN wins too, so NaN propagates as in PyTorch.
                            if v > best || v.is_nan() {
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

/// Routes each output gradient to its window's winner; dx is overwritten.
pub fn maxpool_backward(dy: &[f32], arg: &[u8], planes: usize, h: usize, w: usize, k: usize, dx: &mut [f32]) {
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
pub fn avgpool_forward(x: &[f32], hw: usize, y: &mut [f32]) {
    for (d, p) in y.iter_mut().zip(x.chunks(hw)) {
        *d = p.iter().sum::<f32>() / hw as f32;
    }
}

/// Spreads each plane's gradient evenly over its `hw` elements.
pub fn avgpool_backward(dy: &[f32], hw: usize, dx: &mut [f32]) {
    for (p, &g) in dx.chunks_mut(hw).zip(dy) {
        p.fill(g / hw as f32);
    }
}
