//! Learning-rate schedules and the linear ramp-up of loss weights.

use crate::error::{Error, Result};

/// How the learning rate changes over the steps of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// The base rate, after an optional linear warm-up.
    Constant {
        /// Steps of linear warm-up (0: none).
        warmup_steps: u64,
    },
    /// Half a cosine from the base rate down to 0 over `total_steps`, after an optional linear
    /// warm-up: lr_t = base * (1 + cos(pi (t - W) / (T - W))) / 2, and 0 from t = T on.
    Cosine {
        /// T, the step at which the rate reaches 0 (the run's length).
        total_steps: u64,
        /// W, steps of linear warm-up (0: none).
        warmup_steps: u64,
    },
    /// FixMatch's cosine: lr_k = base * cos(7 pi k / (16 K)), which ends at cos(7 pi / 16) ~ 0.195
    /// of the base rate rather than at 0.
    FixMatchCosine {
        /// K, the run's length.
        total_steps: u64,
    },
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::Constant { warmup_steps: 0 }
    }
}

impl Schedule {
    /// The constant schedule without warm-up.
    pub fn constant() -> Schedule {
        Schedule::default()
    }

    /// A cosine schedule over `total_steps` after `warmup_steps` of warm-up, checked.
    pub fn cosine(total_steps: u64, warmup_steps: u64) -> Result<Schedule> {
        if total_steps == 0 {
            return Err(Error::usage("--steps: a cosine schedule needs at least 1 step"));
        }
        if warmup_steps >= total_steps {
            return Err(Error::usage(format!(
                "--warmup: {warmup_steps} warm-up steps leave nothing of the {total_steps} steps"
            )));
        }
        Ok(Schedule::Cosine { total_steps, warmup_steps })
    }

    /// FixMatch's cosine over `total_steps`, checked.
    pub fn fixmatch_cosine(total_steps: u64) -> Result<Schedule> {
        if total_steps == 0 {
            return Err(Error::usage("--steps: a cosine schedule needs at least 1 step"));
        }
        Ok(Schedule::FixMatchCosine { total_steps })
    }

    /// The learning rate of step `step` (0-based) for base rate `base`.
    pub fn lr(&self, base: f32, step: u64) -> f32 {
        let base = base as f64;
        let t = step as f64;
        // Warm-up counts step t as (t + 1) / W, so that no step is taken with a rate of 0.
        let warm = |w: u64| if step < w { (t + 1.0) / w as f64 } else { 1.0 };
        let lr = match *self {
            Schedule::Constant { warmup_steps } => base * warm(warmup_steps),
            Schedule::Cosine { total_steps, warmup_steps } => {
                if step >= total_steps {
                    0.0
                } else if step < warmup_steps {
                    base * warm(warmup_steps)
                } else {
                    // Here W <= t < T, so the span is at least 1.
                    let progress = (t - warmup_steps as f64) / (total_steps - warmup_steps) as f64;
                    base * (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0
                }
            }
            Schedule::FixMatchCosine { total_steps } => {
                let k = t.min(total_steps as f64);
                base * (7.0 * std::f64::consts::PI * k / (16.0 * total_steps as f64)).cos()
            }
        };
        lr as f32
    }
}

/// Linear ramp-up of a loss weight: w_max * min(1, step / ramp_steps), and w_max when
/// `ramp_steps` is 0.
pub fn ramp(w_max: f32, step: u64, ramp_steps: u64) -> f32 {
    if ramp_steps == 0 || step >= ramp_steps {
        return w_max;
    }
    (w_max as f64 * step as f64 / ramp_steps as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_endpoints_and_shape() {
        let s = Schedule::cosine(1000, 0).unwrap();
        let base = 2e-3f32;
        assert_eq!(s.lr(base, 0), base);
        assert!((s.lr(base, 500) - base / 2.0).abs() < 1e-9);
        assert_eq!(s.lr(base, 1000), 0.0);
        assert_eq!(s.lr(base, 5000), 0.0);
        // A quarter of the way: (1 + cos(pi / 4)) / 2.
        let q = (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0 * base as f64;
        assert!((s.lr(base, 250) as f64 - q).abs() < 1e-9);
        let mut prev = f32::INFINITY;
        for t in 0..=1000 {
            let lr = s.lr(base, t);
            assert!(lr <= prev && lr >= 0.0);
            prev = lr;
        }
    }

    #[test]
    fn fixmatch_cosine_follows_its_formula() {
        let s = Schedule::fixmatch_cosine(1000).unwrap();
        assert_eq!(s.lr(0.03, 0), 0.03);
        let at = |k: f64| (0.03f32 as f64 * (7.0 * std::f64::consts::PI * k / 16000.0).cos()) as f32;
        for k in [1u64, 250, 500, 999, 1000] {
            assert_eq!(s.lr(0.03, k), at(k as f64), "step {k}");
        }
        // It ends near 0.195 of the base rate, not at 0, and stays there past the end.
        assert!((s.lr(1.0, 1000) - 0.19509).abs() < 1e-4);
        assert_eq!(s.lr(1.0, 5000), s.lr(1.0, 1000));
        assert!(Schedule::fixmatch_cosine(0).is_err());
    }

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::cosine(110, 10).unwrap();
        assert!((s.lr(1.0, 0) - 0.1).abs() < 1e-7);
        assert!((s.lr(1.0, 4) - 0.5).abs() < 1e-7);
        assert_eq!(s.lr(1.0, 9), 1.0);
        assert_eq!(s.lr(1.0, 10), 1.0);
        assert!((s.lr(1.0, 60) - 0.5).abs() < 1e-7);
        assert_eq!(s.lr(1.0, 110), 0.0);
        let c = Schedule::Constant { warmup_steps: 4 };
        assert_eq!([c.lr(2.0, 0), c.lr(2.0, 1), c.lr(2.0, 3), c.lr(2.0, 100)], [0.5, 1.0, 2.0, 2.0]);
        assert_eq!(Schedule::constant().lr(0.3, 12345), 0.3);
    }

    #[test]
    fn bad_schedules_name_the_argument() {
        assert!(Schedule::cosine(0, 0).unwrap_err().message().starts_with("--steps"));
        assert!(Schedule::cosine(10, 10).unwrap_err().message().starts_with("--warmup"));
        // Built directly, a degenerate schedule still gives finite rates.
        let s = Schedule::Cosine { total_steps: 5, warmup_steps: 9 };
        assert!((0..20).all(|t| s.lr(1.0, t).is_finite()));
        let s = Schedule::Cosine { total_steps: 0, warmup_steps: 0 };
        assert_eq!(s.lr(1.0, 0), 0.0);
    }

    #[test]
    fn ramp_values() {
        assert_eq!(ramp(75.0, 0, 100), 0.0);
        assert_eq!(ramp(75.0, 20, 100), 15.0);
        assert_eq!(ramp(75.0, 100, 100), 75.0);
        assert_eq!(ramp(75.0, 1000, 100), 75.0);
        assert_eq!(ramp(2.0, 0, 0), 2.0);
        assert_eq!(ramp(1.0, 1, 4), 0.25);
    }
}
