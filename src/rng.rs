//! Counter-based random numbers (Philox4x32-10): a draw depends only on (seed, stream, counter),
//! never on thread scheduling, so parallel augmentation, dropout and resumed runs are reproducible,
//! and a CUDA kernel can draw the same numbers as the CPU.

/// Philox4x32-10 block function: 4 random u32 from a 128-bit counter and a 64-bit key.
pub fn philox4x32(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut c, mut k) = (counter, key);
    for _ in 0..10 {
        let p0 = M0 * c[0] as u64;
        let p1 = M1 * c[2] as u64;
        c = [((p1 >> 32) as u32) ^ c[1] ^ k[0], p1 as u32, ((p0 >> 32) as u32) ^ c[3] ^ k[1], p0 as u32];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// A stream of random numbers keyed by a seed and a purpose-specific 64-bit stream id.
///
/// Draw `i` of stream `(seed, stream)` is a pure function of the three, so a stream can be
/// re-created at any position (`at`).
#[derive(Debug, Clone)]
pub struct Rng {
    key: [u32; 2],
    stream: u64,
    counter: u64,
    buf: [u32; 4],
    used: usize,
}

/// `len` normal draws scaled by `std`, reproducible from `seed`: the inputs of the kernel
/// benchmarks.
pub fn normal_vec(len: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed, 0xbe);
    (0..len).map(|_| std * r.normal()).collect()
}

impl Rng {
    /// A stream for `seed` and `stream` (e.g. hash of (purpose, step, sample)).
    pub fn new(seed: u64, stream: u64) -> Rng {
        Rng::at(seed, stream, 0)
    }

    /// The same stream positioned at block `counter` (4 u32 per block).
    pub fn at(seed: u64, stream: u64, counter: u64) -> Rng {
        Rng { key: [seed as u32, (seed >> 32) as u32], stream, counter, buf: [0; 4], used: 4 }
    }

    /// A stream keyed by several integers, e.g. `[purpose, step, sample]`.
    pub fn keyed(seed: u64, parts: &[u64]) -> Rng {
        Rng::new(seed, mix(parts))
    }

    /// The next uniform u32.
    pub fn next_u32(&mut self) -> u32 {
        if self.used == 4 {
            let ctr =
                [self.counter as u32, (self.counter >> 32) as u32, self.stream as u32, (self.stream >> 32) as u32];
            self.buf = philox4x32(ctr, self.key);
            self.counter += 1;
            self.used = 0;
        }
        let v = self.buf[self.used];
        self.used += 1;
        v
    }

    /// Uniform in [0, 1) with 24 random bits (exactly representable in f32).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0)
    }

    /// Uniform in [0, 1) as f64 with 53 random bits.
    pub fn uniform_f64(&mut self) -> f64 {
        let hi = (self.next_u32() >> 5) as u64;
        let lo = (self.next_u32() >> 6) as u64;
        ((hi << 26) | lo) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [0, n) (n > 0), by rejection so that it has no modulo bias.
    pub fn below(&mut self, n: u32) -> u32 {
        debug_assert!(n > 0);
        let zone = u32::MAX - (u32::MAX % n);
        loop {
            let v = self.next_u32();
            if v < zone {
                return v % n;
            }
        }
    }

    /// A standard normal draw (Box-Muller in f64).
    pub fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.uniform_f64(); // (0, 1]: ln is finite
        let u2 = self.uniform_f64();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// A Gamma(shape, 1) draw (Marsaglia-Tsang), for Beta sampling in MixUp.
    pub fn gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = self.uniform_f64().max(f64::MIN_POSITIVE);
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal() as f64;
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = self.uniform_f64();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// A Beta(a, b) draw.
    pub fn beta(&mut self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        x / (x + y)
    }
}

/// Mixes integers into one 64-bit stream id (SplitMix64 finaliser chained).
pub fn mix(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x243F_6A88_85A3_08D3;
    for &p in parts {
        h ^= p.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(h << 6).wrapping_add(h >> 2);
        h = splitmix(h);
    }
    h
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answer() {
        // Random123's published known-answer vector for philox4x32-10 with zero counter and key.
        assert_eq!(philox4x32([0; 4], [0; 2]), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let a: Vec<u32> = (0..10)
            .map({
                let mut r = Rng::new(7, 1);
                move |_| r.next_u32()
            })
            .collect();
        let b: Vec<u32> = (0..10)
            .map({
                let mut r = Rng::new(7, 1);
                move |_| r.next_u32()
            })
            .collect();
        let c: Vec<u32> = (0..10)
            .map({
                let mut r = Rng::new(7, 2);
                move |_| r.next_u32()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut r = Rng::at(7, 1, 2);
        assert_eq!(r.next_u32(), a[8]);
    }

    #[test]
    fn moments_are_right() {
        let mut r = Rng::new(1, 0);
        let n = 200_000;
        let (mut s, mut s2, mut u) = (0.0f64, 0.0f64, 0.0f64);
        for _ in 0..n {
            let x = r.normal() as f64;
            s += x;
            s2 += x * x;
            u += r.uniform() as f64;
        }
        assert!((s / n as f64).abs() < 0.01);
        assert!((s2 / n as f64 - 1.0).abs() < 0.02);
        assert!((u / n as f64 - 0.5).abs() < 0.005);
        let m: f64 = (0..20_000).map(|_| r.beta(0.75, 0.75)).sum::<f64>() / 20_000.0;
        assert!((m - 0.5).abs() < 0.01, "beta mean {m}");
    }
}
