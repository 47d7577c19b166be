//! Labeled / unlabeled / validation splits of a training set (METHOD.md, "Data protocol").
//!
//! Each class's images are put in one seeded random order. The labeled images of the class are
//! the first n_c of that order and the validation images the last; so the validation set does not
//! depend on N, the labeled set does not depend on the validation size, and with one seed a
//! smaller balanced labeled set is a subset of a larger one.

use super::Dataset;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// RNG purpose of the per-class orders.
const PURPOSE_SPLIT: u64 = u64::from_be_bytes(*b"dat:splt");

/// Indices into the training set: labeled, unlabeled and held-out validation images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Images whose labels the training may use (ascending).
    pub labeled: Vec<usize>,
    /// Every training image not in `val`, labeled ones included (ascending).
    pub unlabeled: Vec<usize>,
    /// Held-out validation images, class-balanced (ascending).
    pub val: Vec<usize>,
}

/// Per-class label counts for N labels: N / C each when `label_imbalance` is 1, else the biased counts
/// w_c = R^(-c/(C-1)), n_c = max(1, floor(N w_c / sum w)), remainder one by one to classes 0, 1, ...
pub fn biased_counts(labels: usize, classes: usize, label_imbalance: f64) -> Result<Vec<usize>> {
    if classes == 0 {
        return Err(Error::usage("a data set with no classes cannot be split"));
    }
    if labels == 0 {
        return Err(Error::usage("--labels 0: at least one labeled image per class is needed"));
    }
    if !label_imbalance.is_finite() || label_imbalance < 1.0 {
        return Err(Error::usage(format!(
            "--label-imbalance {label_imbalance}: the ratio of the largest to the smallest class must be a number >= 1"
        )));
    }
    if label_imbalance == 1.0 || classes == 1 {
        if !labels.is_multiple_of(classes) {
            return Err(Error::usage(format!(
                "--labels {labels} is not a multiple of the {classes} classes (a balanced split needs N / classes \
                 per class)"
            )));
        }
        return Ok(vec![labels / classes; classes]);
    }
    let weights: Vec<f64> = (0..classes).map(|c| label_imbalance.powf(-(c as f64) / (classes - 1) as f64)).collect();
    let total: f64 = weights.iter().sum();
    let mut counts: Vec<usize> =
        weights.iter().map(|w| ((labels as f64 * w / total).floor() as usize).max(1)).collect();
    let assigned: usize = counts.iter().sum();
    if assigned > labels {
        return Err(Error::usage(format!(
            "--labels {labels} is too few for {classes} classes with at least one label each"
        )));
    }
    for k in 0..labels - assigned {
        counts[k % classes] += 1;
    }
    Ok(counts)
}

/// Number of images of each class among `idx` (usage error for an index out of range).
pub fn label_counts(ds: &Dataset, idx: &[usize]) -> Result<Vec<usize>> {
    let mut counts = vec![0usize; ds.classes];
    for &i in idx {
        let l = ds.label(i)?;
        let slot = counts
            .get_mut(l)
            .ok_or_else(|| Error::shape(format!("{}: label {l} of image {i} is not below {}", ds.name, ds.classes)))?;
        *slot += 1;
    }
    Ok(counts)
}

/// Splits `train` into `labels` labeled images (class-balanced, or biased by `label_imbalance` > 1),
/// `val` held-out validation images (class-balanced) and the unlabeled rest, reproducibly from `seed`.
pub fn split(train: &Dataset, labels: usize, val: usize, label_imbalance: f64, seed: u64) -> Result<Split> {
    let classes = train.classes;
    let counts = biased_counts(labels, classes, label_imbalance)?;
    if !val.is_multiple_of(classes) {
        return Err(Error::usage(format!("--val {val} is not a multiple of the {classes} classes")));
    }
    let val_per = val / classes;
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for i in 0..train.len() {
        let l = train.label(i)?;
        by_class
            .get_mut(l)
            .ok_or_else(|| Error::shape(format!("{}: label {l} of image {i} is not below {classes}", train.name)))?
            .push(i);
    }
    let (mut labeled, mut held) = (Vec::with_capacity(labels), Vec::with_capacity(val));
    for (c, members) in by_class.iter_mut().enumerate() {
        let need = counts[c] + val_per;
        if members.len() < need {
            let name = train.class_names.get(c).map(String::as_str).unwrap_or("?");
            return Err(Error::usage(format!(
                "class {c} ('{name}') of {} has {} training images, too few for {} labels + {val_per} validation \
                 images (--labels {labels}, --val {val})",
                train.name,
                members.len(),
                counts[c]
            )));
        }
        shuffle(members, &mut Rng::keyed(seed, &[PURPOSE_SPLIT, c as u64]));
        labeled.extend_from_slice(&members[..counts[c]]);
        held.extend_from_slice(&members[members.len() - val_per..]);
    }
    labeled.sort_unstable();
    held.sort_unstable();
    let mut is_val = vec![false; train.len()];
    for &i in &held {
        is_val[i] = true;
    }
    let unlabeled = (0..train.len()).filter(|&i| !is_val[i]).collect();
    Ok(Split { labeled, unlabeled, val: held })
}

/// Fisher-Yates shuffle driven by `rng` (sequential, so independent of the thread count).
fn shuffle(v: &mut [usize], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = below(rng, i + 1);
        v.swap(i, j);
    }
}

/// Uniform integer in [0, n), n > 0, without modulo bias, for any usize n.
pub(crate) fn below(rng: &mut Rng, n: usize) -> usize {
    if let Ok(n32) = u32::try_from(n) {
        return rng.below(n32) as usize;
    }
    // Beyond 2^32 images: rejection sampling on 64 random bits.
    let n = n as u64;
    let zone = u64::MAX - (u64::MAX % n);
    loop {
        let v = ((rng.next_u32() as u64) << 32) | rng.next_u32() as u64;
        if v < zone {
            return (v % n) as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::emb;
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn balanced_split_counts_disjointness_and_cover() {
        let tr = &emb().train;
        let e = split(tr, 255, 500, 1.0, 7).err().map(|e| e.kind());
        assert_eq!(e, Some(ErrorKind::Usage), "255 labels over 10 classes cannot be balanced");
        let s = split(tr, 100, 500, 1.0, 7).unwrap();
        assert_eq!(label_counts(tr, &s.labeled).unwrap(), vec![10; 10]);
        assert_eq!(label_counts(tr, &s.val).unwrap(), vec![50; 10]);
        assert_eq!(s.unlabeled.len(), 10_000 - 500);
        let mut in_val = vec![false; tr.len()];
        for &i in &s.val {
            in_val[i] = true;
        }
        assert!(s.labeled.iter().all(|&i| !in_val[i]), "labeled overlaps val");
        assert!(s.unlabeled.iter().all(|&i| !in_val[i]), "unlabeled overlaps val");
        // Every non-val image is unlabeled, labeled ones included; no duplicates anywhere.
        assert!(s.labeled.iter().all(|i| s.unlabeled.binary_search(i).is_ok()));
        for v in [&s.labeled, &s.unlabeled, &s.val] {
            assert!(v.windows(2).all(|w| w[0] < w[1]));
        }
        assert_eq!(s.unlabeled.len() + s.val.len(), tr.len());
    }

    #[test]
    fn splits_are_reproducible_and_seed_dependent() {
        let tr = &emb().train;
        let a = split(tr, 40, 100, 1.0, 1).unwrap();
        assert_eq!(a, split(tr, 40, 100, 1.0, 1).unwrap());
        let b = split(tr, 40, 100, 1.0, 2).unwrap();
        assert_ne!(a.labeled, b.labeled);
        assert_ne!(a.val, b.val);
        // The validation set does not depend on N; a smaller labeled set is a subset of a larger one.
        let c = split(tr, 1000, 100, 1.0, 1).unwrap();
        assert_eq!(a.val, c.val);
        assert!(a.labeled.iter().all(|i| c.labeled.binary_search(i).is_ok()));
        // Known answer: pins the draw so that a change of the split algorithm is noticed.
        let d = split(tr, 10, 0, 1.0, 0).unwrap();
        assert!(d.val.is_empty() && d.unlabeled.len() == tr.len());
        assert_eq!(label_counts(tr, &d.labeled).unwrap(), vec![1; 10]);
        assert_eq!(d.labeled, [1506, 1996, 3534, 4734, 5224, 5988, 6804, 8876, 9488, 9935]);
    }

    #[test]
    fn biased_counts_follow_the_formula() {
        // R = 10, N = 250, C = 10 by hand: w_c = 10^(-c/9), sum w = 4.086952612..., N w_c / sum w =
        // 61.17, 47.36, 36.67, 28.39, 21.98, 17.02, 13.18, 10.20, 7.90, 6.12 -> floors sum to 246,
        // the remaining 4 go to classes 0..3.
        let expect = vec![62, 48, 37, 29, 21, 17, 13, 10, 7, 6];
        assert_eq!(biased_counts(250, 10, 10.0).unwrap(), expect);
        let tr = &emb().train;
        let s = split(tr, 250, 0, 10.0, 3).unwrap();
        assert_eq!(label_counts(tr, &s.labeled).unwrap(), expect);
        assert_eq!(biased_counts(100, 10, 1.0).unwrap(), vec![10; 10]);
        // max(1, .) binds for a steep ratio: R = 100, N = 40: N w_c / sum w = 16.1, 9.67, 5.79, 3.47,
        // 2.08, 1.25, 0.75, 0.45, 0.27, 0.16 -> 16, 9, 5, 3, 2, 1, then 1 four times: 40, no remainder.
        assert_eq!(biased_counts(40, 10, 100.0).unwrap(), vec![16, 9, 5, 3, 2, 1, 1, 1, 1, 1]);
        // When the ones alone overshoot N (R = 1000, N = 20 gives 23), no split has the same total.
        assert_eq!(biased_counts(20, 10, 1000.0).unwrap_err().kind(), ErrorKind::Usage);
    }

    #[test]
    fn impossible_requests_are_usage_errors() {
        let tr = &emb().train;
        for (n, val, r) in [
            (0, 0, 1.0),         // no labels
            (15, 0, 1.0),        // not a multiple of 10
            (100, 55, 1.0),      // val not a multiple of 10
            (20_000, 0, 1.0),    // more labels than images per class
            (9_000, 1_000, 1.0), // labels + val exceed a class
            (5, 0, 10.0),        // fewer labels than classes in the biased case
            (100, 0, 0.5),       // ratio below 1
            (100, 0, f64::NAN),  // not a number
        ] {
            let e = split(tr, n, val, r, 0).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Usage, "N {n} val {val} R {r}: {e}");
        }
        let e = split(tr, 20_000, 0, 1.0, 0).unwrap_err();
        assert!(e.message().contains("T-shirt/top"), "{e}");
    }

    #[test]
    fn below_is_in_range_and_covers() {
        let mut r = Rng::new(5, 5);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            seen[below(&mut r, 7)] = true;
        }
        assert!(seen.iter().all(|&s| s));
        let big = (u32::MAX as usize) * 3;
        assert!((0..100).all(|_| below(&mut r, big) < big));
    }
}
