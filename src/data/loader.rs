//! Batches: `gather` (parallel over images), the prefetching training `Loader`, and evaluation
//! batches.
//!
//! Every random draw is keyed by (seed, purpose, step, position in the batch), so a batch is a
//! pure function of those: the same at any thread count, and the same when a run resumes at step t.

use super::augment::{augment_raw, normalize_raw, render, Augment, Draw};
use super::split::{below, Split};
use super::Dataset;
use crate::device::Device;
use crate::error::{Error, ErrorKind, Result};
use crate::ops::Indices;
use crate::rng::Rng;
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// RNG purpose of the per-step index sampling.
const PURPOSE_SAMPLE: u64 = u64::from_be_bytes(*b"dat:samp");
/// RNG purpose of the labeled batch's augmentation.
const PURPOSE_LABELED: u64 = u64::from_be_bytes(*b"dat:labl");
/// RNG purpose of unlabeled view k is this plus k.
const PURPOSE_VIEW: u64 = u64::from_be_bytes(*b"dat:vw\0\0");
/// RNG purpose of the labeled batch's second view.
const PURPOSE_LABELED_2: u64 = u64::from_be_bytes(*b"dat:lab2");
/// RNG purpose of the strong view's RandAugment and Cutout (its crop and flip use the view's).
const PURPOSE_STRONG: u64 = u64::from_be_bytes(*b"dat:strg");
/// The unlabeled view that is strong when the plan asks for one (FixMatch: 0 weak, 1 strong).
const STRONG_VIEW: usize = 1;

/// What one step draws: batch sizes and views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPlan {
    /// Labeled images per step (0: none, for unsupervised pre-training).
    pub labeled: usize,
    /// Unlabeled images per step.
    pub unlabeled: usize,
    /// Augmented views of each unlabeled image (0: no unlabeled images, supervised).
    pub views: usize,
    /// Also draw a second, independent view of the labeled batch (for MI on labeled images).
    pub labeled_second_view: bool,
    /// The second unlabeled view is a strong one (FixMatch): RandAugment and Cutout after the
    /// weak crop and flip.
    pub strong_view: bool,
    /// The part of every batch this process takes in a data-parallel run.
    pub shard: Shard,
}

/// Process `rank` of `ranks` takes rows [rank B / ranks, (rank + 1) B / ranks) of every batch of
/// B rows; the batch itself (indices and augmentation draws, keyed by the row's place in the
/// whole batch) is the same for any number of processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This process's rank.
    pub rank: usize,
    /// The number of processes.
    pub ranks: usize,
}

impl Shard {
    /// The whole batch (one process).
    pub const WHOLE: Shard = Shard { rank: 0, ranks: 1 };

    /// This shard's rows of a batch of `n` rows (`n` a multiple of the number of processes).
    pub fn rows(self, n: usize) -> std::ops::Range<usize> {
        let per = n / self.ranks.max(1);
        self.rank * per..(self.rank + 1) * per
    }
}

impl BatchPlan {
    /// `labeled` labeled and `unlabeled` unlabeled images in `views` views, no second labeled view.
    pub fn new(labeled: usize, unlabeled: usize, views: usize) -> BatchPlan {
        BatchPlan { labeled, unlabeled, views, labeled_second_view: false, strong_view: false, shard: Shard::WHOLE }
    }
}

/// Images `idx` of `ds` as a normalised [B, C, H, W] tensor and their labels.
///
/// With `augment: Some((seed, purpose, step))` image b is augmented with draws from
/// `Rng::keyed(seed, &[purpose, step, b])`; with None it is only normalised.
pub fn gather(
    ds: &Dataset,
    idx: &[usize],
    aug: &Augment,
    augment: Option<(u64, u64, u64)>,
) -> Result<(Tensor, Vec<usize>)> {
    gather_with(ds, idx, aug, augment, false, 0)
}

/// `gather`; with `strong`, image b's crop and flip are followed by RandAugment and Cutout drawn
/// from `Rng::keyed(seed, &[PURPOSE_STRONG, step, b])`, so a strong view too depends only on
/// (seed, step, b). `idx` are rows `first..` of the step's whole batch (a data-parallel shard):
/// the draws are keyed by the row's place in the whole batch.
fn gather_with(
    ds: &Dataset,
    idx: &[usize],
    aug: &Augment,
    augment: Option<(u64, u64, u64)>,
    strong: bool,
    first: usize,
) -> Result<(Tensor, Vec<usize>)> {
    if idx.is_empty() {
        return Err(Error::usage(format!("an empty batch of {} was requested", ds.name)));
    }
    let chw = ds.image_size();
    if chw == 0 {
        return Err(Error::shape(format!("{}: images of zero size", ds.name)));
    }
    aug.check(ds)?;
    let lut = aug.lut();
    let labels = idx.iter().map(|&i| ds.label(i)).collect::<Result<Vec<usize>>>()?;
    // From the tensor pool: the batch tensor goes back there when dropped, so the next batch of
    // this size reuses it instead of leaving the pool with one more buffer every step.
    // Sizes from the command line: too large is an error, not an abort.
    let what = || format!("a batch of {} images of {}x{}x{}", idx.len(), ds.channels, ds.height, ds.width);
    let len = idx.len().checked_mul(chw).ok_or_else(|| Error::out_of_memory(format!("{}: size overflows", what())))?;
    let mut data = crate::pool::try_zeros(len, what)?;
    let images = data.par_chunks_mut(chw).zip(idx.par_iter()).enumerate().map(|(b, x)| (b + first, x));
    match augment {
        Some((seed, purpose, step)) if strong => {
            // One raw buffer per worker: RandAugment works on u8 before the normalisation.
            images.try_for_each_init(
                || vec![0u8; chw],
                |raw, (b, (out, &i))| {
                    let mut strong = Rng::keyed(seed, &[PURPOSE_STRONG, step, b as u64]);
                    augment_raw(ds, i, aug, &mut Rng::keyed(seed, &[purpose, step, b as u64]), Some(&mut strong), raw)?;
                    normalize_raw(raw, &lut, out)
                },
            )?
        }
        None if strong => return Err(Error::usage("a strong view needs random draws (a seed and a step)")),
        _ => images.try_for_each(|(b, (out, &i))| {
            let d = match augment {
                Some((seed, purpose, step)) => Draw::sample(aug, &mut Rng::keyed(seed, &[purpose, step, b as u64])),
                None => Draw::identity(aug),
            };
            render(ds, i, aug, &lut, d, out)
        })?,
    }
    let t = Tensor::from_vec(data, &[idx.len(), ds.channels, ds.height, ds.width])?;
    Ok((t, labels))
}

/// One training step's data.
#[derive(Debug, Clone)]
pub struct StepBatch {
    /// The step this batch belongs to.
    pub step: u64,
    /// Augmented labeled images, [labeled_batch, C, H, W] (0 rows when labeled_batch is 0).
    pub labeled: Tensor,
    /// Independent augmented views of the same unlabeled images, each [unlabeled_batch, C, H, W].
    pub views: Vec<Tensor>,
    /// Labels of `labeled`: on the host always (range checks need no copy), and on the batch's
    /// GPU too after `to_device`, where they arrive in the batch's one upload.
    pub labels: Indices,
    /// A second augmented view of the labeled images, when the plan asks for it.
    pub labeled_view2: Option<Tensor>,
    /// Training-set indices of the labeled images.
    pub labeled_idx: Vec<usize>,
    /// Training-set indices of the unlabeled images (their labels are for diagnostics only).
    pub unlabeled_idx: Vec<usize>,
    /// The true labels of the unlabeled images, for diagnostics only (FixMatch's pseudo-label
    /// accuracy); no objective trains on them.
    pub unlabeled_labels: Vec<usize>,
}

/// What the worker needs to build the batch of any step.
struct Plan {
    train: Arc<Dataset>,
    labeled: Vec<usize>,
    unlabeled: Vec<usize>,
    aug: Augment,
    seed: u64,
    labeled_batch: usize,
    unlabeled_batch: usize,
    views: usize,
    labeled_second_view: bool,
    strong_view: bool,
    shard: Shard,
}

impl Plan {
    /// The batch of step `t`: indices drawn uniformly with replacement, then augmented.
    fn batch(&self, t: u64) -> Result<StepBatch> {
        let mut rng = Rng::keyed(self.seed, &[PURPOSE_SAMPLE, t]);
        let labeled_idx: Vec<usize> =
            (0..self.labeled_batch).map(|_| self.labeled[below(&mut rng, self.labeled.len())]).collect();
        let n_unl = if self.views > 0 { self.unlabeled_batch } else { 0 };
        let unlabeled_idx: Vec<usize> =
            (0..n_unl).map(|_| self.unlabeled[below(&mut rng, self.unlabeled.len())]).collect();
        // This process's rows of the whole batch (all of them in a single-process run).
        let (lr, ur) = (self.shard.rows(labeled_idx.len()), self.shard.rows(unlabeled_idx.len()));
        let (labeled_idx, unlabeled_idx) = (labeled_idx[lr.clone()].to_vec(), unlabeled_idx[ur.clone()].to_vec());
        let ds = &*self.train;
        if crate::fault::alloc_fails_at(t + 1) {
            // As the allocation in `gather` fails, with the flag that sizes the batch named.
            let (flag, n) =
                if labeled_idx.is_empty() { ("--unlabeled-batch", n_unl) } else { ("--batch", labeled_idx.len()) };
            return Err(Error::out_of_memory(format!(
                "{flag}: a batch of {n} images of {}x{}x{} for step {}: could not be allocated (injected by {})",
                ds.channels,
                ds.height,
                ds.width,
                t + 1,
                crate::fault::VAR
            )));
        }
        let (labeled, labels) = if labeled_idx.is_empty() {
            (Tensor::zeros(&[0, ds.channels, ds.height, ds.width]), Vec::new())
        } else {
            gather_with(ds, &labeled_idx, &self.aug, Some((self.seed, PURPOSE_LABELED, t)), false, lr.start)
                .map_err(|e| e.context("--batch"))?
        };
        let unlabeled_labels = unlabeled_idx.iter().map(|&i| ds.label(i)).collect::<Result<Vec<usize>>>()?;
        let views = (0..self.views)
            .map(|k| {
                let strong = self.strong_view && k == STRONG_VIEW;
                let draws = Some((self.seed, PURPOSE_VIEW + k as u64, t));
                gather_with(ds, &unlabeled_idx, &self.aug, draws, strong, ur.start)
                    .map(|(v, _)| v)
                    .map_err(|e| e.context("--unlabeled-batch"))
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let labeled_view2 = if self.labeled_second_view && !labeled_idx.is_empty() {
            let draws = Some((self.seed, PURPOSE_LABELED_2, t));
            Some(gather_with(ds, &labeled_idx, &self.aug, draws, false, lr.start)?.0)
        } else {
            None
        };
        Ok(StepBatch {
            step: t,
            labeled,
            labels: labels.into(),
            views,
            labeled_view2,
            labeled_idx,
            unlabeled_idx,
            unlabeled_labels,
        })
    }
}

impl StepBatch {
    /// The batch with its images and labels on `device`, copied there together with `extra`
    /// index vectors (e.g. MixUp's permutation): one upload per step on a GPU (the images of
    /// every view, the labels and the extra indices as i32 bits, packed into one buffer on the
    /// host, then split on the device). On the host it is the batch itself, and the indices
    /// stay host vectors.
    pub fn to_device(&self, device: Device, extra: &[Vec<usize>]) -> Result<(StepBatch, Vec<Indices>)> {
        if device == Device::Cpu || self.labeled.device() == device {
            return Ok((self.clone(), extra.iter().map(|v| Indices::from(v.clone())).collect()));
        }
        let index_vectors: Vec<&[usize]> =
            std::iter::once(&self.labels.host[..]).chain(extra.iter().map(|v| &v[..])).collect();
        let images: Vec<&Tensor> =
            std::iter::once(&self.labeled).chain(&self.views).chain(self.labeled_view2.as_ref()).collect();
        let total =
            images.iter().map(|t| t.numel()).sum::<usize>() + index_vectors.iter().map(|v| v.len()).sum::<usize>();
        let mut packed = Vec::new();
        packed.try_reserve_exact(total).map_err(|_| {
            Error::new(ErrorKind::OutOfMemory, format!("step {}: packing a batch of {total} values", self.step))
        })?;
        for t in &images {
            packed.extend_from_slice(t.data()?);
        }
        for &y in index_vectors.iter().copied().flatten() {
            let y = i32::try_from(y).map_err(|_| Error::shape(format!("index {y} beyond 32 bits")))?;
            packed.push(f32::from_bits(y as u32));
        }
        let on_device = Tensor::from_vec(packed, &[total])?
            .to_device(device)
            .map_err(|e| e.context(format!("step {}: uploading the batch ({total} values)", self.step)))?;
        let mut at = 0;
        let mut next = |shape: &[usize]| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            at += n;
            on_device.copy_range(at - n..at, shape)
        };
        let labeled = next(self.labeled.shape())?;
        let views = self.views.iter().map(|v| next(v.shape())).collect::<Result<Vec<_>>>()?;
        let labeled_view2 = self.labeled_view2.as_ref().map(|v| next(v.shape())).transpose()?;
        let mut indices = index_vectors
            .iter()
            .map(|v| Ok(Indices { host: v.to_vec(), device: Some(next(&[v.len()])?) }))
            .collect::<Result<Vec<Indices>>>()?;
        let labels = indices.remove(0);
        let batch = StepBatch {
            step: self.step,
            labeled,
            labels,
            views,
            labeled_view2,
            labeled_idx: self.labeled_idx.clone(),
            unlabeled_idx: self.unlabeled_idx.clone(),
            unlabeled_labels: self.unlabeled_labels.clone(),
        };
        Ok((batch, indices))
    }
}

/// Training batches for steps start_step, start_step + 1, ..., built one step ahead on a
/// background thread (a bounded channel keeps at most two batches in flight).
pub struct Loader {
    rx: Option<Receiver<Result<StepBatch>>>,
    worker: Option<JoinHandle<()>>,
    step: u64,
}

impl Loader {
    /// A loader over `train` with `split`'s labeled and unlabeled indices; step t's batch depends
    /// only on (data, split, aug, seed, sizes, t), so a run resumed at `start_step` sees the same
    /// batches as one that never stopped. `views` = 0 draws no unlabeled images (supervised), and
    /// `labeled_batch` = 0 gives an empty labeled tensor (unsupervised pre-training); both 0 is a
    /// usage error, as is `unlabeled_batch` = 0 with views.
    pub fn new(
        train: Arc<Dataset>,
        split: &Split,
        aug: Augment,
        seed: u64,
        plan: BatchPlan,
        start_step: u64,
    ) -> Result<Loader> {
        let BatchPlan {
            labeled: labeled_batch,
            unlabeled: unlabeled_batch,
            views,
            labeled_second_view,
            strong_view,
            shard,
        } = plan;
        let k = shard.ranks;
        if k == 0 || shard.rank >= k {
            return Err(Error::usage(format!("shard {} of {k} processes", shard.rank)));
        }
        for (flag, n) in
            [("--batch", labeled_batch), ("--unlabeled-batch", if views > 0 { unlabeled_batch } else { 0 })]
        {
            if !n.is_multiple_of(k) {
                return Err(Error::usage(format!("{flag} {n}: does not split evenly over {k} processes")));
            }
        }
        train.validate()?;
        aug.check(&train)?;
        if views > 0 && unlabeled_batch == 0 {
            return Err(Error::usage("--unlabeled-batch 0: the unlabeled views need at least one image"));
        }
        if labeled_batch == 0 && views == 0 {
            return Err(Error::usage("--batch 0 with no unlabeled views: a step would have no images"));
        }
        if strong_view && views <= STRONG_VIEW {
            return Err(Error::usage(format!(
                "a strong view is unlabeled view {STRONG_VIEW}: it needs at least {} views, not {views}",
                STRONG_VIEW + 1
            )));
        }
        if strong_view && train.channels != 1 && train.channels != 3 {
            return Err(Error::usage(format!(
                "{}: strong (RandAugment) views need 1 or 3 channels, not {}",
                train.name, train.channels
            )));
        }
        if labeled_batch > 0 && split.labeled.is_empty() {
            return Err(Error::usage("the split has no labeled images to draw a labeled batch from"));
        }
        if views > 0 && split.unlabeled.is_empty() {
            return Err(Error::usage("the split has no unlabeled images to draw the views from"));
        }
        if let Some(&i) = split.labeled.iter().chain(&split.unlabeled).find(|&&i| i >= train.len()) {
            return Err(Error::usage(format!(
                "split index {i} out of range for {} ({} images)",
                train.name,
                train.len()
            )));
        }
        let plan = Plan {
            train,
            labeled: split.labeled.clone(),
            unlabeled: split.unlabeled.clone(),
            aug,
            seed,
            labeled_batch,
            unlabeled_batch,
            views,
            labeled_second_view,
            strong_view,
            shard,
        };
        let (tx, rx) = sync_channel(1);
        let worker = std::thread::Builder::new()
            .name("muscle-loader".into())
            .spawn(move || {
                let mut t = start_step;
                loop {
                    let b = plan.batch(t);
                    let failed = b.is_err();
                    // A send error means the Loader was dropped: stop.
                    if tx.send(b).is_err() || failed {
                        break;
                    }
                    t += 1;
                }
            })
            .map_err(|e| Error::new(ErrorKind::Io, format!("cannot start the data loader thread: {e}")))?;
        Ok(Loader { rx: Some(rx), worker: Some(worker), step: start_step })
    }

    /// The batch of the next step (waits only if the worker has not finished it yet).
    #[allow(clippy::should_implement_trait)] // an endless stream of fallible batches: Option adds nothing
    pub fn next(&mut self) -> Result<StepBatch> {
        let rx = self.rx.as_ref().ok_or_else(|| Error::usage("the data loader stopped after an error"))?;
        match rx.recv() {
            Ok(Ok(b)) => {
                self.step += 1;
                Ok(b)
            }
            Ok(Err(e)) => {
                self.rx = None;
                Err(e)
            }
            Err(_) => {
                self.rx = None;
                Err(Error::new(ErrorKind::Io, "the data loader thread stopped unexpectedly"))
            }
        }
    }

    /// The step whose batch `next` returns.
    pub fn step(&self) -> u64 {
        self.step
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel first makes the worker's pending send fail, so join returns.
        self.rx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Batches of `batch` images of `ds` (all of them, or `idx`), normalised and unaugmented, in order.
pub fn eval_batches<'a>(ds: &'a Dataset, idx: Option<&'a [usize]>, aug: &'a Augment, batch: usize) -> EvalBatches<'a> {
    EvalBatches { ds, idx, aug, batch, pos: 0, done: false }
}

/// Iterator returned by [`eval_batches`]; yields one usage error and stops when `batch` is 0.
pub struct EvalBatches<'a> {
    ds: &'a Dataset,
    idx: Option<&'a [usize]>,
    aug: &'a Augment,
    batch: usize,
    pos: usize,
    done: bool,
}

impl EvalBatches<'_> {
    fn total(&self) -> usize {
        self.idx.map_or(self.ds.len(), <[usize]>::len)
    }
}

impl Iterator for EvalBatches<'_> {
    type Item = Result<(Tensor, Vec<usize>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.batch == 0 {
            self.done = true;
            return Some(Err(Error::usage("evaluation batch size 0: must be at least 1")));
        }
        let total = self.total();
        if self.pos >= total {
            self.done = true;
            return None;
        }
        let end = total.min(self.pos + self.batch);
        let chunk: Vec<usize> = match self.idx {
            Some(idx) => idx[self.pos..end].to_vec(),
            None => (self.pos..end).collect(),
        };
        self.pos = end;
        let r = gather(self.ds, &chunk, self.aug, None);
        if r.is_err() {
            self.done = true;
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::super::split::split;
    use super::super::tests::emb;
    use super::super::{augment_into, augment_raw, normalize_into, DatasetKind};
    use super::*;

    fn setup() -> (Arc<Dataset>, Split, Augment) {
        let tr = Arc::new(emb().train.clone());
        let s = split(&tr, 100, 0, 1.0, 4).unwrap();
        let aug = Augment::for_dataset(DatasetKind::FashionMnist, &tr);
        (tr, s, aug)
    }

    fn pool(n: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap()
    }

    #[test]
    fn the_two_views_draw_independent_augmentations() {
        // Pad 2 + crop + flip has 5 x 5 x 2 = 50 outcomes: independent draws of the two views
        // agree for about 1 image in 50; correlated streams (keys mixed too weakly) would agree
        // far more often, and the MI term would see two copies of one view.
        let (tr, s, aug) = setup();
        let (mut same, mut total) = (0usize, 0usize);
        for step in 0..8u64 {
            let mut loader = Loader::new(tr.clone(), &s, aug.clone(), 3, BatchPlan::new(8, 256, 2), step).unwrap();
            let batch = loader.next().unwrap();
            let (a, b) = (batch.views[0].data().unwrap(), batch.views[1].data().unwrap());
            for (ra, rb) in a.chunks_exact(784).zip(b.chunks_exact(784)) {
                same += usize::from(ra == rb);
                total += 1;
            }
        }
        let rate = same as f64 / total as f64;
        assert!((0.005..0.05).contains(&rate), "{same} of {total} images have identical views");
    }

    #[test]
    fn gather_is_independent_of_the_thread_count() {
        let tr = &emb().train;
        let aug = Augment::for_dataset(DatasetKind::FashionMnist, tr);
        let idx: Vec<usize> = (0..300).map(|k| (k * 37) % tr.len()).collect();
        let run = |n| pool(n).install(|| gather(tr, &idx, &aug, Some((9, 1, 5))).unwrap());
        let (a, la) = run(1);
        let (b, lb) = run(2);
        assert_eq!(a.shape(), [300, 1, 28, 28]);
        assert_eq!(a.data().unwrap(), b.data().unwrap());
        assert_eq!(la, lb);
        assert_eq!(la[0], tr.labels[0] as usize);
        // Row b is augment_into with the stream keyed by (seed, [purpose, step, b]).
        let mut row = vec![0.0; 784];
        for b in [0usize, 1, 299] {
            augment_into(tr, idx[b], &aug, &mut Rng::keyed(9, &[1, 5, b as u64]), &mut row).unwrap();
            assert_eq!(&a.data().unwrap()[b * 784..(b + 1) * 784], &row[..]);
        }
        // Another step or seed gives other draws.
        let (c, _) = gather(tr, &idx, &aug, Some((9, 1, 6))).unwrap();
        assert_ne!(a.data().unwrap(), c.data().unwrap());
        // Bad indices and empty batches are errors, not panics.
        assert!(gather(tr, &[tr.len()], &aug, None).is_err());
        assert_eq!(gather(tr, &[], &aug, None).unwrap_err().kind(), ErrorKind::Usage);
    }

    fn strong_plan(labeled: usize, unlabeled: usize) -> BatchPlan {
        BatchPlan { strong_view: true, ..BatchPlan::new(labeled, unlabeled, 2) }
    }

    #[test]
    fn strong_views_are_keyed_by_seed_step_and_image() {
        let (tr, s, aug) = setup();
        let batch =
            |plan: BatchPlan, step| Loader::new(tr.clone(), &s, aug.clone(), 7, plan, step).unwrap().next().unwrap();
        let (a, weak) = (batch(strong_plan(8, 64), 2), batch(BatchPlan::new(8, 64, 2), 2));
        // View 0 and the labeled batch are the weak plan's, bit for bit.
        assert_eq!(a.views[0].data().unwrap(), weak.views[0].data().unwrap());
        assert_eq!(a.labeled.data().unwrap(), weak.labeled.data().unwrap());
        assert_eq!(a.unlabeled_idx, weak.unlabeled_idx);
        assert_eq!(a.unlabeled_labels, a.unlabeled_idx.iter().map(|&i| tr.labels[i] as usize).collect::<Vec<_>>());
        // The strong view is the same at 1 and 2 threads.
        let key = Some((7, PURPOSE_VIEW + 1, 2));
        for threads in [1, 2] {
            let (v, _) = pool(threads).install(|| gather_with(&tr, &a.unlabeled_idx, &aug, key, true, 0)).unwrap();
            assert_eq!(v.data().unwrap(), a.views[1].data().unwrap(), "{threads} thread(s)");
        }
        // Row b is the weak draw of (seed, view-1 purpose, step, b) then RandAugment + Cutout from
        // (seed, strong purpose, step, b), normalised.
        let lut = aug.lut();
        let (mut raw, mut row) = (vec![0u8; 784], vec![0.0f32; 784]);
        let strong_rows = a.views[1].data().unwrap();
        let weak_rows = weak.views[1].data().unwrap();
        let mut differ = 0;
        for b in 0..64usize {
            let mut r = Rng::keyed(7, &[PURPOSE_VIEW + 1, 2, b as u64]);
            let mut r2 = Rng::keyed(7, &[PURPOSE_STRONG, 2, b as u64]);
            augment_raw(&tr, a.unlabeled_idx[b], &aug, &mut r, Some(&mut r2), &mut raw).unwrap();
            normalize_raw(&raw, &lut, &mut row).unwrap();
            assert_eq!(&strong_rows[b * 784..(b + 1) * 784], &row[..], "image {b}");
            differ += usize::from(strong_rows[b * 784..(b + 1) * 784] != weak_rows[b * 784..(b + 1) * 784]);
        }
        // Identity with a zero-side Cutout is rare: nearly every strong view differs from its weak one.
        assert!(differ >= 60, "only {differ} of 64 strong views differ from the weak ones");
        // Another step draws other strong views.
        assert_ne!(batch(strong_plan(8, 64), 3).views[1].data().unwrap(), a.views[1].data().unwrap());
        // A strong view needs a second view to be, and 1 or 3 channels.
        let one = BatchPlan { strong_view: true, ..BatchPlan::new(8, 64, 1) };
        assert_eq!(Loader::new(tr.clone(), &s, aug.clone(), 7, one, 0).err().unwrap().kind(), ErrorKind::Usage);
    }

    #[test]
    fn the_shards_of_a_batch_are_its_rows_whatever_the_number_of_processes() {
        let (tr, s, aug) = setup();
        let plan = |rank, ranks| BatchPlan { shard: Shard { rank, ranks }, ..strong_plan(8, 64) };
        let batch = |p: BatchPlan| Loader::new(tr.clone(), &s, aug.clone(), 7, p, 3).unwrap().next().unwrap();
        let whole = batch(plan(0, 1));
        let cat =
            |f: &dyn Fn(&StepBatch) -> Vec<f32>, parts: &[StepBatch]| parts.iter().flat_map(f).collect::<Vec<f32>>();
        for ranks in [2usize, 4] {
            let parts: Vec<StepBatch> = (0..ranks).map(|r| batch(plan(r, ranks))).collect();
            assert!(parts.iter().all(|p| p.labels.len() == 8 / ranks && p.unlabeled_idx.len() == 64 / ranks));
            // Rows, indices, labels and every view (the strong one too) are the whole batch's, in
            // order: the draws are keyed by the row's place in the whole batch.
            assert_eq!(cat(&|p| p.labeled.data().unwrap().to_vec(), &parts), whole.labeled.data().unwrap());
            for v in 0..2 {
                assert_eq!(cat(&|p| p.views[v].data().unwrap().to_vec(), &parts), whole.views[v].data().unwrap());
            }
            let idx: Vec<usize> = parts.iter().flat_map(|p| p.unlabeled_idx.clone()).collect();
            assert_eq!(idx, whole.unlabeled_idx);
            let labels: Vec<usize> = parts.iter().flat_map(|p| p.labels.host.clone()).collect();
            assert_eq!(labels, whole.labels.host);
        }
        // A batch that does not split evenly is refused, naming the flag.
        let e = Loader::new(
            tr.clone(),
            &s,
            aug.clone(),
            7,
            BatchPlan { shard: Shard { rank: 0, ranks: 3 }, ..strong_plan(8, 63) },
            0,
        );
        assert!(e.err().unwrap().message().starts_with("--batch 8"));
    }

    #[test]
    fn loader_batches_have_the_right_shape_and_distinct_views() {
        let (tr, s, aug) = setup();
        let mut l = Loader::new(tr.clone(), &s, aug, 1, BatchPlan::new(64, 256, 3), 0).unwrap();
        let b = l.next().unwrap();
        assert_eq!((b.step, l.step()), (0, 1));
        assert_eq!(b.labeled.shape(), [64, 1, 28, 28]);
        assert_eq!(b.views.len(), 3);
        assert!(b.views.iter().all(|v| v.shape() == [256, 1, 28, 28]));
        assert!(b.labeled_idx.iter().all(|i| s.labeled.binary_search(i).is_ok()));
        assert_eq!(b.labels.host, b.labeled_idx.iter().map(|&i| tr.labels[i] as usize).collect::<Vec<_>>());
        assert_eq!(b.unlabeled_idx.len(), 256);
        // The views are of the same images but differ as augmentations.
        assert_ne!(b.views[0].data().unwrap(), b.views[1].data().unwrap());
        assert_ne!(b.views[1].data().unwrap(), b.views[2].data().unwrap());
        // Per image, each view is some crop/flip of that image: its mean of the raw pixels inside
        // the crop is close; a cheap check that the views belong to the same images.
        let v0 = b.views[0].data().unwrap();
        let v1 = b.views[1].data().unwrap();
        let mut diff = 0usize;
        for k in 0..256 {
            let (a, c) = (&v0[k * 784..(k + 1) * 784], &v1[k * 784..(k + 1) * 784]);
            diff += (a != c) as usize;
            let (ma, mc) = (a.iter().sum::<f32>() / 784.0, c.iter().sum::<f32>() / 784.0);
            assert!((ma - mc).abs() < 0.5, "image {k}: view means {ma} and {mc}");
        }
        assert!(diff > 200, "only {diff} of 256 images differ between views");
        // Uniform with replacement: over a few steps the labeled draws cover most of the 100.
        let mut seen = vec![false; tr.len()];
        for _ in 0..5 {
            for i in l.next().unwrap().labeled_idx {
                seen[i] = true;
            }
        }
        assert!(seen.iter().filter(|&&s| s).count() > 80);
    }

    #[test]
    fn a_loader_started_at_step_t_gives_the_same_batch() {
        let (tr, s, aug) = setup();
        let mut a = Loader::new(tr.clone(), &s, aug.clone(), 5, BatchPlan::new(16, 32, 2), 0).unwrap();
        let mut at3 = None;
        for _ in 0..5 {
            let b = a.next().unwrap();
            if b.step == 3 {
                at3 = Some(b);
            }
        }
        let at3 = at3.unwrap();
        let b3 = Loader::new(tr.clone(), &s, aug.clone(), 5, BatchPlan::new(16, 32, 2), 3).unwrap().next().unwrap();
        assert_eq!(b3.step, 3);
        assert_eq!(at3.labeled_idx, b3.labeled_idx);
        assert_eq!(at3.unlabeled_idx, b3.unlabeled_idx);
        assert_eq!(at3.labels.host, b3.labels.host);
        assert_eq!(at3.labeled.data().unwrap(), b3.labeled.data().unwrap());
        for k in 0..2 {
            assert_eq!(at3.views[k].data().unwrap(), b3.views[k].data().unwrap());
        }
        // Another seed draws other images.
        let o = Loader::new(tr, &s, aug, 6, BatchPlan::new(16, 32, 2), 3).unwrap().next().unwrap();
        assert_ne!(o.unlabeled_idx, b3.unlabeled_idx);
    }

    #[test]
    fn zero_sizes_and_bad_splits_are_usage_errors() {
        let (tr, s, aug) = setup();
        for (lb, ub, v) in [(0, 0, 0), (0, 256, 0), (64, 0, 2), (0, 0, 2)] {
            let e = Loader::new(tr.clone(), &s, aug.clone(), 0, BatchPlan::new(lb, ub, v), 0).err().unwrap();
            assert_eq!(e.kind(), ErrorKind::Usage, "({lb}, {ub}, {v}): {e}");
        }
        // Supervised (no views) and unsupervised (no labeled batch) loaders work.
        let b = Loader::new(tr.clone(), &s, aug.clone(), 0, BatchPlan::new(8, 0, 0), 0).unwrap().next().unwrap();
        assert!(b.views.is_empty() && b.unlabeled_idx.is_empty());
        let b = Loader::new(tr.clone(), &s, aug.clone(), 0, BatchPlan::new(0, 8, 2), 0).unwrap().next().unwrap();
        assert_eq!(b.labeled.shape(), [0, 1, 28, 28]);
        let mut bad = s.clone();
        bad.unlabeled.push(tr.len());
        assert!(Loader::new(tr.clone(), &bad, aug.clone(), 0, BatchPlan::new(8, 8, 2), 0).is_err());
        let empty = Split { labeled: vec![], unlabeled: s.unlabeled.clone(), val: vec![] };
        assert!(Loader::new(tr, &empty, aug, 0, BatchPlan::new(8, 8, 2), 0).is_err());
    }

    #[test]
    fn eval_batches_cover_the_set_in_order() {
        let te = &emb().test;
        let aug = Augment::for_dataset(DatasetKind::FashionMnist, te);
        let batches: Vec<_> = eval_batches(te, None, &aug, 300).collect::<Result<Vec<_>>>().unwrap();
        assert_eq!(batches.len(), 7);
        assert_eq!(batches[6].0.shape(), [200, 1, 28, 28]);
        let labels: Vec<usize> = batches.iter().flat_map(|(_, l)| l.clone()).collect();
        assert_eq!(labels, te.labels.iter().map(|&l| l as usize).collect::<Vec<_>>());
        let mut one = vec![0.0; 784];
        normalize_into(te, 1234, &aug, &mut one).unwrap();
        assert_eq!(&batches[4].0.data().unwrap()[34 * 784..35 * 784], &one[..]);
        let idx = [5usize, 3, 1999];
        let sub: Vec<_> = eval_batches(te, Some(&idx), &aug, 2).collect();
        assert_eq!(sub.len(), 2);
        assert_eq!(sub[1].as_ref().unwrap().1, vec![te.labels[1999] as usize]);
        let zero: Vec<_> = eval_batches(te, None, &aug, 0).collect();
        assert_eq!(zero.len(), 1);
        assert_eq!(zero[0].as_ref().unwrap_err().kind(), ErrorKind::Usage);
        let bad = [1usize, 5000];
        let r: Vec<_> = eval_batches(te, Some(&bad), &aug, 8).collect();
        assert!(r.len() == 1 && r[0].is_err());
    }
}
