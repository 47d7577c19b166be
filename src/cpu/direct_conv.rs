//! Direct 3x3 convolution (padding 1, stride 1, and stride 2 through phase planes) with output
//! pixels in AVX-512 lanes.
//!
//! Why not im2col + GEMM here: with few channels (wrn-28-2's first stage: 32 channels on 32 x 32
//! images) every im2col element feeds only `co` multiply-adds, so writing and re-reading the 9x
//! larger im2col matrix costs as much as the product itself (the GEMM path ran at 25-40% of FMA
//! peak there). These kernels read the input planes in place, framed by one zero row above and
//! below, and keep a tile of outputs in registers across the whole ci x 3 x 3 reduction:
//! - forward (and the input gradient, the same convolution of dY with flipped weights, where
//!   `winograd` does not take it): an OCB-channel x R-vector tile of outputs, one broadcast
//!   weight per channel and tap times the R shifted input vectors;
//! - weight gradient, when ci is a multiple of 16 and co of 8 (every wrn-28-2 layer but the
//!   first): input channels in lanes, from a channel-last copy of X, 8 output channels x 3 tap
//!   columns per pass, dY broadcast (`weight_grad_channel_last`); otherwise four output channels
//!   x the taps of one input channel as 16-lane partial sums over output pixels, reduced across
//!   lanes once per pass (`weight_grad`; masked loads make it ~40% slower per FLOP);
//! - stride 2 (even sides): each input plane copied as its four phase planes (even / odd rows x
//!   even / odd columns), on which every stride-2 tap is a stride-1 tap, so the forward runs on
//!   the same tile; the input gradient is four stride-1 tiles over dY, one per phase of dX, with
//!   the 1, 2, 2 or 4 taps that reach it (`input_grad_strided`).
//!
//! A vector is 16 consecutive pixels of a plane (row-major): a row segment, two 8-pixel rows, or
//! the end of one 28-pixel row and the start of the next. A tap one row up or down is the same
//! offset for every lane (the zero rows frame the image); horizontal taps that would cross the
//! image's left or right edge, into the neighbouring row, are masked lanes (zeros): no
//! horizontally padded copy, no wasted lanes.

use crate::kernel_args::{ConvShape, SyncPtr};
use rayon::prelude::*;

/// Output channels per forward tile (broadcast weights).
const OCB: usize = 8;
/// Output vectors (16 pixels each) per forward tile.
const RV: usize = 3;
/// Images padded and convolved together in the forward pass: 3 x ceil(pixels / 16) vectors always
/// split into whole tiles of RV = 3, even when one image has only 4 (8 x 8).
const GROUP: usize = 3;
/// Input channels per lane block of the channel-last weight gradient.
const CL: usize = 16;
/// Output channels per channel-last weight-gradient pass (broadcast dY values).
const CL_O: usize = 8;
/// Output channels per weight-gradient block.
const DW_OCB: usize = 4;
/// Narrower images take the weight gradient through im2col + GEMM: at 8 x 8 with 128 channels
/// that ran 1.4x faster (a pass there covers only 4 vectors per image and channel).
const DW_MIN_WIDTH: usize = 16;
/// Bytes of dY one weight-gradient pass keeps in L1 (of 48 KiB on the machines we target).
const DW_L1_BYTES: usize = 16 << 10;
/// Every tap of a 3x3 kernel (bit 3 i + j for tap (i, j)).
const ALL_TAPS: u16 = 0x1FF;
/// Zero floats before the first and after the last framed plane: a corner tap's masked-off lanes,
/// and a partial last vector's lanes (up to 15 past its plane, plus a tap's row and column),
/// still address the buffer.
const SLACK: usize = 16;

/// Whether the direct kernels handle this convolution on this CPU. `MUSCLE_CONV=gemm` turns them
/// off, to compare the two paths on one machine.
pub fn applies(s: &ConvShape) -> bool {
    enabled() && shape_fits(s)
}

/// Whether this CPU runs the kernels (AVX-512) and `MUSCLE_CONV=gemm` does not turn them off.
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        std::env::var("MUSCLE_CONV").map_or(true, |v| v != "gemm") && super::simd::level() == super::simd::Level::Avx512
    })
}

/// Whether the forward pass should take the direct kernel: 3x3 with padding 1 at stride 1, or
/// at stride 2 with even sides (`forward` splits the input into phases). With one input channel
/// a tile has only 9 taps to sum, and im2col + GEMM ran the convnet's 1 -> 32 layer 1.56x faster.
pub fn forward_applies(s: &ConvShape) -> bool {
    enabled() && (shape_fits(s) || strided_fits(s)) && s.ci > 1
}

/// 3x3, stride 2, padding 1, even sides: every output pixel's taps fall on the four phase planes
/// of the input (even / odd rows x even / odd columns) at offsets 0 or -1.
fn strided_fits(s: &ConvShape) -> bool {
    let geometry = s.kh == 3 && s.kw == 3 && s.stride == 2 && s.pad == 1;
    geometry && s.h > 0 && s.w > 0 && s.h.is_multiple_of(2) && s.w.is_multiple_of(2) && s.ci > 0 && s.co > 0
}

/// Whether `weight_grad_channel_last` handles this stride-2 convolution on this CPU: 3x3,
/// padding 1, even sides, 16k input and 8k output channels (wrn-28-2's downsampling layers).
pub fn strided_dw_applies(s: &ConvShape) -> bool {
    enabled() && strided_fits(s) && channel_last_fits(s)
}

/// Channel counts the channel-last weight gradient is written for: 16k in, 8k out.
fn channel_last_fits(s: &ConvShape) -> bool {
    s.ci > 0 && s.ci.is_multiple_of(CL) && s.co > 0 && s.co.is_multiple_of(CL_O)
}

/// The geometry the kernels are written for (independent of the CPU): 3x3, stride 1, padding 1.
fn shape_fits(s: &ConvShape) -> bool {
    s.kh == 3 && s.kw == 3 && s.stride == 1 && s.pad == 1 && s.h > 0 && s.w > 0 && s.ci > 0 && s.co > 0
}

/// Floats of one framed plane: a zero row, the image rows, a zero row.
fn framed_plane(s: &ConvShape) -> usize {
    (s.h + 2) * s.w
}

/// Copies planes `x` [planes, h, w] into `xp` [planes, h + 2, w] as framed planes (a zero row
/// above and below each).
fn frame_planes(planes: usize, h: usize, w: usize, x: &[f32], xp: &mut [f32]) {
    let fp = (h + 2) * w;
    for (dst, src) in xp[..planes * fp].chunks_exact_mut(fp).zip(x.chunks_exact(h * w)) {
        dst[..w].fill(0.0);
        dst[w..(h + 1) * w].copy_from_slice(src);
        dst[(h + 1) * w..].fill(0.0);
    }
}

/// `buf` resized to SLACK + `planes` framed planes of `x` + SLACK.
fn framed(s: &ConvShape, planes: usize, x: &[f32], buf: &mut Vec<f32>) {
    let len = planes * framed_plane(s);
    buf.resize(2 * SLACK + len, 0.0);
    buf[..SLACK].fill(0.0);
    buf[SLACK + len..].fill(0.0);
    frame_planes(planes, s.h, s.w, x, &mut buf[SLACK..SLACK + len]);
}

/// For the vector starting at pixel `p` of a plane `w` wide: the lanes a left tap may read (not
/// column 0) and a right tap may read (not column w - 1).
fn edge_masks(p: usize, w: usize) -> (u16, u16) {
    let (mut left, mut right) = (0u16, 0u16);
    for lane in 0..16 {
        let col = (p + lane) % w;
        if col != 0 {
            left |= 1 << lane;
        }
        if col != w - 1 {
            right |= 1 << lane;
        }
    }
    (left, right)
}

/// `buf` resized to SLACK + each of `planes` planes of `x` (h x w, both even) as its four phase
/// planes, framed like `framed`'s: [plane][2 pr + pc][h / 2 + 2][w / 2], phase (pr, pc) holding
/// the pixels (2 r + pr, 2 q + pc) + SLACK.
fn phased(s: &ConvShape, planes: usize, x: &[f32], buf: &mut Vec<f32>) {
    let (ho, wo) = (s.h / 2, s.w / 2);
    let fp = (ho + 2) * wo;
    let len = planes * 4 * fp;
    buf.resize(2 * SLACK + len, 0.0);
    buf[..SLACK].fill(0.0);
    buf[SLACK + len..].fill(0.0);
    for (dst, src) in buf[SLACK..SLACK + len].chunks_exact_mut(4 * fp).zip(x.chunks_exact(s.h * s.w)) {
        for (phase, d) in dst.chunks_exact_mut(fp).enumerate() {
            let (pr, pc) = (phase / 2, phase % 2);
            d[..wo].fill(0.0);
            d[(ho + 1) * wo..].fill(0.0);
            for (r, row) in d[wo..(ho + 1) * wo].chunks_exact_mut(wo).enumerate() {
                let srow = &src[(2 * r + pr) * s.w..][..s.w];
                for (q, v) in row.iter_mut().enumerate() {
                    *v = srow[2 * q + pc];
                }
            }
        }
    }
}

/// The lane masks of one vector of a plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Lanes {
    /// Lanes a left tap may read.
    left: u16,
    /// Lanes a right tap may read.
    right: u16,
    /// Lanes inside the plane (all but in the last vector of a plane of 16k + r pixels).
    valid: u16,
}

/// The masks of every vector of one h x w plane (the last one partial when 16 does not divide
/// h * w: its other lanes compute on the frame and the next plane's first pixels, and are
/// neither stored nor summed).
fn plane_lanes(s: &ConvShape) -> Vec<Lanes> {
    let plane = s.h * s.w;
    (0..plane.div_ceil(16))
        .map(|v| {
            let (left, right) = edge_masks(16 * v, s.w);
            let n = (plane - 16 * v).min(16);
            Lanes { left, right, valid: if n == 16 { u16::MAX } else { (1u16 << n) - 1 } }
        })
        .collect()
}

/// Weights [co, ci, 3, 3] regrouped as [co / OCB][ci][3][3][OCB] (zero rows past `co`), so a
/// tile's broadcasts walk memory in order.
fn pack_weights(s: &ConvShape, w: &[f32]) -> Vec<f32> {
    let blocks = s.co.div_ceil(OCB);
    let taps = s.ci * 9;
    let mut out = vec![0.0f32; blocks * taps * OCB];
    for o in 0..s.co {
        let (b, lane) = (o / OCB, o % OCB);
        for t in 0..taps {
            out[(b * taps + t) * OCB + lane] = w[o * taps + t];
        }
    }
    out
}

/// Forward: y [n, co, ho, wo] = conv3x3(x [n, ci, h, w], w [co, ci, 3, 3]), padding 1, stride 1
/// or 2. Callers check `forward_applies(s)` first.
pub fn forward(s: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    // The kernels are AVX-512 code: a call past `forward_applies` would be undefined behaviour.
    assert!(enabled() && (shape_fits(s) || strided_fits(s)), "direct_conv::forward: {s:?} on this CPU");
    if s.stride == 2 {
        forward_strided::<2>(s, x, w, y)
    } else {
        forward_strided::<1>(s, x, w, y)
    }
}

/// The forward at stride S. Tiles, lane masks and framed planes all have the output's geometry
/// `g`: at stride 2 each input plane becomes four phase planes of that size (`phased`), and a
/// stride-2 tap is a stride-1 tap on one of them, so one tile serves both.
fn forward_strided<const S: usize>(s: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    let g = ConvShape { h: s.ho(), w: s.wo(), stride: 1, ..*s };
    let wp = pack_weights(s, w);
    let img_in = s.ci * s.h * s.w;
    let img_out = s.co * g.h * g.w;
    let masks = plane_lanes(&g);
    // Sized for a whole group up front: a smaller last group then never makes a task's buffer
    // grow, so every step asks the allocator for the same block sizes (and its cache serves them).
    let group_len = 2 * SLACK + GROUP * S * S * s.ci * framed_plane(&g);
    let init = || Vec::with_capacity(group_len);
    y.par_chunks_mut(GROUP * img_out).zip(x.par_chunks(GROUP * img_in)).for_each_init(init, |xp, (yg, xg)| {
        let imgs = xg.len() / img_in;
        if S == 1 {
            framed(&g, imgs * s.ci, xg, xp);
        } else {
            phased(s, imgs * s.ci, xg, xp);
        }
        forward_group::<S, ALL_TAPS>(&g, imgs, xp, &wp, &masks, yg);
    });
}

/// `imgs` framed images (S x S phase planes per channel) of output geometry `g`: every
/// output-channel block x every tile of RV output vectors, a tile's vectors possibly in
/// different images; the taps in TAPS (bit 3 i + j for tap (i, j)) only, their weights packed
/// in that order.
fn forward_group<const S: usize, const TAPS: u16>(
    g: &ConvShape,
    imgs: usize,
    xp: &[f32],
    wp: &[f32],
    masks: &[Lanes],
    y: &mut [f32],
) {
    let taps = TAPS.count_ones() as usize;
    let fp = framed_plane(g);
    let per_img = (g.h * g.w).div_ceil(16);
    let nvec = imgs * per_img;
    let plane_out = g.h * g.w;
    let img_planes = S * S * g.ci;
    assert!(
        xp.len() >= 2 * SLACK + imgs * img_planes * fp
            && y.len() >= imgs * g.co * plane_out
            && wp.len() >= g.co.div_ceil(OCB) * g.ci * taps * OCB
            && masks.len() >= per_img
    );
    // Vector v: the input offset of its centre tap in channel 0 (phase 0), its output offset in
    // output channel 0, and its lane masks.
    let at = |v: usize| {
        let (k, p) = (v / per_img, (v % per_img) * 16);
        (SLACK + k * img_planes * fp + g.w + p, k * g.co * plane_out + p, masks[v % per_img])
    };
    for b in 0..g.co.div_ceil(OCB) {
        let valid = (g.co - b * OCB).min(OCB);
        let wb = &wp[b * g.ci * taps * OCB..];
        let yb = &mut y[b * OCB * plane_out..];
        let mut v = 0;
        while v < nvec {
            let rv = (nvec - v).min(RV);
            // SAFETY: the assert above and `at` keep every unmasked load inside xp (a centre tap
            // moves at most one framed row and one column, and a partial vector's lanes run at
            // most 15 past its plane; the frame rows and SLACK absorb both) and every store (of
            // the valid lanes) inside y's first `co` planes of each image; the CPU has AVX-512
            // (asserted by every public entry).
            unsafe {
                if rv == RV {
                    let tiles: [(usize, usize, Lanes); RV] = std::array::from_fn(|r| at(v + r));
                    let t = Tile { xo: tiles.map(|t| t.0), yo: tiles.map(|t| t.1), masks: tiles.map(|t| t.2) };
                    tile::<RV, S, TAPS>(xp.as_ptr(), fp, g.w, &t, wb.as_ptr(), g.ci, yb.as_mut_ptr(), plane_out, valid);
                } else {
                    for u in v..v + rv {
                        let (xo, yo, m) = at(u);
                        let t = Tile { xo: [xo], yo: [yo], masks: [m] };
                        tile::<1, S, TAPS>(
                            xp.as_ptr(),
                            fp,
                            g.w,
                            &t,
                            wb.as_ptr(),
                            g.ci,
                            yb.as_mut_ptr(),
                            plane_out,
                            valid,
                        );
                    }
                }
            }
            v += rv;
        }
    }
}

/// The stride-2 input gradient per phase (pr, pc) of dX as a stride-1 tile over framed dY planes:
/// dX (2 r + pr, 2 q + pc) meets dY rows r (and r + 1 when pr = 1) and columns q (and q + 1 when
/// pc = 1), i.e. taps (i, j) with i - 1, j - 1 in {0, 1}: bit 3 i + j.
const PHASE_TAPS: [u16; 4] = [0x010, 0x030, 0x090, 0x1B0];

/// The kernel row (or column) that tap index `i` of a phase with row (column) parity `parity`
/// carries: even dX rows meet dY row r through ky = 1; odd rows meet row r through ky = 2 and
/// row r + 1 through ky = 0 (input row 2 oy + ky - 1).
fn phase_tap(parity: usize, i: usize) -> usize {
    match (parity, i) {
        (0, _) => 1,
        (_, 1) => 2,
        _ => 0,
    }
}

/// Weights of phase `phase` of the stride-2 input gradient as a tile wants them:
/// [ci / OCB][co][the phase's taps][OCB], dX channels in lanes (zero past `ci`).
fn pack_phase_weights(s: &ConvShape, w: &[f32], phase: usize) -> Vec<f32> {
    let (pr, pc) = (phase / 2, phase % 2);
    let taps: Vec<(usize, usize)> =
        (0..9).filter(|t| PHASE_TAPS[phase] & (1 << t) != 0).map(|t| (t / 3, t % 3)).collect();
    let mut out = vec![0.0f32; s.ci.div_ceil(OCB) * s.co * taps.len() * OCB];
    for c in 0..s.ci {
        let (b, lane) = (c / OCB, c % OCB);
        for o in 0..s.co {
            for (t, &(i, j)) in taps.iter().enumerate() {
                let (ky, kx) = (phase_tap(pr, i), phase_tap(pc, j));
                out[((b * s.co + o) * taps.len() + t) * OCB + lane] = w[((o * s.ci + c) * 3 + ky) * 3 + kx];
            }
        }
    }
    out
}

/// Input gradient dx [n, ci, h, w] (overwritten) of a 3x3, stride-2, padding-1 convolution with
/// even sides, from dy [n, co, h / 2, w / 2]: each phase of dX (even / odd rows x even / odd
/// columns) is a stride-1 tile over the framed dY planes with 1, 2, 2 or 4 of its taps (9 in
/// all, no multiply by a zero), written to a phase buffer and then interleaved into dX. Callers
/// check `strided_dw_applies(s)` (or at least AVX-512 and `strided_fits`) first.
pub fn input_grad_strided(s: &ConvShape, w: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert!(enabled() && strided_fits(s), "direct_conv::input_grad_strided: {s:?} on this CPU");
    // dY as the tiles' input: co channels of ho x wo; their outputs are dX's ci phase planes.
    let g = ConvShape { ci: s.co, co: s.ci, h: s.ho(), w: s.wo(), stride: 1, ..*s };
    let wps: [Vec<f32>; 4] = std::array::from_fn(|p| pack_phase_weights(s, w, p));
    let masks = plane_lanes(&g);
    let plane = g.h * g.w;
    let (img_dy, img_dx) = (s.co * plane, s.ci * s.h * s.w);
    let framed_len = 2 * SLACK + GROUP * s.co * framed_plane(&g);
    let init = || (Vec::with_capacity(framed_len), vec![0.0f32; GROUP * s.ci * plane]);
    dx.par_chunks_mut(GROUP * img_dx).zip(dy.par_chunks(GROUP * img_dy)).for_each_init(init, |(yp, ph), (dxg, dyg)| {
        let imgs = dyg.len() / img_dy;
        framed(&g, imgs * s.co, dyg, yp);
        let ph = &mut ph[..imgs * s.ci * plane];
        for (phase, wp) in wps.iter().enumerate() {
            match phase {
                0 => forward_group::<1, { PHASE_TAPS[0] }>(&g, imgs, yp, wp, &masks, ph),
                1 => forward_group::<1, { PHASE_TAPS[1] }>(&g, imgs, yp, wp, &masks, ph),
                2 => forward_group::<1, { PHASE_TAPS[2] }>(&g, imgs, yp, wp, &masks, ph),
                _ => forward_group::<1, { PHASE_TAPS[3] }>(&g, imgs, yp, wp, &masks, ph),
            }
            let (pr, pc) = (phase / 2, phase % 2);
            for (dst, src) in dxg.chunks_exact_mut(s.h * s.w).zip(ph.chunks_exact(plane)) {
                for (r, row) in src.chunks_exact(g.w).enumerate() {
                    let drow = &mut dst[(2 * r + pr) * s.w..][..s.w];
                    for (q, &v) in row.iter().enumerate() {
                        drow[2 * q + pc] = v;
                    }
                }
            }
        }
    });
}

/// Where a forward tile's R vectors read and write, and their lane masks.
struct Tile<const R: usize> {
    xo: [usize; R],
    yo: [usize; R],
    masks: [Lanes; R],
}

/// One forward tile: OCB output channels x R output vectors, over ci x 3 x 3 taps. Stride 1:
/// tap (i, j) of channel c reads plane c at row i - 1, column j - 1 from the output pixel.
/// Stride 2: input row 2 oy + i - 1 is phase row oy - 1 of the odd rows (i = 0), oy of the even
/// (i = 1) or of the odd (i = 2); columns likewise; so the tap reads phase plane
/// 4 c + 2 [i != 1] + [j != 1] at row -[i == 0], column -[j == 0].
///
/// Taps outside TAPS (bit 3 i + j) are skipped, at no cost: the loops unroll and the test folds.
///
/// # Safety
/// AVX-512F/VL/BW/DQ present; for every c < ci and tap (i, j) the unmasked lanes of the tap's
/// plane at `xo[r]` and offset (rows of `w`) lie inside the framed input; `wb` holds
/// ci * |TAPS| * OCB floats; the valid lanes of `y + o * plane_out + yo[r] .. + 16` inside the
/// output for o < valid.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize, const S: usize, const TAPS: u16>(
    x: *const f32,
    fp: usize,
    w: usize,
    t: &Tile<R>,
    wb: *const f32,
    ci: usize,
    y: *mut f32,
    plane_out: usize,
    valid: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); R]; OCB];
    let (left, right) = (t.masks.map(|m| m.left), t.masks.map(|m| m.right));
    let mut wt = wb;
    // One tap (i, j) of channel c.
    macro_rules! tap {
        ($c:expr, $i:expr, $j:literal) => {
            // The tap's plane, row and column relative to the output pixel (the frame holds the
            // rows past the image; edge columns are masked lanes).
            let (plane, dr, dc): (usize, isize, isize) = if S == 1 {
                ($c, $i as isize - 1, $j - 1)
            } else {
                (4 * $c + 2 * usize::from($i != 1) + usize::from($j != 1), -isize::from($i == 0), -isize::from($j == 0))
            };
            let off = (plane * fp) as isize + dr * w as isize + dc;
            let mut xv = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let p = x.offset(t.xo[r] as isize + off);
                xv[r] = match dc {
                    -1 => _mm512_maskz_loadu_ps(left[r], p),
                    0 => _mm512_loadu_ps(p),
                    _ => _mm512_maskz_loadu_ps(right[r], p),
                };
            }
            for (o, acc_o) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*wt.add(o));
                for r in 0..R {
                    acc_o[r] = _mm512_fmadd_ps(wv, xv[r], acc_o[r]);
                }
            }
            wt = wt.add(OCB);
        };
    }
    // The tap (i, j) if TAPS has it: with literal i and j the test folds at compile time.
    macro_rules! tap_if {
        ($c:expr, $i:literal, $j:literal) => {
            if TAPS & (1 << (3 * $i + $j)) != 0 {
                tap!($c, $i, $j);
            }
        };
    }
    if TAPS == ALL_TAPS {
        for c in 0..ci {
            for i in 0..3usize {
                tap!(c, i, 0);
                tap!(c, i, 1);
                tap!(c, i, 2);
            }
        }
    } else {
        // Subsets (the stride-2 input gradient's phases) are written out tap by tap: tested in
        // a loop over i, the compiler kept the test and the j loop at run time (2.4x slower).
        for c in 0..ci {
            tap_if!(c, 0, 0);
            tap_if!(c, 0, 1);
            tap_if!(c, 0, 2);
            tap_if!(c, 1, 0);
            tap_if!(c, 1, 1);
            tap_if!(c, 1, 2);
            tap_if!(c, 2, 0);
            tap_if!(c, 2, 1);
            tap_if!(c, 2, 2);
        }
    }
    for (o, acc_o) in acc.iter().enumerate().take(valid) {
        for ((v, yo), m) in acc_o.iter().zip(t.yo).zip(t.masks) {
            _mm512_mask_storeu_ps(y.add(o * plane_out + yo), m.valid, *v);
        }
    }
}

/// The weight gradient `dw` [co, ci, 3, 3] (overwritten) through the direct kernels, when they
/// suit this layer (`applies(s)` checked by the caller); false: narrow images, which im2col +
/// GEMM runs faster, and `dw` is untouched.
pub fn weight_grad(s: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) -> bool {
    assert!(applies(s), "direct_conv::weight_grad: {s:?} on this CPU");
    if channel_last_fits(s) {
        weight_grad_channel_last(s, x, dy, dw);
    } else if s.w >= DW_MIN_WIDTH {
        weight_grad_pixel_lane(s, x, dy, dw);
    } else {
        return false;
    }
    true
}

/// dW[o, c, i, j] = sum over images and output pixels of dY[o] x X[c] shifted by (i - 1, j - 1).
/// Parallel over blocks of output channels, so each sum has one fixed order whatever the threads.
fn weight_grad_pixel_lane(s: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let fp = framed_plane(s);
    let plane_out = s.h * s.w;
    let img_in = s.ci * plane_out;
    assert!(x.len() >= s.n * img_in && dy.len() >= s.n * s.co * plane_out && dw.len() >= s.co * s.ci * 9);
    // Every element is overwritten below: a pooled buffer, not fresh zeroed pages.
    let mut xp = crate::pool::take(2 * SLACK + s.n * s.ci * fp);
    let len = s.n * s.ci * fp;
    xp[..SLACK].fill(0.0);
    xp[SLACK + len..].fill(0.0);
    let per_task = s.n.div_ceil(super::threads()) * s.ci;
    xp[SLACK..SLACK + len]
        .par_chunks_mut(per_task * fp)
        .zip(x[..s.n * img_in].par_chunks(per_task * plane_out))
        .for_each(|(dst, src)| frame_planes(src.len() / plane_out, s.h, s.w, src, dst));
    let taps = s.ci * 9;
    let masks = plane_lanes(s);
    let dw_base = SyncPtr(dw.as_mut_ptr());
    let (xp_ref, masks) = (&xp, &masks);
    // Images per pass: a pass's dY planes of the block stay in L1 across all input channels
    // (streaming every image's dY per channel ran out of L2 bandwidth); each pass's 16-lane
    // partial sums are reduced and added in image order, so the result is fixed by the shape.
    let group = (DW_L1_BYTES / (DW_OCB * plane_out * 4)).clamp(1, s.n);
    (0..s.co.div_ceil(DW_OCB)).into_par_iter().for_each(move |b| {
        let o0 = b * DW_OCB;
        let valid = (s.co - o0).min(DW_OCB);
        // SAFETY: block b writes dw's rows o0..o0 + valid only.
        let out = unsafe { dw_base.slice(o0 * taps, valid * taps) };
        out.fill(0.0);
        for k0 in (0..s.n).step_by(group) {
            let imgs = group.min(s.n - k0);
            let dyp = dy[(k0 * s.co + o0) * plane_out..].as_ptr();
            let xk = xp_ref[SLACK + k0 * s.ci * fp + s.w..].as_ptr();
            let g = DwGeom { dy_img: s.co * plane_out, plane_out, xp_img: s.ci * fp, fp, imgs, w: s.w, ci: s.ci };
            // SAFETY: images k0..k0 + imgs, channels o0..o0 + valid of dy and every framed
            // plane of those images lie inside the slices (asserted above); the unmasked lanes
            // of a tap stay inside a plane's frame rows; `out` holds valid rows of ci * 9 sums.
            unsafe {
                if valid == DW_OCB {
                    // Four channels x nine taps would need 36 accumulators: tap rows 0-1, then 2.
                    dw_add::<DW_OCB, 0, 2>(dyp, xk, masks.as_ptr(), &g, out.as_mut_ptr());
                    dw_add::<DW_OCB, 2, 1>(dyp, xk, masks.as_ptr(), &g, out.as_mut_ptr());
                } else {
                    for o in 0..valid {
                        dw_add::<1, 0, 3>(
                            dyp.add(o * plane_out),
                            xk,
                            masks.as_ptr(),
                            &g,
                            out.as_mut_ptr().add(o * taps),
                        );
                    }
                }
            }
        }
    });
    crate::pool::give(xp);
}

/// dW as `weight_grad`, with input channels in lanes (stride 1 or 2; callers check
/// `channel_last_fits`, or `strided_dw_applies`): X is first copied to a channel-last,
/// zero-bordered layout [n][ci / 16][h + 2][w + 2][16]; then for 8 output channels and one tap
/// row, each output pixel adds its 8 dY values (broadcast) times the 3 input vectors of 16
/// channels at the tap columns (three loads per pixel, from L1)
/// into 24 accumulators. No masks, no lines split by the loads, no reduction across lanes: the
/// forward tile's shape, with dY in the weights' place. One task per block of 16 input channels
/// walks every image once, all output channels and tap rows of that image while its block is in
/// L2; each image's sums are added to the task's totals, so every sum has one fixed order.
pub fn weight_grad_channel_last(s: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let geometry = shape_fits(s) || strided_fits(s);
    assert!(enabled() && geometry && channel_last_fits(s), "weight_grad_channel_last: {s:?} on this CPU");
    let (hp, wp) = (s.h + 2, s.w + 2);
    let plane_in = s.h * s.w;
    let plane_out = s.ho() * s.wo();
    let blocks = s.ci / CL;
    let img_b = blocks * hp * wp * CL;
    assert!(x.len() >= s.x_len() && dy.len() >= s.y_len() && dw.len() >= s.w_len());
    let mut xb = crate::pool::take(s.n * img_b);
    xb.par_chunks_mut(img_b).zip(x.par_chunks(s.ci * plane_in)).for_each(|(dst, src)| {
        // SAFETY: `enabled` checked AVX-512; the sizes match the layouts (asserted above).
        unsafe { to_channel_last(s, src, dst) }
    });
    let taps = s.ci * 9;
    let dw_base = SyncPtr(dw.as_mut_ptr());
    let xb_ref = &xb;
    // One task per (input block, share of the output blocks): with fewer input blocks than
    // threads (16 input channels) the output channels are split too, so no thread idles.
    let out_blocks = s.co / CL_O;
    let shares = super::threads().div_ceil(blocks).clamp(1, out_blocks);
    let per_share = out_blocks.div_ceil(shares);
    (0..blocks * shares).into_par_iter().for_each(move |task| {
        let (b, share) = (task / shares, task % shares);
        let obs = share * per_share..((share + 1) * per_share).min(out_blocks);
        // sums[ob][i][o][j][lane]: output channel ob * CL_O + o, input channel b * CL + lane, tap (i, j).
        let mut sums = vec![0.0f32; out_blocks * 3 * CL_O * 3 * CL];
        for k in 0..s.n {
            for ob in obs.clone() {
                let dyp = dy[(k * s.co + ob * CL_O) * plane_out..].as_ptr();
                for i in 0..3 {
                    let xr = xb_ref[k * img_b + (b * hp + i) * wp * CL..].as_ptr();
                    let dst = &mut sums[(ob * 3 + i) * CL_O * 3 * CL..][..CL_O * 3 * CL];
                    // SAFETY: channels ob * CL_O.. of image k in dy, and rows i..i + h, columns
                    // 0..w + 2 of block b of image k in xb, lie inside the slices.
                    unsafe {
                        if s.stride == 2 {
                            dw_channel_last::<2>(dyp, plane_out, xr, s.ho(), s.wo(), wp, dst)
                        } else {
                            dw_channel_last::<1>(dyp, plane_out, xr, s.ho(), s.wo(), wp, dst)
                        }
                    };
                }
            }
        }
        for ob in obs {
            for i in 0..3 {
                for o in 0..CL_O {
                    for j in 0..3 {
                        for lane in 0..CL {
                            let v = sums[(((ob * 3 + i) * CL_O + o) * 3 + j) * CL + lane];
                            let at = (ob * CL_O + o) * taps + (b * CL + lane) * 9 + i * 3 + j;
                            // SAFETY: this task alone writes output channels of its share x
                            // input channels of block b.
                            unsafe { *dw_base.ptr().add(at) = v };
                        }
                    }
                }
            }
        }
    });
    crate::pool::give(xb);
}

/// One image's planes [ci, h, w] as [ci / 16][h + 2][w + 2][16] with a zero border.
///
/// # Safety
/// AVX-512F/VL/BW/DQ present; ci a multiple of 16; `x` and `xb` hold the image.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
unsafe fn to_channel_last(s: &ConvShape, x: &[f32], xb: &mut [f32]) {
    use std::arch::x86_64::*;
    let (hp, wp) = (s.h + 2, s.w + 2);
    let plane = s.h * s.w;
    for b in 0..s.ci / CL {
        let dst = &mut xb[b * hp * wp * CL..(b + 1) * hp * wp * CL];
        dst[..wp * CL].fill(0.0);
        dst[(hp - 1) * wp * CL..].fill(0.0);
        for r in 1..=s.h {
            dst[r * wp * CL..][..CL].fill(0.0);
            dst[(r * wp + wp - 1) * CL..][..CL].fill(0.0);
        }
        let src = &x[b * CL * plane..(b + 1) * CL * plane];
        for p0 in (0..plane).step_by(16) {
            let n = (plane - p0).min(16);
            let m: __mmask16 = if n == 16 { u16::MAX } else { (1u16 << n) - 1 };
            // SAFETY (of the masked loads): lanes p0..p0 + n of each channel plane are inside src.
            let mut v: [__m512; 16] =
                std::array::from_fn(|c| _mm512_maskz_loadu_ps(m, src.as_ptr().add(c * plane + p0)));
            super::simd::avx512::transpose16(&mut v);
            for (q, vq) in v.iter().enumerate().take(n) {
                let (r, col) = ((p0 + q) / s.w, (p0 + q) % s.w);
                _mm512_storeu_ps(dst[((r + 1) * wp + col + 1) * CL..][..CL].as_mut_ptr(), *vq);
            }
        }
    }
}

/// Adds to `sums` [CL_O][3][16] one image's products for one tap row: output channels `dy`,
/// `dy + plane_out`, ... (ho x wo planes) against the channel-last padded input rows at `xb`
/// (wp * 16 floats each, starting at the tap row): output pixel (r, c) meets padded input pixel
/// (S r, S c + j) for tap column j.
///
/// # Safety
/// AVX-512F/VL/BW/DQ present; CL_O planes of ho * wo floats at `dy`; S (ho - 1) + 1 rows of
/// wp * 16 floats at `xb`, with S (wo - 1) + 3 <= wp; `sums` holds CL_O * 3 * 16 floats.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
unsafe fn dw_channel_last<const S: usize>(
    dy: *const f32,
    plane_out: usize,
    xb: *const f32,
    ho: usize,
    wo: usize,
    wp: usize,
    sums: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 3]; CL_O];
    for r in 0..ho {
        let xr = xb.add(S * r * wp * CL);
        let d = dy.add(r * wo);
        for col in 0..wo {
            // Each tap vector is loaded afresh (from L1): carrying the previous pixel's taps in
            // registers made the compiler rotate them and spill accumulators (24 + 3 + the
            // broadcasts exceed 32 registers).
            let xc = xr.add(S * col * CL);
            let x = [_mm512_loadu_ps(xc), _mm512_loadu_ps(xc.add(CL)), _mm512_loadu_ps(xc.add(2 * CL))];
            for (o, acc_o) in acc.iter_mut().enumerate() {
                let g = _mm512_set1_ps(*d.add(o * plane_out + col));
                for j in 0..3 {
                    acc_o[j] = _mm512_fmadd_ps(g, x[j], acc_o[j]);
                }
            }
        }
    }
    for (o, acc_o) in acc.iter().enumerate() {
        for (j, v) in acc_o.iter().enumerate() {
            let p = sums[(o * 3 + j) * CL..][..CL].as_mut_ptr();
            _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *v));
        }
    }
}

/// Strides and extents of one weight-gradient pass (elements, not bytes).
struct DwGeom {
    dy_img: usize,
    plane_out: usize,
    xp_img: usize,
    fp: usize,
    imgs: usize,
    w: usize,
    ci: usize,
}

/// Adds to `out` [O][ci][9] the sums of tap rows I0..I0 + NI of O output channels (dY from `dy`)
/// against every framed input channel (`xp` points at image 0's first image row), over
/// `g.imgs` images.
///
/// # Safety
/// AVX-512F/VL/BW/DQ present; `dy + k * dy_img + o * plane_out .. + plane_out` and the framed
/// planes around `xp + k * xp_img` inside their buffers for k < imgs, o < O; `masks` holds
/// ceil(plane_out / 16) entries; `out` holds O * ci * 9 floats.
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq")]
unsafe fn dw_add<const O: usize, const I0: usize, const NI: usize>(
    dy: *const f32,
    xp: *const f32,
    masks: *const Lanes,
    g: &DwGeom,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    for c in 0..g.ci {
        let mut acc = [[_mm512_setzero_ps(); 9]; O];
        for k in 0..g.imgs {
            let d = dy.add(k * g.dy_img);
            // Tap row I0 of output row 0 is input row I0 - 1 (a frame row for I0 = 0).
            let xk = xp.add(k * g.xp_img + c * g.fp + I0 * g.w).sub(g.w);
            for v in 0..g.plane_out.div_ceil(16) {
                let p = 16 * v;
                let Lanes { left, right, valid } = *masks.add(v);
                // dY lanes past the plane are zero, so the frame and next-plane values their x
                // lanes read add nothing.
                let mut dv = [_mm512_setzero_ps(); O];
                for (o, dvo) in dv.iter_mut().enumerate() {
                    *dvo = _mm512_maskz_loadu_ps(valid, d.add(o * g.plane_out + p));
                }
                for i in 0..NI {
                    let xr = xk.add(i * g.w + p);
                    let xs = [
                        _mm512_maskz_loadu_ps(left, xr.sub(1)),
                        _mm512_loadu_ps(xr),
                        _mm512_maskz_loadu_ps(right, xr.add(1)),
                    ];
                    for (j, xv) in xs.iter().enumerate() {
                        for o in 0..O {
                            acc[o][i * 3 + j] = _mm512_fmadd_ps(dv[o], *xv, acc[o][i * 3 + j]);
                        }
                    }
                }
            }
        }
        for (o, acc_o) in acc.iter().enumerate() {
            let dst = out.add((o * g.ci + c) * 9 + I0 * 3);
            for (t, v) in acc_o.iter().enumerate().take(NI * 3) {
                *dst.add(t) += _mm512_reduce_add_ps(*v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::im2col::assert_forward_matches_naive;
    use crate::rng::normal_vec;

    /// Partial channel blocks, odd channel counts, image counts that leave a partial group and
    /// a partial tile, vectors of one row segment (w 16, 32, 48), of several rows (w 8, 4), a
    /// one-vector plane, widths that neither divide 16 nor are divided by it (28, 24, 12), planes
    /// whose last vector is partial (14 x 14, 7 x 7, 3 x 5, 1 x 1), and
    /// channel counts the channel-last weight gradient takes (16k in, 8k out; with 16 in, the
    /// output blocks are split between threads).
    fn shapes() -> Vec<ConvShape> {
        let conv = |n, ci, h, w, co| ConvShape { n, ci, h, w, co, kh: 3, kw: 3, stride: 1, pad: 1 };
        vec![
            conv(2, 3, 4, 16, 5),
            conv(4, 4, 5, 32, 11),
            conv(1, 2, 1, 16, 8),
            conv(5, 5, 2, 48, 16),
            conv(4, 6, 8, 8, 9),
            conv(3, 2, 4, 4, 3),
            conv(2, 7, 3, 32, 4),
            conv(3, 32, 8, 8, 16),
            conv(2, 16, 2, 32, 8),
            conv(3, 48, 4, 16, 24),
            conv(2, 3, 4, 28, 10),
            conv(3, 16, 4, 12, 8),
            conv(2, 5, 2, 24, 7),
            conv(2, 16, 4, 16, 24),
            conv(4, 3, 14, 14, 9),
            conv(5, 16, 7, 7, 8),
            conv(4, 2, 3, 5, 3),
            conv(7, 4, 1, 1, 2),
        ]
    }

    #[test]
    fn shapes_outside_the_kernels_are_refused() {
        let ok = ConvShape { n: 1, ci: 1, h: 8, w: 8, co: 1, kh: 3, kw: 3, stride: 1, pad: 1 };
        assert!(shape_fits(&ok) && shape_fits(&ConvShape { w: 28, h: 28, ..ok }));
        assert!(shape_fits(&ConvShape { w: 7, h: 7, ..ok }) && shape_fits(&ConvShape { h: 1, w: 3, ..ok }));
        for bad in [
            ConvShape { stride: 2, ..ok },
            ConvShape { kh: 5, kw: 5, pad: 2, ..ok },
            ConvShape { kh: 1, kw: 1, pad: 0, ..ok },
        ] {
            assert!(!shape_fits(&bad), "{bad:?}");
        }
    }

    #[test]
    fn edge_masks_drop_the_columns_a_tap_would_wrap_into() {
        // 8 wide: each vector holds two rows; columns 0 and 7 of both are masked.
        assert_eq!(edge_masks(16, 8), (0b1111_1110_1111_1110, 0b0111_1111_0111_1111));
        // 32 wide: the first vector of a row starts at column 0, the second ends at column 31.
        assert_eq!(edge_masks(32, 32), (0xfffe, 0xffff));
        assert_eq!(edge_masks(48, 32), (0xffff, 0x7fff));
        // 28 wide: pixels 16..32 are columns 16..27 of row 0 (lane 11 the last), then 0..3.
        assert_eq!(edge_masks(16, 28), (0xefff, 0xf7ff));
        // 7 x 7: four vectors, the last holding pixel 48 only (column 6: no right tap).
        let s = ConvShape { n: 1, ci: 1, h: 7, w: 7, co: 1, kh: 3, kw: 3, stride: 1, pad: 1 };
        let l = plane_lanes(&s);
        assert_eq!((l.len(), l[2].valid, l[3].valid), (4, u16::MAX, 1));
        assert_eq!((l[3].left & 1, l[3].right & 1), (1, 0));
    }

    #[test]
    fn forward_matches_direct_loops() {
        if !applies(&shapes()[0]) {
            eprintln!("skipped: no AVX-512 (or MUSCLE_CONV=gemm)");
            return;
        }
        for (k, s) in shapes().iter().enumerate() {
            assert_forward_matches_naive(s, k as u64, forward);
        }
    }

    /// Stride 2 through the phase planes: output planes of 4 x 4 (one vector), 7 x 7 and 3 x 5
    /// (partial last vectors), 16 x 16; batches that leave a partial group and a partial tile;
    /// output channels short of a block. Odd sides and one input channel are refused.
    #[test]
    fn strided_forward_matches_direct_loops() {
        let conv = |n, ci, h, w, co| ConvShape { n, ci, h, w, co, kh: 3, kw: 3, stride: 2, pad: 1 };
        let shapes = [
            conv(2, 3, 8, 8, 5),
            conv(4, 5, 14, 14, 9),
            conv(5, 2, 6, 10, 8),
            conv(2, 32, 32, 32, 16),
            conv(7, 4, 2, 2, 3),
        ];
        if !forward_applies(&shapes[0]) {
            eprintln!("skipped: no AVX-512 (or MUSCLE_CONV=gemm)");
            return;
        }
        assert!(!forward_applies(&conv(1, 4, 7, 8, 8)) && !forward_applies(&conv(1, 4, 8, 9, 8)));
        assert!(!forward_applies(&conv(1, 1, 8, 8, 8)));
        for (k, s) in shapes.iter().enumerate() {
            assert_forward_matches_naive(s, 70 + k as u64, forward);
        }
    }

    #[test]
    fn gradients_match_the_gemm_path() {
        if !applies(&shapes()[0]) {
            eprintln!("skipped: no AVX-512 (or MUSCLE_CONV=gemm)");
            return;
        }
        for (k, s) in shapes().into_iter().enumerate() {
            let x = normal_vec(s.x_len(), 1.0, 10 + k as u64);
            let w = normal_vec(s.w_len(), 1.0, 20 + k as u64);
            let dy = normal_vec(s.y_len(), 1.0, 30 + k as u64);
            // dX as the dispatch computes it without Winograd: the forward tile on flipped weights.
            let mut dx = vec![f32::NAN; x.len()];
            forward(&ConvShape { ci: s.co, co: s.ci, ..s }, &dy, &s.flip_weights(&w), &mut dx);
            // Both weight-gradient kernels, whatever width `weight_grad` routes to them.
            let mut dw_direct = vec![f32::NAN; w.len()];
            weight_grad_pixel_lane(&s, &x, &dy, &mut dw_direct);
            let mut dw_last = dw_direct.clone();
            if s.ci % CL == 0 && s.co % CL_O == 0 {
                weight_grad_channel_last(&s, &x, &dy, &mut dw_last);
            }
            let (mut dw_ref, mut dx_ref) = (vec![0.0; w.len()], vec![0.0; x.len()]);
            crate::cpu::im2col::gemm_backward(&s, &x, &w, &dy, &mut dw_ref, Some(&mut dx_ref));
            let checks =
                [("dw direct", &dw_direct, &dw_ref), ("dw channel-last", &dw_last, &dw_ref), ("dx", &dx, &dx_ref)];
            for (name, got, want) in checks {
                for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{s:?} {name}[{i}]: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn strided_weight_gradient_matches_the_gemm_path() {
        let conv = |n, ci, h, w, co| ConvShape { n, ci, h, w, co, kh: 3, kw: 3, stride: 2, pad: 1 };
        let shapes = [conv(3, 16, 8, 8, 8), conv(2, 32, 16, 6, 16), conv(2, 16, 4, 4, 24), conv(5, 16, 16, 16, 8)];
        if !strided_dw_applies(&shapes[0]) {
            eprintln!("skipped: no AVX-512 (or MUSCLE_CONV=gemm)");
            return;
        }
        assert!(!strided_dw_applies(&conv(1, 16, 7, 8, 8)) && !strided_dw_applies(&conv(1, 12, 8, 8, 8)));
        for (k, s) in shapes.into_iter().enumerate() {
            let x = normal_vec(s.x_len(), 1.0, 40 + k as u64);
            let w = normal_vec(s.w_len(), 1.0, 50 + k as u64);
            let dy = normal_vec(s.y_len(), 1.0, 60 + k as u64);
            let (mut dw, mut dx) = (vec![f32::NAN; w.len()], vec![f32::NAN; x.len()]);
            weight_grad_channel_last(&s, &x, &dy, &mut dw);
            input_grad_strided(&s, &w, &dy, &mut dx);
            let (mut dw_ref, mut dx_ref) = (vec![0.0; w.len()], vec![0.0; x.len()]);
            crate::cpu::im2col::gemm_backward(&s, &x, &w, &dy, &mut dw_ref, Some(&mut dx_ref));
            for (name, got, want) in [("dw", &dw, &dw_ref), ("dx", &dx, &dx_ref)] {
                for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{s:?} {name}[{i}]: {a} vs {b}");
                }
            }
        }
    }
}
