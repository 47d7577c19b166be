//! 2-d convolution (NCHW, OIHW weights, no bias) as im2col + GEMM, parallel over images: the
//! path for every geometry the direct and Winograd kernels do not take (ops::conv chooses).

use super::gemm::{sgemm, Mat};
use crate::kernel_args::{ConvShape, SyncPtr};
use rayon::prelude::*;

/// Writes the im2col matrix [ci*kh*kw, ho*wo] of one image `x` [ci, h, w] into `col`.
pub fn im2col(s: &ConvShape, x: &[f32], col: &mut [f32]) {
    if s.stride == 1 && s.wo() == s.w && s.ho() == s.h {
        im2col_same(s, x, col)
    } else {
        im2col_general(s, x, col)
    }
}

/// im2col for any geometry, one output row at a time.
fn im2col_general(s: &ConvShape, x: &[f32], col: &mut [f32]) {
    let (ho, wo) = (s.ho(), s.wo());
    let p = ho * wo;
    for c in 0..s.ci {
        let xc = &x[c * s.h * s.w..(c + 1) * s.h * s.w];
        for i in 0..s.kh {
            for j in 0..s.kw {
                let row = &mut col[((c * s.kh + i) * s.kw + j) * p..][..p];
                for oy in 0..ho {
                    let iy = (oy * s.stride + i) as isize - s.pad as isize;
                    let dst = &mut row[oy * wo..(oy + 1) * wo];
                    if iy < 0 || iy >= s.h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &xc[iy as usize * s.w..(iy as usize + 1) * s.w];
                    if s.stride == 1 {
                        // Contiguous run: the valid output columns map to a slice of the row.
                        let off = j as isize - s.pad as isize;
                        let lo = (-off).clamp(0, wo as isize) as usize;
                        let hi = ((s.w as isize - off).clamp(0, wo as isize)) as usize;
                        dst[..lo].fill(0.0);
                        if hi > lo {
                            let start = (lo as isize + off) as usize;
                            dst[lo..hi].copy_from_slice(&src[start..start + hi - lo]);
                        }
                        dst[hi.max(lo)..].fill(0.0);
                    } else {
                        for (ox, d) in dst.iter_mut().enumerate() {
                            let ix = (ox * s.stride + j) as isize - s.pad as isize;
                            *d = if ix < 0 || ix >= s.w as isize { 0.0 } else { src[ix as usize] };
                        }
                    }
                }
            }
        }
    }
}

/// im2col of a stride-1 "same" convolution (output as large as the input). Each row of `col` is
/// then the input plane shifted by one constant offset: one block copy per (channel, tap) plus
/// zeroed border rows and columns, instead of a short copy per output row (a memcpy call per 28
/// floats dominated the layer's time).
fn im2col_same(s: &ConvShape, x: &[f32], col: &mut [f32]) {
    let (h, w) = (s.h, s.w);
    let p = h * w;
    for c in 0..s.ci {
        let xc = &x[c * p..(c + 1) * p];
        for i in 0..s.kh {
            let dy = i as isize - s.pad as isize;
            // Output rows whose source row iy = oy + dy lies inside the image.
            let oy_lo = (-dy).clamp(0, h as isize) as usize;
            let oy_hi = (h as isize - dy).clamp(0, h as isize) as usize;
            for j in 0..s.kw {
                let dx = j as isize - s.pad as isize;
                let row = &mut col[((c * s.kh + i) * s.kw + j) * p..][..p];
                if oy_hi <= oy_lo || dx.unsigned_abs() >= w {
                    row.fill(0.0);
                    continue;
                }
                row[..oy_lo * w].fill(0.0);
                row[oy_hi * w..].fill(0.0);
                // dst[oy * w + ox] = src[(oy + dy) * w + ox + dx] over the valid rows, as one copy;
                // the columns where ox + dx leaves [0, w) picked up a neighbour row's pixel.
                let (d0, d1) = (oy_lo * w, oy_hi * w);
                let off = dy * w as isize + dx;
                let (s0, s1) = (d0 as isize + off, d1 as isize + off);
                // The copy may start |dx| before the plane or end dx past it: clip it; the clipped
                // elements are border columns, zeroed below with the rest.
                let (cs0, cs1) = (s0.max(0) as usize, (s1 as usize).min(p));
                let dst0 = (cs0 as isize - off) as usize;
                row[dst0..dst0 + (cs1 - cs0)].copy_from_slice(&xc[cs0..cs1]);
                let bad_cols = if dx < 0 { 0..(-dx) as usize } else { w - dx as usize..w };
                // Column-major order: a fill per row would be a memset call per output row.
                for x in bad_cols {
                    for oy in oy_lo..oy_hi {
                        row[oy * w + x] = 0.0;
                    }
                }
            }
        }
    }
}

/// Adds the im2col-shaped gradient `col` back into the image gradient `dx` [ci, h, w].
pub fn col2im_add(s: &ConvShape, col: &[f32], dx: &mut [f32]) {
    let (ho, wo) = (s.ho(), s.wo());
    let p = ho * wo;
    for c in 0..s.ci {
        let dxc = &mut dx[c * s.h * s.w..(c + 1) * s.h * s.w];
        for i in 0..s.kh {
            for j in 0..s.kw {
                let row = &col[((c * s.kh + i) * s.kw + j) * p..][..p];
                for oy in 0..ho {
                    let iy = (oy * s.stride + i) as isize - s.pad as isize;
                    if iy < 0 || iy >= s.h as isize {
                        continue;
                    }
                    let dst = &mut dxc[iy as usize * s.w..(iy as usize + 1) * s.w];
                    let src = &row[oy * wo..(oy + 1) * wo];
                    for (ox, g) in src.iter().enumerate() {
                        let ix = (ox * s.stride + j) as isize - s.pad as isize;
                        if ix >= 0 && ix < s.w as isize {
                            dst[ix as usize] += g;
                        }
                    }
                }
            }
        }
    }
}

/// Splits the batch across threads when there are enough images; otherwise one image at a time
/// with the GEMM itself threaded.
fn plan(n: usize) -> (usize, usize) {
    let t = super::threads();
    if n >= t {
        (n.div_ceil(t), 1)
    } else {
        (1, t)
    }
}

/// The forward pass as im2col + GEMM (any geometry).
pub fn gemm_forward(s: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (k, p) = (s.k(), s.p());
    let (min_len, gemm_threads) = plan(s.n);
    y.par_chunks_mut(s.co * p).zip(x.par_chunks(s.ci * s.h * s.w)).with_min_len(min_len).for_each_init(
        || if s.is_pointwise() { Vec::new() } else { vec![0.0f32; k * p] },
        |col, (yn, xn)| {
            let colref: &[f32] = if s.is_pointwise() {
                xn
            } else {
                im2col(s, xn, col);
                col
            };
            sgemm(s.co, p, k, Mat::n(w), Mat::n(colref), yn, false, gemm_threads);
        },
    );
}

/// The input-gradient convolution of a stride-1 conv: dX = conv(dY, W'), with W' the weights
/// flipped spatially and with in/out channels swapped, and padding k - 1 - pad. It turns the
/// scatter-add (col2im) of the textbook backward into one more well-shaped forward GEMM.
fn transposed_shape(s: &ConvShape) -> Option<ConvShape> {
    (s.stride == 1 && s.pad < s.kh && s.pad < s.kw && s.kh == s.kw && !s.is_pointwise()).then(|| ConvShape {
        n: s.n,
        ci: s.co,
        h: s.ho(),
        w: s.wo(),
        co: s.ci,
        kh: s.kh,
        kw: s.kw,
        stride: 1,
        pad: s.kh - 1 - s.pad,
    })
}

/// Scratch buffers of one backward worker (`dw` sums its images' dW^T, k x co).
struct Scratch {
    dw: Vec<f32>,
    col: Vec<f32>,
    col2: Vec<f32>,
    started: bool,
}

/// The backward pass through im2col + GEMM (any geometry).
pub fn gemm_backward(s: &ConvShape, x: &[f32], w: &[f32], dy: &[f32], dw: &mut [f32], dx: Option<&mut [f32]>) {
    let (k, p) = (s.k(), s.p());
    let (min_len, gemm_threads) = plan(s.n);
    let img = s.ci * s.h * s.w;
    let need_dx = dx.is_some();
    let mut dx_store = Vec::new();
    let dx: &mut [f32] = match dx {
        Some(d) => d,
        None => &mut dx_store,
    };
    let dx_base = SyncPtr(dx.as_mut_ptr());
    let tr = transposed_shape(s);
    let w_flip = match (&tr, need_dx) {
        (Some(_), true) => s.flip_weights(w),
        _ => Vec::new(),
    };
    // Each worker sums its images' weight gradients into its own buffer; the few buffers are
    // added at the end, so the reduction order is fixed by the split, not by scheduling.
    let partials: Vec<Vec<f32>> = (0..s.n)
        .into_par_iter()
        .with_min_len(min_len)
        .fold(
            || Scratch { dw: vec![0.0f32; s.co * k], col: Vec::new(), col2: Vec::new(), started: false },
            |mut sc, n| {
                let dyn_ = &dy[n * s.co * p..(n + 1) * s.co * p];
                let xn = &x[n * img..(n + 1) * img];
                let colref: &[f32] = if s.is_pointwise() {
                    xn
                } else {
                    sc.col.resize(k * p, 0.0);
                    im2col(s, xn, &mut sc.col);
                    &sc.col
                };
                // dW^T [k x co] = col [k x p] dY^T: the GEMM crate packs the thin transposed dY
                // faster than the wide transposed col of dW = dY col^T (the convnet's 32 -> 32
                // layer's backward: 85 -> 77 ms at batch 192 on an AVX2 machine).
                sgemm(k, s.co, p, Mat::n(colref), Mat::t(dyn_), &mut sc.dw, sc.started, gemm_threads);
                sc.started = true;
                if need_dx {
                    // SAFETY: image n's slice of dx is written by this task only, and dx
                    // outlives the parallel loop.
                    let dxn = unsafe { dx_base.slice(n * img, img) };
                    if let Some(t) = &tr {
                        sc.col2.resize(t.k() * t.p(), 0.0);
                        im2col(t, dyn_, &mut sc.col2);
                        sgemm(t.co, t.p(), t.k(), Mat::n(&w_flip), Mat::n(&sc.col2), dxn, false, gemm_threads);
                    } else if s.is_pointwise() {
                        sgemm(k, p, s.co, Mat::t(w), Mat::n(dyn_), dxn, false, gemm_threads);
                    } else {
                        sc.col2.resize(k * p, 0.0);
                        sgemm(k, p, s.co, Mat::t(w), Mat::n(dyn_), &mut sc.col2, false, gemm_threads);
                        dxn.fill(0.0);
                        col2im_add(s, &sc.col2, dxn);
                    }
                }
                sc
            },
        )
        .map(|sc| sc.dw)
        .collect();
    dw.fill(0.0);
    for part in &partials {
        for (r, row) in part.chunks_exact(s.co).enumerate() {
            for (o, &v) in row.iter().enumerate() {
                dw[o * k + r] += v;
            }
        }
    }
}

/// Direct convolution by loops in f64: the reference for tests.
pub fn conv2d_naive(s: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (ho, wo) = (s.ho(), s.wo());
    let mut y = vec![0.0f32; s.y_len()];
    for n in 0..s.n {
        for o in 0..s.co {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = 0.0f64;
                    for c in 0..s.ci {
                        for i in 0..s.kh {
                            for j in 0..s.kw {
                                let iy = (oy * s.stride + i) as isize - s.pad as isize;
                                let ix = (ox * s.stride + j) as isize - s.pad as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < s.h && (ix as usize) < s.w {
                                    acc += x[((n * s.ci + c) * s.h + iy as usize) * s.w + ix as usize] as f64
                                        * w[((o * s.ci + c) * s.kh + i) * s.kw + j] as f64;
                                }
                            }
                        }
                    }
                    y[((n * s.co + o) * ho + oy) * wo + ox] = acc as f32;
                }
            }
        }
    }
    y
}

/// Test helper: `forward` on random x and w of shape `s` (seeded) agrees with `conv2d_naive`
/// to 1e-4 relative, output by output.
#[cfg(test)]
pub(crate) fn assert_forward_matches_naive(
    s: &ConvShape,
    seed: u64,
    forward: impl Fn(&ConvShape, &[f32], &[f32], &mut [f32]),
) {
    let mut r = crate::rng::Rng::new(seed, 7);
    let x: Vec<f32> = (0..s.x_len()).map(|_| r.normal()).collect();
    let w: Vec<f32> = (0..s.w_len()).map(|_| r.normal()).collect();
    let mut y = vec![f32::NAN; s.y_len()];
    forward(s, &x, &w, &mut y);
    let want = conv2d_naive(s, &x, &w);
    for (i, (a, b)) in y.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{s:?} output {i}: {a} vs {b}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::normal_vec;

    #[test]
    fn forward_matches_direct_convolution() {
        for &(n, ci, h, w, co, kk, stride, pad) in &[
            (3, 2, 7, 6, 4, 3, 1, 1),
            (2, 3, 8, 8, 5, 3, 2, 1),
            (1, 4, 5, 5, 3, 1, 1, 0),
            (2, 4, 6, 6, 3, 1, 2, 0),
            (2, 2, 6, 5, 3, 3, 1, 0),
        ] {
            let s = ConvShape { n, ci, h, w, co, kh: kk, kw: kk, stride, pad };
            let x = normal_vec(n * ci * h * w, 1.0, 1);
            let wt = normal_vec(co * s.k(), 1.0, 2);
            let mut y = vec![0.0; n * co * s.p()];
            gemm_forward(&s, &x, &wt, &mut y);
            let r = conv2d_naive(&s, &x, &wt);
            for (a, b) in y.iter().zip(&r) {
                assert!((a - b).abs() < 1e-4, "{s:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn same_padding_im2col_equals_the_row_by_row_one() {
        // 5x5 pad 2, 3x3 pad 1, 1x1; images narrower than the kernel; a 1-pixel-wide image.
        for &(ci, h, w, kk, pad) in
            &[(2, 7, 6, 3, 1), (3, 5, 9, 5, 2), (1, 4, 4, 1, 0), (2, 2, 1, 3, 1), (1, 1, 3, 5, 2)]
        {
            let s = ConvShape { n: 1, ci, h, w, co: 1, kh: kk, kw: kk, stride: 1, pad };
            assert_eq!((s.ho(), s.wo()), (h, w));
            let x = normal_vec(ci * h * w, 1.0, 9);
            let (mut fast, mut slow) = (vec![f32::NAN; s.k() * s.p()], vec![f32::NAN; s.k() * s.p()]);
            im2col_same(&s, &x, &mut fast);
            im2col_general(&s, &x, &mut slow);
            assert_eq!(fast, slow, "{s:?}");
        }
    }
}
