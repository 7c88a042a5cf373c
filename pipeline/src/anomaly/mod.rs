//! Anomaly detection over one sensor's readings (SPEC §7) — method documented below once tuned.

mod detector;
mod window;

pub use detector::{Detector, WARM_UP_MICROS, WARM_UP_READINGS};

/// What kind of anomaly (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// One or a few readings far off the local level, then back.
    Spike,
    /// The level changes and stays.
    LevelShift,
    /// The same value for far longer than usual.
    Stuck,
    /// Readings stop for far longer than the usual interval.
    Gap,
}

impl Kind {
    /// Every kind, in the order they are documented.
    pub const ALL: [Kind; 4] = [Kind::Spike, Kind::LevelShift, Kind::Stuck, Kind::Gap];

    /// The name in output and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Spike => "spike",
            Kind::LevelShift => "level_shift",
            Kind::Stuck => "stuck",
            Kind::Gap => "gap",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Kind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown anomaly kind {s:?} (spike, level_shift, stuck, gap)"))
    }
}

/// One anomaly in one sensor's readings. Times are microseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    pub kind: Kind,
    /// The first reading of the anomaly (a gap: the last reading before the silence).
    pub start: i64,
    /// The last reading of the anomaly (a gap: the first reading after the silence).
    pub end: i64,
    /// The most extreme reading (a gap: none).
    pub value: Option<f64>,
    /// The local level the anomaly departs from (a gap: none).
    pub expected: Option<f64>,
    /// How unusual: comparable within one sensor, larger is more anomalous.
    pub score: f64,
}

/// Runs a detector over readings in time order; the anomalies sorted by start.
pub fn detect(readings: impl IntoIterator<Item = (i64, f64)>, sensitivity: f64) -> Vec<Anomaly> {
    let mut detector = Detector::new(sensitivity);
    let mut found = Vec::new();
    for (at, value) in readings {
        detector.push(at, value, &mut found);
    }
    detector.finish(&mut found);
    found.sort_by(|a, b| a.start.cmp(&b.start).then(a.kind.cmp(&b.kind)));
    found
}

#[cfg(test)]
mod tests;
