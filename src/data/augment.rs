//! Augmentation and normalisation of one image: pad (zeros or reflection), random crop back to
//! the original size, random horizontal flip, then (x / 255 - mean_c) / std_c per channel.

use super::{Dataset, DatasetKind};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// How images are augmented and normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct Augment {
    /// Pixels of padding on each side before the random crop (0: no crop).
    pub pad: usize,
    /// Whether to flip horizontally with probability 1/2.
    pub flip: bool,
    /// Pad by reflection (without repeating the edge, as numpy's and torchvision's "reflect")
    /// instead of with zeros.
    pub reflect: bool,
    /// Per-channel mean of the [0, 1]-scaled pixels.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of the [0, 1]-scaled pixels.
    pub std: Vec<f32>,
}

impl Augment {
    /// The recipe of METHOD.md for `kind`, for images shaped like `train`:
    /// Fashion-MNIST pad 2 with zeros + crop + flip, mean 0.2860 std 0.3530; MNIST the same without
    /// flip, 0.1307 / 0.3081; CIFAR-10/100 pad 4 reflect + crop + flip with their channel
    /// statistics; an image folder pad H/8 reflect + crop + flip with per-channel statistics
    /// computed from `train`. A fixed-format kind whose channel count does not match `train`
    /// (a hand-built set) falls back to the computed statistics.
    pub fn for_dataset(kind: DatasetKind, train: &Dataset) -> Augment {
        let fixed = |pad, flip, reflect, mean: &[f32], std: &[f32]| Augment {
            pad,
            flip,
            reflect,
            mean: mean.to_vec(),
            std: std.to_vec(),
        };
        match (kind, train.channels) {
            (DatasetKind::FashionMnist, 1) => fixed(2, true, false, &[0.2860], &[0.3530]),
            (DatasetKind::Mnist, 1) => fixed(2, false, false, &[0.1307], &[0.3081]),
            (DatasetKind::Cifar10, 3) => fixed(4, true, true, &[0.4914, 0.4822, 0.4465], &[0.2470, 0.2435, 0.2616]),
            (DatasetKind::Cifar100, 3) => fixed(4, true, true, &[0.5071, 0.4865, 0.4409], &[0.2673, 0.2564, 0.2762]),
            _ => {
                let (mean, std) = channel_stats(train);
                Augment { pad: train.height.min(train.width) / 8, flip: true, reflect: true, mean, std }
            }
        }
    }

    /// No augmentation, only normalisation with `mean` and `std`.
    pub fn normalize_only(mean: Vec<f32>, std: Vec<f32>) -> Augment {
        Augment { pad: 0, flip: false, reflect: false, mean, std }
    }

    /// Checks that the statistics fit `ds` and are usable.
    pub fn check(&self, ds: &Dataset) -> Result<()> {
        if self.mean.len() != ds.channels || self.std.len() != ds.channels {
            return Err(Error::shape(format!(
                "normalisation has {} means and {} stds for the {} channel(s) of {}",
                self.mean.len(),
                self.std.len(),
                ds.channels,
                ds.name
            )));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || self.mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::usage(format!(
                "normalisation mean {:?} / std {:?}: stds must be positive and all values finite",
                self.mean, self.std
            )));
        }
        Ok(())
    }

    /// Per channel, the normalised value of each of the 256 raw pixel values.
    pub(crate) fn lut(&self) -> Vec<[f32; 256]> {
        self.mean.iter().zip(&self.std).map(|(&m, &s)| std::array::from_fn(|v| (v as f32 / 255.0 - m) / s)).collect()
    }
}

/// Per-channel mean and standard deviation of the [0, 1]-scaled pixels of `ds` (exact integer
/// sums; a constant channel gets std 1 so that normalising stays finite).
pub(crate) fn channel_stats(ds: &Dataset) -> (Vec<f32>, Vec<f32>) {
    let hw = ds.height * ds.width;
    let (mut s, mut s2) = (vec![0u64; ds.channels], vec![0u64; ds.channels]);
    if hw > 0 {
        for (k, plane) in ds.images.chunks_exact(hw).enumerate() {
            let c = k % ds.channels;
            for &v in plane {
                s[c] += v as u64;
                s2[c] += (v as u64) * (v as u64);
            }
        }
    }
    let n = (ds.len() * hw).max(1) as f64;
    let mut mean = Vec::with_capacity(ds.channels);
    let mut std = Vec::with_capacity(ds.channels);
    for (&sum, &sum2) in s.iter().zip(&s2) {
        let m = sum as f64 / n / 255.0;
        let var = (sum2 as f64 / n / (255.0 * 255.0) - m * m).max(0.0);
        mean.push(m as f32);
        std.push(if var > 1e-12 { var.sqrt() as f32 } else { 1.0 });
    }
    (mean, std)
}

/// The random choices of one augmentation: crop offsets into the padded image and the flip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Draw {
    pub dy: usize,
    pub dx: usize,
    pub flip: bool,
}

impl Draw {
    /// The draw that leaves the image as it is (centre crop, no flip).
    pub(crate) fn identity(aug: &Augment) -> Draw {
        Draw { dy: aug.pad, dx: aug.pad, flip: false }
    }

    /// Draws the crop offsets (each uniform in 0..=2 pad) and the flip, in that order.
    pub(crate) fn sample(aug: &Augment, rng: &mut Rng) -> Draw {
        let span = aug.pad.saturating_mul(2).saturating_add(1).min(u32::MAX as usize) as u32;
        let dy = rng.below(span) as usize;
        let dx = rng.below(span) as usize;
        let flip = aug.flip && (rng.next_u32() & 1) == 1;
        Draw { dy, dx, flip }
    }
}

/// Source index for padded coordinate `p` (0-based in the padded image) of an axis of length
/// `n`, or None for a zero pixel.
fn source(p: usize, pad: usize, n: usize, reflect: bool) -> Option<usize> {
    let i = p as isize - pad as isize;
    if (0..n as isize).contains(&i) {
        return Some(i as usize);
    }
    if !reflect {
        return None;
    }
    if n == 1 {
        return Some(0);
    }
    // Reflection without edge repeat, folded periodically so that any pad stays in range.
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    Some(if m < n as isize { m } else { period - m } as usize)
}

/// Per output row or column, the source index (None: a zero pixel).
type Sources = Vec<Option<usize>>;

/// Checks the crop `d` and returns, for each output row and column, its source index in image
/// `ds` (None for a zero pixel): the crop of the padded image at `d`, then the flip.
fn crop_indices(ds: &Dataset, aug: &Augment, d: Draw) -> Result<(Sources, Sources)> {
    let (h, w) = (ds.height, ds.width);
    if d.dy > aug.pad.saturating_mul(2) || d.dx > aug.pad.saturating_mul(2) {
        return Err(Error::usage(format!("crop offset ({}, {}) outside 0..={}", d.dy, d.dx, 2 * aug.pad)));
    }
    let rows = (0..h).map(|y| source(y + d.dy, aug.pad, h, aug.reflect)).collect();
    // Flip after the crop, as RandomCrop followed by RandomHorizontalFlip does.
    let cols = (0..w).map(|x| source(if d.flip { w - 1 - x } else { x } + d.dx, aug.pad, w, aug.reflect)).collect();
    Ok((rows, cols))
}

/// Writes image `i` of `ds`, cropped at `d` from the padded image and optionally flipped, then
/// normalised through `lut` (from `aug.lut()`, after `aug.check(ds)`), into `out` (C x H x W).
pub(crate) fn render(
    ds: &Dataset,
    i: usize,
    aug: &Augment,
    lut: &[[f32; 256]],
    d: Draw,
    out: &mut [f32],
) -> Result<()> {
    let (h, w) = (ds.height, ds.width);
    if lut.len() != ds.channels {
        return Err(Error::shape(format!("{} normalisation tables for {} channel(s)", lut.len(), ds.channels)));
    }
    let img = ds.try_image(i)?;
    if out.len() != img.len() {
        return Err(Error::shape(format!("output buffer of {} floats for a {}x{h}x{w} image", out.len(), ds.channels)));
    }
    let (rows, cols) = crop_indices(ds, aug, d)?;
    for ((plane, dst), table) in img.chunks_exact(h * w).zip(out.chunks_exact_mut(h * w)).zip(lut) {
        let zero = table[0];
        for (row, sy) in dst.chunks_exact_mut(w).zip(&rows) {
            match sy {
                None => row.fill(zero),
                Some(sy) => {
                    let src = &plane[sy * w..(sy + 1) * w];
                    for (o, sx) in row.iter_mut().zip(&cols) {
                        *o = sx.map_or(zero, |sx| table[src[sx] as usize]);
                    }
                }
            }
        }
    }
    Ok(())
}

/// As `render`, but the raw pixels (zero padding stays 0), for RandAugment to work on.
fn render_raw(ds: &Dataset, i: usize, aug: &Augment, d: Draw, out: &mut [u8]) -> Result<()> {
    let (h, w) = (ds.height, ds.width);
    let img = ds.try_image(i)?;
    if out.len() != img.len() {
        return Err(Error::shape(format!("output buffer of {} bytes for a {}x{h}x{w} image", out.len(), ds.channels)));
    }
    let (rows, cols) = crop_indices(ds, aug, d)?;
    for (plane, dst) in img.chunks_exact(h * w).zip(out.chunks_exact_mut(h * w)) {
        for (row, sy) in dst.chunks_exact_mut(w).zip(&rows) {
            match sy {
                None => row.fill(0),
                Some(sy) => {
                    let src = &plane[sy * w..(sy + 1) * w];
                    for (o, sx) in row.iter_mut().zip(&cols) {
                        *o = sx.map_or(0, |sx| src[sx]);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Normalises raw C x H x W pixels through `lut` (one table per channel) into `out`.
pub(crate) fn normalize_raw(raw: &[u8], lut: &[[f32; 256]], out: &mut [f32]) -> Result<()> {
    if out.len() != raw.len() || lut.is_empty() || !raw.len().is_multiple_of(lut.len()) {
        return Err(Error::shape(format!(
            "{} raw values, {} outputs and {} normalisation tables do not fit",
            raw.len(),
            out.len(),
            lut.len()
        )));
    }
    let plane = raw.len() / lut.len();
    if plane == 0 {
        return Ok(());
    }
    for ((src, dst), table) in raw.chunks_exact(plane).zip(out.chunks_exact_mut(plane)).zip(lut) {
        dst.iter_mut().zip(src).for_each(|(o, &v)| *o = table[v as usize]);
    }
    Ok(())
}

/// Writes an augmentation of image `i` as raw pixels into `out` (C x H x W): the weak crop and
/// flip drawn from `rng`, then, with `strong: Some(rng2)`, RandAugment and Cutout drawn from
/// `rng2` (a strong view, as FixMatch's).
pub fn augment_raw(
    ds: &Dataset,
    i: usize,
    aug: &Augment,
    rng: &mut Rng,
    strong: Option<&mut Rng>,
    out: &mut [u8],
) -> Result<()> {
    render_raw(ds, i, aug, Draw::sample(aug, rng), out)?;
    match strong {
        Some(r) => super::randaugment::strong(out, ds.channels, ds.height, ds.width, r),
        None => Ok(()),
    }
}

/// Writes a random augmentation of image `i` (draws from `rng`), normalised, into `out` (C x H x W).
pub fn augment_into(ds: &Dataset, i: usize, aug: &Augment, rng: &mut Rng, out: &mut [f32]) -> Result<()> {
    aug.check(ds)?;
    render(ds, i, aug, &aug.lut(), Draw::sample(aug, rng), out)
}

/// Writes image `i` normalised but not augmented into `out` (C x H x W), for evaluation.
pub fn normalize_into(ds: &Dataset, i: usize, aug: &Augment, out: &mut [f32]) -> Result<()> {
    aug.check(ds)?;
    render(ds, i, aug, &aug.lut(), Draw::identity(aug), out)
}

#[cfg(test)]
mod tests {
    use super::super::tests::emb;
    use super::*;

    /// A 2-channel 5x4 image whose pixel values encode (channel, y, x).
    fn coded() -> Dataset {
        let images = (0..2 * 5 * 4).map(|k| k as u8 * 3).collect();
        Dataset {
            name: "coded".into(),
            images,
            labels: vec![0],
            channels: 2,
            height: 5,
            width: 4,
            classes: 1,
            class_names: vec!["x".into()],
        }
    }

    /// A normalisation that `raw` undoes.
    fn unit(pad: usize, flip: bool, reflect: bool) -> Augment {
        Augment { pad, flip, reflect, mean: vec![0.1, 0.2], std: vec![0.5, 0.25] }
    }

    /// The raw pixel value of normalised value `v` in channel `c` of `unit`'s normalisation.
    fn raw(v: f32, c: usize) -> f32 {
        let (m, s) = ([0.1, 0.2][c], [0.5, 0.25][c]);
        (v * s + m) * 255.0
    }

    /// Raw pixel at padded coordinate (y, x), computed directly from the definitions.
    fn expected(ds: &Dataset, c: usize, y: isize, x: isize, reflect: bool) -> f32 {
        let (h, w) = (ds.height as isize, ds.width as isize);
        let fold = |i: isize, n: isize| {
            if i < 0 {
                -i
            } else if i >= n {
                2 * (n - 1) - i
            } else {
                i
            }
        };
        let (yy, xx) = if reflect { (fold(y, h), fold(x, w)) } else { (y, x) };
        if yy < 0 || yy >= h || xx < 0 || xx >= w {
            return 0.0;
        }
        ds.images[(c as isize * h * w + yy * w + xx) as usize] as f32
    }

    #[test]
    fn crop_offsets_stay_in_range_and_cover_it() {
        for pad in [0usize, 2, 4] {
            let aug = unit(pad, true, false);
            let mut rng = Rng::new(11, pad as u64);
            let (mut seen, mut flips) = (vec![[false; 2]; 2 * pad + 1], 0);
            for _ in 0..5000 {
                let d = Draw::sample(&aug, &mut rng);
                assert!(d.dy <= 2 * pad && d.dx <= 2 * pad, "{d:?} for pad {pad}");
                seen[d.dy][0] = true;
                seen[d.dx][1] = true;
                flips += d.flip as usize;
            }
            assert!(seen.iter().all(|s| s[0] && s[1]), "pad {pad}: some offsets never drawn");
            assert!((2200..2800).contains(&flips), "flip rate {flips}/5000");
        }
        let mut rng = Rng::new(1, 1);
        assert!((0..100).all(|_| !Draw::sample(&unit(2, false, false), &mut rng).flip));
    }

    #[test]
    fn rendered_pixels_are_the_shifted_window() {
        let ds = coded();
        // A pad beyond one reflection (7 > width 4 - 1) still renders, by periodic folding.
        let mut out = vec![0.0; 40];
        let far = unit(7, true, true);
        assert!(render(&ds, 0, &far, &far.lut(), Draw { dy: 0, dx: 14, flip: true }, &mut out).is_ok());
        assert!(out.chunks(20).enumerate().all(|(c, p)| p.iter().all(|&v| (-0.01..=117.01).contains(&raw(v, c)))));
        for (pad, reflect) in [(2, false), (2, true), (3, true), (4, false)] {
            let aug = unit(pad, true, reflect);
            let mut rng = Rng::new(3, 9);
            for _ in 0..40 {
                let d = Draw::sample(&aug, &mut rng);
                let mut out = vec![f32::NAN; 40];
                render(&ds, 0, &aug, &aug.lut(), d, &mut out).unwrap();
                for c in 0..2 {
                    for y in 0..5 {
                        for x in 0..4 {
                            let xs = if d.flip { 3 - x } else { x };
                            let want = expected(
                                &ds,
                                c,
                                (y + d.dy) as isize - pad as isize,
                                (xs + d.dx) as isize - pad as isize,
                                reflect,
                            );
                            let got = raw(out[c * 20 + y * 4 + x], c);
                            assert!((got - want).abs() < 1e-3, "{d:?} pad {pad} reflect {reflect} c{c} y{y} x{x}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn pad_zero_without_flip_is_normalize() {
        let tr = &emb().train;
        let fm = Augment::for_dataset(DatasetKind::FashionMnist, tr);
        assert_eq!((fm.pad, fm.flip, fm.reflect, fm.mean[0], fm.std[0]), (2, true, false, 0.2860, 0.3530));
        let plain = Augment { pad: 0, flip: false, ..fm.clone() };
        let mut rng = Rng::new(0, 0);
        let (mut a, mut b) = (vec![0.0; 784], vec![0.0; 784]);
        for i in [0, 17, 9999] {
            augment_into(tr, i, &plain, &mut rng, &mut a).unwrap();
            normalize_into(tr, i, &fm, &mut b).unwrap();
            assert_eq!(a, b);
            for (v, &p) in b.iter().zip(tr.image(i)) {
                assert!((v - (p as f32 / 255.0 - 0.2860) / 0.3530).abs() < 1e-6);
            }
        }
        // A padded augmentation moves pixels; zero padding shows the normalised zero.
        let mut rng = Rng::new(0, 1);
        let mut moved = false;
        for _ in 0..10 {
            augment_into(tr, 0, &fm, &mut rng, &mut a).unwrap();
            moved |= a != b;
        }
        assert!(moved);
    }

    #[test]
    fn recipes_and_folder_statistics() {
        let c = coded();
        let mnist = Augment::for_dataset(DatasetKind::Mnist, &emb().test);
        assert!(!mnist.flip && mnist.pad == 2 && mnist.mean == [0.1307]);
        let f = Augment::for_dataset(DatasetKind::Folder, &c);
        // Channel 0 holds 0, 3, .., 57; channel 1 holds 60, .., 117 (raw).
        let m0 = (0..20).map(|k| 3.0 * k as f64).sum::<f64>() / 20.0 / 255.0;
        let v0 = (0..20).map(|k| (3.0 * k as f64 / 255.0 - m0).powi(2)).sum::<f64>() / 20.0;
        assert!((f.mean[0] as f64 - m0).abs() < 1e-6);
        assert!((f.mean[1] as f64 - (m0 + 60.0 / 255.0)).abs() < 1e-6);
        assert!((f.std[0] as f64 - v0.sqrt()).abs() < 1e-6 && (f.std[1] - f.std[0]).abs() < 1e-6);
        assert!(f.reflect && f.flip && f.pad == 0);
        // Statistics of the wrong length or a zero std are errors, not NaNs or panics.
        let mut out = vec![0.0; 40];
        assert!(normalize_into(&c, 0, &Augment::normalize_only(vec![0.5], vec![0.5]), &mut out).is_err());
        assert!(normalize_into(&c, 0, &Augment::normalize_only(vec![0.5; 2], vec![0.0; 2]), &mut out).is_err());
        assert!(normalize_into(&c, 1, &unit(0, false, false), &mut out).is_err());
        assert!(normalize_into(&c, 0, &unit(0, false, false), &mut out[..39]).is_err());
    }
}
