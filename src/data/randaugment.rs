//! RandAugment (FixMatch's "RA" variant) and Cutout on raw u8 images stored planar C x H x W
//! (C = 1 grey or 3 colour, any H and W), with Pillow's semantics, because FixMatch's reference
//! code calls Pillow: the same LUTs (autocontrast, equalize, solarize, posterize), the same float32
//! blends of ImageEnhance (`Image.blend`: trunc(deg + f (img - deg)), clipped when extrapolating),
//! the same 3x3 SMOOTH filter (border left unfiltered), and the same nearest-neighbour affine
//! sampling (16.16 fixed point, or Pillow's pretabulated scale path for translations).
//! `tests/randaugment.rs` compares every op with Pillow's output (fixtures from
//! `scripts/randaugment-fixtures.py`).
//!
//! One grey constant, [`GREY`] (127 per channel), fills both the pixels that the geometric ops
//! (Rotate, ShearX/Y, TranslateX/Y) bring in from outside the image and the Cutout square.

use crate::error::{Error, Result};
use crate::rng::Rng;

/// The fill of geometric ops and of Cutout, per channel (FixMatch's (127, 127, 127)).
pub const GREY: u8 = 127;

/// Operations drawn per strong view (FixMatch's N).
pub const OPS_PER_VIEW: usize = 2;

/// Largest Cutout side as a fraction of min(H, W).
pub const CUTOUT_MAX: f32 = 0.5;

/// The 14 operations of FixMatch's RandAugment, each with its magnitude in its own units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// The image unchanged (no magnitude).
    Identity,
    /// Per-channel stretch of [min, max] to [0, 255] (ImageOps.autocontrast, cutoff 0).
    AutoContrast,
    /// Per-channel histogram equalisation (ImageOps.equalize).
    Equalize,
    /// Rotation by the magnitude in degrees, counter-clockwise, about the centre.
    Rotate,
    /// Pixels at or above floor(256 t) inverted, for the magnitude t in [0, 1].
    Solarize,
    /// ImageEnhance.Color with the magnitude as factor (identity on 1-channel images).
    Color,
    /// Keeps the magnitude's number of high bits (an integer in 1..=8).
    Posterize,
    /// ImageEnhance.Contrast with the magnitude as factor.
    Contrast,
    /// ImageEnhance.Brightness with the magnitude as factor.
    Brightness,
    /// ImageEnhance.Sharpness with the magnitude as factor.
    Sharpness,
    /// Affine (1, v, 0, 0, 1, 0): input x = x + v y.
    ShearX,
    /// Affine (1, 0, 0, v, 1, 0): input y = v x + y.
    ShearY,
    /// Affine (1, 0, v W, 0, 1, 0): the magnitude v is a fraction of the width.
    TranslateX,
    /// Affine (1, 0, 0, 0, 1, v H): the magnitude v is a fraction of the height.
    TranslateY,
}

impl Op {
    /// All operations, in the order a draw indexes them.
    pub const ALL: [Op; 14] = [
        Op::Identity,
        Op::AutoContrast,
        Op::Equalize,
        Op::Rotate,
        Op::Solarize,
        Op::Color,
        Op::Posterize,
        Op::Contrast,
        Op::Brightness,
        Op::Sharpness,
        Op::ShearX,
        Op::ShearY,
        Op::TranslateX,
        Op::TranslateY,
    ];

    /// The name (as in the FixMatch code and the fixtures' index).
    pub fn name(self) -> &'static str {
        match self {
            Op::Identity => "Identity",
            Op::AutoContrast => "AutoContrast",
            Op::Equalize => "Equalize",
            Op::Rotate => "Rotate",
            Op::Solarize => "Solarize",
            Op::Color => "Color",
            Op::Posterize => "Posterize",
            Op::Contrast => "Contrast",
            Op::Brightness => "Brightness",
            Op::Sharpness => "Sharpness",
            Op::ShearX => "ShearX",
            Op::ShearY => "ShearY",
            Op::TranslateX => "TranslateX",
            Op::TranslateY => "TranslateY",
        }
    }

    /// The range a RandAugment draw takes the magnitude from (the FixMatch paper's table):
    /// factors [0.05, 0.95], rotate [-30, 30] degrees, shear and translate [-0.3, 0.3],
    /// posterize bits [4, 8], solarize [0, 1]; (0, 0) for ops without a magnitude.
    pub fn range(self) -> (f32, f32) {
        match self {
            Op::Identity | Op::AutoContrast | Op::Equalize => (0.0, 0.0),
            Op::Rotate => (-30.0, 30.0),
            Op::Solarize => (0.0, 1.0),
            Op::Color | Op::Contrast | Op::Brightness | Op::Sharpness => (0.05, 0.95),
            Op::Posterize => (4.0, 8.0),
            Op::ShearX | Op::ShearY | Op::TranslateX | Op::TranslateY => (-0.3, 0.3),
        }
    }

    /// A magnitude uniform in `range` (posterize: an integer, each of 4..=8 equally likely);
    /// one draw from `rng` for every op, so the stream's use does not depend on the op.
    pub fn draw_magnitude(self, rng: &mut Rng) -> f32 {
        let (lo, hi) = self.range();
        let u = rng.uniform();
        match self {
            Op::Posterize => (lo + (u * (hi - lo + 1.0)).floor()).min(hi),
            _ => lo + (hi - lo) * u,
        }
    }
}

impl std::str::FromStr for Op {
    type Err = Error;

    fn from_str(s: &str) -> Result<Op> {
        Op::ALL.into_iter().find(|op| op.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Op::ALL.iter().map(|o| o.name()).collect();
            Error::usage(format!("unknown RandAugment op '{s}' (one of {})", names.join(", ")))
        })
    }
}

/// Checks that `img` holds one C x H x W image with C = 1 or 3.
fn check(img: &[u8], c: usize, h: usize, w: usize) -> Result<()> {
    if c != 1 && c != 3 {
        return Err(Error::shape(format!("RandAugment: a {c}x{h}x{w} image: only 1 or 3 channels are supported")));
    }
    let n = h.checked_mul(w).and_then(|hw| hw.checked_mul(c));
    if n != Some(img.len()) || h == 0 || w == 0 {
        return Err(Error::shape(format!("RandAugment: {} bytes for a {c}x{h}x{w} image", img.len())));
    }
    Ok(())
}

/// Applies `op` with `magnitude` (in the op's own units, see [`Op`]) to `img` in place.
/// Errors: a shape that is not C x H x W with C = 1 or 3, a non-finite magnitude, a solarize
/// threshold outside [0, 1], posterize bits that are not an integer in 1..=8.
pub fn apply(op: Op, magnitude: f32, img: &mut [u8], c: usize, h: usize, w: usize) -> Result<()> {
    check(img, c, h, w)?;
    if !magnitude.is_finite() {
        return Err(Error::usage(format!("RandAugment {}: magnitude {magnitude} is not finite", op.name())));
    }
    let m = magnitude as f64;
    match op {
        Op::Identity => {}
        Op::AutoContrast => per_channel_lut(img, h * w, autocontrast_lut),
        Op::Equalize => per_channel_lut(img, h * w, equalize_lut),
        Op::Solarize => {
            if !(0.0..=1.0).contains(&m) {
                return Err(Error::usage(format!("RandAugment Solarize: threshold {m} outside [0, 1]")));
            }
            let t = (256.0 * m).floor() as usize;
            let lut: [u8; 256] = std::array::from_fn(|i| if i < t { i as u8 } else { 255 - i as u8 });
            img.iter_mut().for_each(|v| *v = lut[*v as usize]);
        }
        Op::Posterize => {
            if magnitude.fract() != 0.0 || !(1.0..=8.0).contains(&magnitude) {
                return Err(Error::usage(format!("RandAugment Posterize: {magnitude} bits (an integer in 1..=8)")));
            }
            let mask = !((1u16 << (8 - magnitude as u32)) - 1) as u8;
            img.iter_mut().for_each(|v| *v &= mask);
        }
        Op::Color if c == 1 => {}
        Op::Color => {
            let hw = h * w;
            let grey: Vec<u8> = (0..hw).map(|k| luma(img[k], img[hw + k], img[2 * hw + k])).collect();
            for plane in img.chunks_exact_mut(hw) {
                plane.iter_mut().zip(&grey).for_each(|(v, &d)| *v = blend(d, *v, magnitude));
            }
        }
        Op::Contrast => {
            let mean = grey_mean(img, h * w);
            img.iter_mut().for_each(|v| *v = blend(mean, *v, magnitude));
        }
        Op::Brightness => img.iter_mut().for_each(|v| *v = blend(0, *v, magnitude)),
        Op::Sharpness => {
            let smooth = smooth(img, h, w);
            img.iter_mut().zip(&smooth).for_each(|(v, &d)| *v = blend(d, *v, magnitude));
        }
        Op::Rotate => affine(img, c, h, w, rotation(m, h, w)),
        Op::ShearX => affine(img, c, h, w, [1.0, m, 0.0, 0.0, 1.0, 0.0]),
        Op::ShearY => affine(img, c, h, w, [1.0, 0.0, 0.0, m, 1.0, 0.0]),
        Op::TranslateX => affine(img, c, h, w, [1.0, 0.0, m * w as f64, 0.0, 1.0, 0.0]),
        Op::TranslateY => affine(img, c, h, w, [1.0, 0.0, 0.0, 0.0, 1.0, m * h as f64]),
    }
    Ok(())
}

/// Fills with [`GREY`] the `side` x `side` square whose top-left corner is (cy - side / 2,
/// cx - side / 2), clipped to the image; (cy, cx) must lie in the image.
pub fn cutout(img: &mut [u8], c: usize, h: usize, w: usize, cy: usize, cx: usize, side: usize) -> Result<()> {
    check(img, c, h, w)?;
    if cy >= h || cx >= w {
        return Err(Error::usage(format!("Cutout: centre ({cy}, {cx}) outside the {c}x{h}x{w} image")));
    }
    // Any side beyond the image covers all of it: cap it so that the corners stay in isize.
    let side = side.min(h.saturating_add(w).saturating_mul(2)) as isize;
    let span = |centre: usize, n: usize| {
        let lo = centre as isize - side / 2;
        (lo.clamp(0, n as isize) as usize, (lo + side).clamp(0, n as isize) as usize)
    };
    let ((y0, y1), (x0, x1)) = (span(cy, h), span(cx, w));
    for plane in img.chunks_exact_mut(h * w) {
        for row in plane.chunks_exact_mut(w).take(y1).skip(y0) {
            row[x0..x1].fill(GREY);
        }
    }
    Ok(())
}

/// A strong view in place: [`OPS_PER_VIEW`] ops drawn uniformly with replacement, each with a
/// magnitude uniform in its range, then Cutout with side round(u min(H, W) / 2), u uniform in
/// [0, 1), at a uniform centre. Every draw comes from `rng`, in that order.
pub fn strong(img: &mut [u8], c: usize, h: usize, w: usize, rng: &mut Rng) -> Result<()> {
    check(img, c, h, w)?;
    for _ in 0..OPS_PER_VIEW {
        let op = Op::ALL[rng.below(Op::ALL.len() as u32) as usize];
        let m = op.draw_magnitude(rng);
        apply(op, m, img, c, h, w)?;
    }
    let side = (rng.uniform() * CUTOUT_MAX * h.min(w) as f32).round() as usize;
    let (cy, cx) = (uniform_below(rng, h), uniform_below(rng, w));
    cutout(img, c, h, w, cy, cx, side)
}

/// Uniform in 0..n (n > 0), for sides of any size.
fn uniform_below(rng: &mut Rng, n: usize) -> usize {
    match u32::try_from(n) {
        Ok(n) => rng.below(n) as usize,
        Err(_) => ((rng.uniform_f64() * n as f64) as usize).min(n - 1),
    }
}

/// Applies a per-plane LUT built from each plane's histogram.
fn per_channel_lut(img: &mut [u8], hw: usize, make: fn(&[u64; 256]) -> [u8; 256]) {
    for plane in img.chunks_exact_mut(hw) {
        let mut hist = [0u64; 256];
        plane.iter().for_each(|&v| hist[v as usize] += 1);
        let lut = make(&hist);
        plane.iter_mut().for_each(|v| *v = lut[*v as usize]);
    }
}

fn identity_lut() -> [u8; 256] {
    std::array::from_fn(|i| i as u8)
}

/// ImageOps.autocontrast with cutoff 0: [lo, hi] stretched to [0, 255] in f64, truncated.
fn autocontrast_lut(hist: &[u64; 256]) -> [u8; 256] {
    let lo = hist.iter().position(|&n| n > 0);
    let hi = hist.iter().rposition(|&n| n > 0);
    match (lo, hi) {
        (Some(lo), Some(hi)) if hi > lo => {
            let scale = 255.0 / (hi - lo) as f64;
            let offset = -(lo as f64) * scale;
            std::array::from_fn(|i| ((i as f64 * scale + offset) as i64).clamp(0, 255) as u8)
        }
        _ => identity_lut(),
    }
}

/// ImageOps.equalize: step = (pixels - count of the highest value) / 255; value i maps to
/// (step / 2 + pixels below i) / step, clipped to 255 as Image.point does.
fn equalize_lut(hist: &[u64; 256]) -> [u8; 256] {
    let last = hist.iter().rposition(|&n| n > 0);
    let distinct = hist.iter().filter(|&&n| n > 0).count();
    let total: u64 = hist.iter().sum();
    let step = last.map_or(0, |l| (total - hist[l]) / 255);
    if distinct <= 1 || step == 0 {
        return identity_lut();
    }
    let mut n = step / 2;
    std::array::from_fn(|i| {
        let v = (n / step).min(255) as u8;
        n += hist[i];
        v
    })
}

/// Pillow's RGB to L: (19595 R + 38470 G + 7471 B + 2^15) >> 16.
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// The rounded mean of the image's L conversion (ImageEnhance.Contrast's degenerate grey).
fn grey_mean(img: &[u8], hw: usize) -> u8 {
    let sum: u64 = if img.len() == hw {
        img.iter().map(|&v| v as u64).sum()
    } else {
        (0..hw).map(|k| luma(img[k], img[hw + k], img[2 * hw + k]) as u64).sum()
    };
    (sum as f64 / hw as f64 + 0.5) as u8
}

/// Image.blend(degenerate, image, f) for one value: float32 d + f (v - d), truncated, clipped.
fn blend(d: u8, v: u8, f: f32) -> u8 {
    let t = d as f32 + f * (v as i32 - d as i32) as f32;
    if t <= 0.0 {
        0
    } else if t >= 255.0 {
        255
    } else {
        t as u8
    }
}

/// ImageFilter.SMOOTH (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, divided by 13) per plane, in Pillow's
/// float32 summation order (bottom row first) with +0.5 rounding; the 1-pixel border is copied.
fn smooth(img: &[u8], h: usize, w: usize) -> Vec<u8> {
    let mut out = img.to_vec();
    if h < 3 || w < 3 {
        return out;
    }
    let (k1, k5) = (1.0f32 / 13.0, 5.0f32 / 13.0);
    let f = |v: u8| v as f32;
    for (src, dst) in img.chunks_exact(h * w).zip(out.chunks_exact_mut(h * w)) {
        for y in 1..h - 1 {
            let (up, mid, down) = (&src[(y - 1) * w..y * w], &src[y * w..(y + 1) * w], &src[(y + 1) * w..(y + 2) * w]);
            for x in 1..w - 1 {
                let mut s = 0.5f32;
                s += f(down[x - 1]) * k1 + f(down[x]) * k1 + f(down[x + 1]) * k1;
                s += f(mid[x - 1]) * k1 + f(mid[x]) * k5 + f(mid[x + 1]) * k1;
                s += f(up[x - 1]) * k1 + f(up[x]) * k1 + f(up[x + 1]) * k1;
                dst[y * w + x] = if s <= 0.0 {
                    0
                } else if s >= 255.0 {
                    255
                } else {
                    s as u8
                };
            }
        }
    }
    out
}

/// Python's round(x, 15): the double nearest the decimal rounded to 15 places.
fn round15(x: f64) -> f64 {
    format!("{x:.15}").parse().unwrap_or(x)
}

/// Image.rotate's inverse affine matrix for `degrees` about the centre (w / 2, h / 2), computed
/// in Pillow's order (the angle reduced mod 360, entries rounded to 15 decimals).
fn rotation(degrees: f64, h: usize, w: usize) -> [f64; 6] {
    let mut angle = degrees % 360.0;
    if angle < 0.0 {
        angle += 360.0;
    }
    let a = -(angle * (std::f64::consts::PI / 180.0));
    let (cos, sin) = (round15(a.cos()), round15(a.sin()));
    let nsin = round15(-a.sin());
    let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
    let c = cos * -cx + sin * -cy + 0.0 + cx;
    let f = nsin * -cx + cos * -cy + 0.0 + cy;
    [cos, sin, c, nsin, cos, f]
}

/// Image.transform(AFFINE, a, NEAREST, fillcolor grey): output pixel (x, y) reads the input at
/// (a0 (x + 0.5) + a1 (y + 0.5) + a2, a3 (x + 0.5) + a4 (y + 0.5) + a5), floored, along the
/// same three paths as Pillow's Geometry.c (so that even half-pixel ties round alike): a
/// pretabulated scale path when a1 = a3 = 0, 16.16 fixed point when the corners map within
/// +-32768, else incremental doubles.
fn affine(img: &mut [u8], c: usize, h: usize, w: usize, a: [f64; 6]) {
    let hw = h * w;
    let mut out = vec![GREY; img.len()];
    // Pillow's COORD: negatives become -1 (outside), others truncate.
    let coord = |v: f64| if v < 0.0 { -1 } else { v as i64 };
    let inside = |v: i64, n: usize| v >= 0 && (v as u64) < n as u64;
    let mut put = |y: usize, x: usize, yin: i64, xin: i64| {
        for ch in 0..c {
            out[ch * hw + y * w + x] = img[ch * hw + yin as usize * w + xin as usize];
        }
    };
    if a[1] == 0.0 && a[3] == 0.0 {
        let mut xo = a[2] + a[0] * 0.5;
        let mut yo = a[5] + a[4] * 0.5;
        let mut xin = vec![0i64; w];
        let (mut xmin, mut xmax) = (w, 0);
        for (x, t) in xin.iter_mut().enumerate() {
            let v = coord(xo);
            if inside(v, w) {
                xmax = x + 1;
                xmin = xmin.min(x);
                *t = v;
            }
            xo += a[0];
        }
        for y in 0..h {
            let yi = coord(yo);
            if inside(yi, h) {
                for (x, &xi) in xin.iter().enumerate().take(xmax).skip(xmin) {
                    put(y, x, yi, xi);
                }
            }
            yo += a[4];
        }
    } else if [(0, 0), (w, h), (0, h), (w, 0)].iter().all(|&(x, y)| {
        let (x, y) = (x as f64, y as f64);
        (x * a[0] + y * a[1] + a[2]).abs() < 32768.0 && (x * a[3] + y * a[4] + a[5]).abs() < 32768.0
    }) {
        let fix = |v: f64| {
            let v = v * 65536.0 + 0.5;
            if v < 0.0 {
                v.floor() as i64
            } else {
                v as i64
            }
        };
        let (a0, a1, a3, a4) = (fix(a[0]), fix(a[1]), fix(a[3]), fix(a[4]));
        let mut a2 = fix(a[2] + a[0] * 0.5 + a[1] * 0.5);
        let mut a5 = fix(a[5] + a[3] * 0.5 + a[4] * 0.5);
        for y in 0..h {
            let (mut xx, mut yy) = (a2, a5);
            for x in 0..w {
                let (xin, yin) = (xx >> 16, yy >> 16);
                if inside(xin, w) && inside(yin, h) {
                    put(y, x, yin, xin);
                }
                xx += a0;
                yy += a3;
            }
            a2 += a1;
            a5 += a4;
        }
    } else {
        let mut xo = a[2] + a[1] * 0.5 + a[0] * 0.5;
        let mut yo = a[5] + a[4] * 0.5 + a[3] * 0.5;
        for y in 0..h {
            let (mut xx, mut yy) = (xo, yo);
            for x in 0..w {
                let (xin, yin) = (coord(xx), coord(yy));
                if inside(xin, w) && inside(yin, h) {
                    put(y, x, yin, xin);
                }
                xx += a[0];
                yy += a[3];
            }
            xo += a[1];
            yo += a[4];
        }
    }
    img.copy_from_slice(&out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3x5x7 image with distinct-ish values.
    fn img() -> Vec<u8> {
        (0..3 * 5 * 7).map(|k| (k * 37 % 251) as u8).collect()
    }

    #[test]
    fn bad_shapes_and_magnitudes_are_errors() {
        let mut a = img();
        assert!(apply(Op::Rotate, 3.0, &mut a, 2, 5, 7).is_err());
        assert!(apply(Op::Rotate, 3.0, &mut a, 3, 5, 6).is_err());
        assert!(apply(Op::Rotate, 3.0, &mut a, 3, usize::MAX, 7).is_err());
        assert!(apply(Op::Rotate, f32::NAN, &mut a, 3, 5, 7).is_err());
        assert!(apply(Op::Posterize, 4.5, &mut a, 3, 5, 7).is_err());
        assert!(apply(Op::Posterize, 0.0, &mut a, 3, 5, 7).is_err());
        assert!(apply(Op::Solarize, 1.5, &mut a, 3, 5, 7).is_err());
        assert!(cutout(&mut a, 3, 5, 7, 5, 0, 2).is_err());
        assert!(strong(&mut a[..10], 3, 5, 7, &mut Rng::new(0, 0)).is_err());
        assert_eq!(a, img(), "a failed call leaves the image alone");
        assert!("Nope".parse::<Op>().is_err());
        assert!(Op::ALL.iter().all(|op| op.name().parse::<Op>().ok() == Some(*op)));
    }

    #[test]
    fn cutout_is_clipped_and_grey() {
        let mut a = vec![0u8; 5 * 7];
        cutout(&mut a, 1, 5, 7, 0, 6, 4).unwrap();
        let grey: Vec<(usize, usize)> = (0..35).filter(|&k| a[k] == GREY).map(|k| (k / 7, k % 7)).collect();
        assert_eq!(grey, [(0, 4), (0, 5), (0, 6), (1, 4), (1, 5), (1, 6)]);
        let mut b = vec![0u8; 35];
        cutout(&mut b, 1, 5, 7, 2, 2, 0).unwrap();
        assert!(b.iter().all(|&v| v == 0));
        cutout(&mut b, 1, 5, 7, 2, 2, 100).unwrap();
        assert!(b.iter().all(|&v| v == GREY));
    }

    #[test]
    fn draws_cover_every_op_and_range() {
        let mut rng = Rng::new(5, 5);
        for op in Op::ALL {
            let (lo, hi) = op.range();
            let ms: Vec<f32> = (0..2000).map(|_| op.draw_magnitude(&mut rng)).collect();
            assert!(ms.iter().all(|m| (lo..=hi).contains(m)), "{op:?}");
            if op == Op::Posterize {
                assert!((4..=8).all(|b| ms.contains(&(b as f32))));
            } else if hi > lo {
                let mean = ms.iter().sum::<f32>() / ms.len() as f32;
                assert!((mean - (lo + hi) / 2.0).abs() < 0.05 * (hi - lo), "{op:?} mean {mean}");
            }
        }
        // Strong views: deterministic in the stream, and different across streams.
        let run = |s| {
            let mut a = img();
            strong(&mut a, 3, 5, 7, &mut Rng::new(1, s)).unwrap();
            a
        };
        assert_eq!(run(3), run(3));
        assert!((0..8).any(|s| run(s) != run(s + 8)));
    }

    #[test]
    fn rotation_matrix_is_pillows() {
        // Image.rotate(30) on a 32x32 image: the matrix Pillow 13's Python code computes.
        let want = [0.866025403784439, -0.5, 10.143593539448975, 0.5, 0.866025403784439, -5.856406460551025];
        assert_eq!(rotation(30.0, 32, 32), want);
        // A whole turn is the identity.
        let mut a = img();
        apply(Op::Rotate, 360.0, &mut a, 3, 5, 7).unwrap();
        assert_eq!(a, img());
    }
}
