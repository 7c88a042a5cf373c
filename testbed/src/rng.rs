//! SplitMix64, written out: the same numbers on every machine and in every version, so generated
//! data (`cargo xtask gen`, [`crate::kinds`]) and the detector's tests see the same series forever.

/// A SplitMix64 sequence from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [low, high).
    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// Approximately standard normal (the sum of twelve uniforms, less 6).
    pub fn normal(&mut self) -> f64 {
        (0..12).map(|_| self.unit()).sum::<f64>() - 6.0
    }

    /// Exponential with the given mean.
    pub fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// Poisson with the given rate (Knuth's method: for small rates).
    pub fn poisson(&mut self, rate: f64) -> f64 {
        let limit = (-rate).exp();
        let (mut k, mut p) = (0.0, self.unit());
        while p > limit {
            k += 1.0;
            p *= self.unit();
        }
        k
    }
}
