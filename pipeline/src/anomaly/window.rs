//! Bounded rolling windows the detector keeps: a ring of the last N values, and a ring that also
//! keeps its values sorted (median and any order statistic in O(1), an update in O(log N) plus a
//! move of at most N values — N is at most a few dozen here, so that move is one cache line or two).

/// The last `capacity` values, oldest first.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(into = "Stored<T>", try_from = "Stored<T>")]
#[serde(bound(
    serialize = "T: Copy + serde::Serialize",
    deserialize = "T: Copy + serde::de::DeserializeOwned"
))]
pub(crate) struct Ring<T> {
    values: Vec<T>,
    next: usize,
    capacity: usize,
}

impl<T: Copy> Ring<T> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            values: Vec::with_capacity(capacity),
            next: 0,
            capacity,
        }
    }

    /// Adds a value; returns the one it pushed out, if the ring was full.
    pub(crate) fn push(&mut self, value: T) -> Option<T> {
        if self.values.len() < self.capacity {
            self.values.push(value);
            None
        } else {
            let old = std::mem::replace(&mut self.values[self.next], value);
            self.next = (self.next + 1) % self.capacity;
            Some(old)
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.values.len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn is_full(&self) -> bool {
        self.values.len() == self.capacity
    }

    /// The `i`-th oldest value.
    pub(crate) fn get(&self, i: usize) -> T {
        if self.values.len() < self.capacity {
            self.values[i]
        } else {
            self.values[(self.next + i) % self.capacity]
        }
    }

    /// The `k`-th newest value (k = 1: the last pushed), if there are that many.
    pub(crate) fn recent(&self, k: usize) -> Option<T> {
        (k >= 1 && k <= self.len()).then(|| self.get(self.len() - k))
    }

    pub(crate) fn clear(&mut self) {
        self.values.clear();
        self.next = 0;
    }
}

/// A ring as the detector's state stores it: its capacity and its values, oldest first.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Stored<T> {
    capacity: u32,
    values: Vec<T>,
}

impl<T: Copy> From<Ring<T>> for Stored<T> {
    fn from(r: Ring<T>) -> Self {
        Self {
            capacity: r.capacity as u32,
            values: (0..r.len()).map(|i| r.get(i)).collect(),
        }
    }
}

impl<T: Copy> TryFrom<Stored<T>> for Ring<T> {
    type Error = &'static str;
    fn try_from(s: Stored<T>) -> Result<Self, Self::Error> {
        let capacity = s.capacity as usize;
        if capacity == 0 || s.values.len() > capacity {
            return Err("a ring holds more values than its capacity");
        }
        let mut r = Ring::new(capacity);
        for v in s.values {
            r.push(v);
        }
        Ok(r)
    }
}

impl From<SortedRing> for Ring<f64> {
    fn from(s: SortedRing) -> Self {
        s.ring
    }
}

impl From<Ring<f64>> for SortedRing {
    fn from(ring: Ring<f64>) -> Self {
        let mut s = SortedRing::new(ring.capacity);
        for i in 0..ring.len() {
            s.push(ring.get(i));
        }
        s
    }
}

/// The last `capacity` values, also kept in sorted order.
/// Stored as its ring (the sorted order is rebuilt when it is read).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(into = "Ring<f64>", from = "Ring<f64>")]
pub(crate) struct SortedRing {
    ring: Ring<f64>,
    sorted: Vec<f64>,
}

impl SortedRing {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            ring: Ring::new(capacity),
            sorted: Vec::with_capacity(capacity),
        }
    }

    /// Adds a value; returns the one it pushed out, if the ring was full. When full, only the
    /// values between the old one's place and the new one's move, by one: a sensor's next
    /// interval is mostly its last, and its next residual is near the one it replaces more
    /// often than not (a removal and an insertion moved half the window each — with the
    /// binary searches, a third of the worker's CPU when ingesting with detection on).
    pub(crate) fn push(&mut self, value: f64) -> Option<f64> {
        let old = self.ring.push(value);
        let to = self.sorted.partition_point(|x| x.total_cmp(&value).is_lt());
        match old {
            None => self.sorted.insert(to, value),
            Some(old) => {
                let from = self.sorted.partition_point(|x| x.total_cmp(&old).is_lt());
                if to <= from {
                    self.sorted.copy_within(to..from, to + 1);
                    self.sorted[to] = value;
                } else {
                    self.sorted.copy_within(from + 1..to, from);
                    self.sorted[to - 1] = value;
                }
            }
        }
        old
    }

    pub(crate) fn len(&self) -> usize {
        self.ring.len()
    }

    /// The `i`-th oldest value held.
    pub(crate) fn get(&self, i: usize) -> f64 {
        self.ring.get(i)
    }

    pub(crate) fn capacity(&self) -> usize {
        self.ring.capacity
    }

    pub(crate) fn is_full(&self) -> bool {
        self.ring.is_full()
    }

    /// The median (the mean of the two middle values for an even count); NaN when empty.
    pub(crate) fn median(&self) -> f64 {
        median_of_sorted(&self.sorted)
    }

    /// The `k`-th largest value (k = 1: the maximum), or the smallest when fewer are held.
    pub(crate) fn largest(&self, k: usize) -> f64 {
        let n = self.sorted.len();
        if n == 0 {
            f64::NAN
        } else {
            self.sorted[n.saturating_sub(k)]
        }
    }

    /// The smallest value; NaN when empty.
    pub(crate) fn smallest(&self) -> f64 {
        self.sorted.first().copied().unwrap_or(f64::NAN)
    }

    pub(crate) fn clear(&mut self) {
        self.ring.clear();
        self.sorted.clear();
    }
}

/// The median of sorted values; NaN when there are none.
pub(crate) fn median_of_sorted(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The median of values in any order (they are reordered).
pub(crate) fn median_in_place(values: &mut [f64]) -> f64 {
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    let (_, upper, _) = values.select_nth_unstable_by(n / 2, f64::total_cmp);
    let upper = *upper;
    if n % 2 == 1 {
        upper
    } else {
        let lower = values[..n / 2]
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        (lower + upper) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sorted_ring_keeps_the_last_values_in_order() {
        let mut r = SortedRing::new(3);
        assert!(r.median().is_nan());
        assert_eq!(r.push(5.0), None);
        assert_eq!(r.push(1.0), None);
        assert_eq!(r.median(), 3.0);
        assert_eq!(r.push(3.0), None);
        assert_eq!(r.median(), 3.0);
        assert_eq!(r.push(10.0), Some(5.0));
        assert_eq!(r.sorted, vec![1.0, 3.0, 10.0]);
        assert_eq!(r.largest(1), 10.0);
        assert_eq!(r.largest(2), 3.0);
        assert_eq!(r.largest(9), 1.0);
    }

    #[test]
    fn a_sorted_ring_holds_its_values_sorted_whatever_is_pushed_out() {
        // Repeated values, signed zeros, infinities and NaN, in a pseudo-random order.
        let pool = [
            3.0,
            -1.5,
            0.0,
            -0.0,
            7.25,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NAN,
            3.0,
            1e-300,
        ];
        for capacity in [1, 2, 5, 16] {
            let mut r = SortedRing::new(capacity);
            let mut seed = 0x2545_f491_4f6c_dd1d_u64;
            for _ in 0..2_000 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let value = pool[(seed % pool.len() as u64) as usize] * (1 + seed % 3) as f64;
                r.push(value);
                let mut want: Vec<f64> = (0..r.len()).map(|i| r.ring.get(i)).collect();
                want.sort_by(f64::total_cmp);
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&r.sorted), bits(&want));
            }
        }
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median_in_place(&mut [4.0, 1.0, 3.0]), 3.0);
        assert_eq!(median_in_place(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median_in_place(&mut []).is_nan());
        let mut ring = Ring::new(2);
        ring.push(1);
        ring.push(2);
        assert_eq!(ring.push(3), Some(1));
        assert_eq!((ring.get(0), ring.get(1)), (2, 3));
        assert_eq!(
            (ring.recent(1), ring.recent(2), ring.recent(3)),
            (Some(3), Some(2), None)
        );
    }
}
