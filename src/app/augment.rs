//! `muscle augment`: a PNG grid of what the network is fed. One row per training image: the
//! original, then `views` weak views (the data set's crop and flip), then `views` strong views
//! (crop and flip, RandAugment, Cutout, as FixMatch's), as raw pixels before normalisation,
//! upscaled by an integer factor (nearest) with white separators.

use crate::data::{augment_raw, Augment, Dataset, DatasetKind};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::train::{self, TrainConfig};
use std::path::PathBuf;

/// White pixels between cells and around the grid.
pub const SEPARATOR: usize = 2;
/// Cells are upscaled to about this many pixels on their longer side (at least 1x).
const CELL_TARGET: usize = 96;
/// RNG purposes of the grid's weak views, strong views' crops, and strong views' RandAugment.
const PURPOSE_WEAK: u64 = u64::from_be_bytes(*b"aug:weak");
const PURPOSE_STRONG_CROP: u64 = u64::from_be_bytes(*b"aug:scrp");
const PURPOSE_STRONG: u64 = u64::from_be_bytes(*b"aug:strg");

/// The options of `muscle augment`.
#[derive(Clone, Debug, clap::Args)]
pub struct AugmentArgs {
    /// Data set format (as for train): fashion-mnist, mnist, cifar10, cifar100, folder.
    #[arg(long, default_value = "fashion-mnist")]
    pub dataset: String,
    /// Folder with the data set; without it, the embedded Fashion-MNIST subset.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Image folders: resize every image to S x S (as for train).
    #[arg(long)]
    pub resize: Option<usize>,
    /// Image folders: convert to 1 (grey) or 3 (colour) channels (as for train).
    #[arg(long)]
    pub channels: Option<usize>,
    /// The PNG to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Rows: training images, evenly spaced through the set.
    #[arg(long, default_value_t = 8)]
    pub images: usize,
    /// Weak views and strong views per image.
    #[arg(long, default_value_t = 4)]
    pub views: usize,
    /// Seed of the augmentation draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `muscle augment`: loads the data as `train` would and writes the grid to `--out`.
pub fn command(a: &AugmentArgs) -> Result<()> {
    let kind: DatasetKind = a.dataset.parse()?;
    let cfg = TrainConfig {
        dataset: kind,
        data: a.data.clone(),
        resize: a.resize,
        channels: a.channels,
        ..TrainConfig::default()
    };
    let train = train::load_data(&cfg)?.train;
    let aug = Augment::for_dataset(kind, &train);
    if a.images == 0 || a.images > train.len().min(256) {
        return Err(Error::usage(format!("--images {}: must be in 1..={}", a.images, train.len().min(256))));
    }
    if a.views == 0 || a.views > 32 {
        return Err(Error::usage(format!("--views {}: must be in 1..=32", a.views)));
    }
    let idx: Vec<usize> = (0..a.images).map(|k| k * train.len() / a.images).collect();
    let (w, h, rgb) = grid(&train, &aug, &idx, a.views, a.seed)?;
    let img = image::RgbImage::from_raw(w, h, rgb)
        .ok_or_else(|| Error::shape(format!("{}: the grid's buffer does not hold {w}x{h} RGB", a.out.display())))?;
    super::plot::write_png(&img, &a.out)?;
    println!(
        "{}: {} images of {} (original, {} weak, {} strong views each), {w}x{h} px",
        a.out.display(),
        a.images,
        train.name,
        a.views,
        a.views
    );
    Ok(())
}

/// The grid for images `idx` of `ds`: (width, height, RGB bytes). Each cell is the image
/// upscaled by max(1, 96 / max(H, W)); the grid is (1 + 2 views) cells wide and `idx.len()`
/// high, with [`SEPARATOR`] white pixels between and around cells.
pub fn grid(ds: &Dataset, aug: &Augment, idx: &[usize], views: usize, seed: u64) -> Result<(u32, u32, Vec<u8>)> {
    aug.check(ds)?;
    let (c, h, w) = (ds.channels, ds.height, ds.width);
    let scale = (CELL_TARGET / h.max(w).max(1)).max(1);
    let (cw, ch) = (w * scale, h * scale);
    let cols = 1 + 2 * views;
    let too_big = || Error::usage(format!("a grid of {} x {cols} cells of {ch}x{cw} px is too large", idx.len()));
    let gw = cols.checked_mul(cw + SEPARATOR).and_then(|v| v.checked_add(SEPARATOR)).ok_or_else(too_big)?;
    let gh = idx.len().checked_mul(ch + SEPARATOR).and_then(|v| v.checked_add(SEPARATOR)).ok_or_else(too_big)?;
    let (gw32, gh32) = (u32::try_from(gw).map_err(|_| too_big())?, u32::try_from(gh).map_err(|_| too_big())?);
    let mut rgb = vec![255u8; gw.checked_mul(gh).and_then(|v| v.checked_mul(3)).ok_or_else(too_big)?];
    let mut cell = vec![0u8; c * h * w];
    for (row, &i) in idx.iter().enumerate() {
        for col in 0..cols {
            let k = [row as u64, col as u64];
            if col == 0 {
                cell.copy_from_slice(ds.try_image(i)?);
            } else if col <= views {
                augment_raw(ds, i, aug, &mut Rng::keyed(seed, &[PURPOSE_WEAK, k[0], k[1]]), None, &mut cell)?;
            } else {
                let mut strong = Rng::keyed(seed, &[PURPOSE_STRONG, k[0], k[1]]);
                let mut crop = Rng::keyed(seed, &[PURPOSE_STRONG_CROP, k[0], k[1]]);
                augment_raw(ds, i, aug, &mut crop, Some(&mut strong), &mut cell)?;
            }
            let (x0, y0) = (SEPARATOR + col * (cw + SEPARATOR), SEPARATOR + row * (ch + SEPARATOR));
            for y in 0..ch {
                for x in 0..cw {
                    let src = (y / scale) * w + x / scale;
                    let at = ((y0 + y) * gw + x0 + x) * 3;
                    for (ch_out, px) in rgb[at..at + 3].iter_mut().enumerate() {
                        // Grey images repeat their one channel.
                        *px = cell[ch_out.min(c - 1) * h * w + src];
                    }
                }
            }
        }
    }
    Ok((gw32, gh32, rgb))
}
