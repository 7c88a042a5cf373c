//! The anomaly bench in-process: labelled series (NAB's `timestamp,value` files and their windows)
//! and NAB's scoring rules (standard profile), so `bench-anomalies --loco` can score a detector
//! many times a second without a database or Python.
//!
//! The rules are the ones the bench's `score.py` applies (and NAB publishes): a labelled window is
//! worth +1 when its earliest alarm is at its left edge, less the later the alarm (a scaled
//! sigmoid), and −1 with no alarm; an alarm outside every window costs 0.11 (less just after a
//! window); alarms in the probation period (the first 15 % of a series, at most 750 readings) are
//! not scored. A category's score is `100 · (raw + n) / 2n` over its `n` windows: 0 never alarms,
//! 100 alarms once at the start of every window. Written again here (a hundred lines) rather than
//! calling `score.py` per grid point: the protocol scores dozens of settings, and the same
//! detections give the same figures as `score.py` (checked by `bench-anomalies`, which prints both).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

/// One labelled series.
pub struct Series {
    /// `category/file.csv`, as in `windows.json`.
    pub name: String,
    /// The folder it is in: NAB's category.
    pub category: String,
    /// Readings in time order: microseconds since the Unix epoch (UTC), value.
    pub readings: Vec<(i64, f64)>,
    /// Labelled windows, first and last timestamp (microseconds).
    pub windows: Vec<(i64, i64)>,
}

/// NAB's timestamps (`2014-02-19 00:22:00`, also with `T`, `Z` or fractional seconds, which NAB
/// ignores as `score.py` does), read as UTC microseconds.
pub fn parse_time(text: &str) -> Result<i64> {
    let text = text.trim().trim_end_matches('Z').replace('T', " ");
    let seconds = text.get(..19).unwrap_or(&text);
    let t = chrono::NaiveDateTime::parse_from_str(seconds, "%Y-%m-%d %H:%M:%S")
        .with_context(|| format!("timestamp {text:?}"))?;
    Ok(t.and_utc().timestamp_micros())
}

/// Every series `windows.json` names, in its order, with its readings from `data/`.
pub fn load(bench: &Path) -> Result<Vec<Series>> {
    let path = bench.join("windows.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path:?}"))?;
    let windows: BTreeMap<String, Vec<(String, String)>> = serde_json::from_str(&text)?;
    let mut series = Vec::with_capacity(windows.len());
    for (name, spans) in windows {
        let path = bench.join("data").join(&name);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path:?}"))?;
        let readings = text
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let (at, value) = line.split_once(',').context("timestamp,value")?;
                Ok((parse_time(at)?, value.trim().parse::<f64>()?))
            })
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("in {path:?}"))?;
        let windows = spans
            .iter()
            .map(|(a, b)| Ok((parse_time(a)?, parse_time(b)?)))
            .collect::<Result<Vec<_>>>()?;
        let category = name.split('/').next().unwrap_or_default().to_string();
        series.push(Series {
            name,
            category,
            readings,
            windows,
        });
    }
    Ok(series)
}

/// NAB's timestamp text for microseconds since the Unix epoch (UTC).
fn nab_time(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

/// Writes series as a bench folder [`load`] reads back: `data/<name>` (`timestamp,value`) and
/// `windows.json`.
pub fn export(series: &[Series], dir: &Path) -> Result<()> {
    let mut windows = BTreeMap::new();
    for s in series {
        let path = dir.join("data").join(&s.name);
        std::fs::create_dir_all(path.parent().context("a file in a folder")?)?;
        let mut text = String::from("timestamp,value\n");
        for &(at, value) in &s.readings {
            text.push_str(&format!("{},{value}\n", nab_time(at)));
        }
        std::fs::write(&path, text).with_context(|| format!("writing {path:?}"))?;
        let spans: Vec<(String, String)> = s
            .windows
            .iter()
            .map(|&(a, b)| (nab_time(a), nab_time(b)))
            .collect();
        windows.insert(s.name.clone(), spans);
    }
    std::fs::write(
        dir.join("windows.json"),
        serde_json::to_vec_pretty(&windows)?,
    )?;
    Ok(())
}

/// One series' or one category's result.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// NAB's raw score: window rewards, misses and false-alarm costs added up.
    pub raw: f64,
    pub windows: usize,
    pub hits: usize,
    pub false_alarms: usize,
}

impl Tally {
    pub fn add(&mut self, other: &Tally) {
        self.raw += other.raw;
        self.windows += other.windows;
        self.hits += other.hits;
        self.false_alarms += other.false_alarms;
    }

    /// The normalised score (0 = no alarm ever, 100 = perfect); none without windows.
    pub fn score(&self) -> Option<f64> {
        (self.windows > 0)
            .then(|| 100.0 * (self.raw + self.windows as f64) / (2.0 * self.windows as f64))
    }
}

/// NAB's scaled sigmoid.
fn sigmoid(x: f64) -> f64 {
    if x > 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * x).exp()) - 1.0
    }
}

/// Scores the alarms (times, any order) raised on one series.
pub fn score(series: &Series, alarms: &[i64]) -> Tally {
    let n = series.readings.len();
    // An alarm between readings counts at the next one.
    let index = |t: i64| series.readings.partition_point(|&(at, _)| at < t);
    let probation = (0.15 * n as f64).floor().min(750.0);
    let spans: Vec<(usize, usize)> = series
        .windows
        .iter()
        .map(|&(a, b)| (index(a), index(b)))
        .collect();
    let mut flagged: Vec<usize> = alarms
        .iter()
        .map(|&t| index(t))
        .filter(|&i| i < n)
        .collect();
    flagged.sort_unstable();
    flagged.dedup();
    // Windows that end in the probation period are not scored.
    let mut best: BTreeMap<usize, Option<f64>> = spans
        .iter()
        .enumerate()
        .filter(|(_, &(_, b))| b as f64 >= probation)
        .map(|(k, _)| (k, None))
        .collect();
    let mut tally = Tally::default();
    for i in flagged.into_iter().filter(|&i| i as f64 >= probation) {
        if let Some(k) = spans.iter().position(|&(a, b)| a <= i && i <= b) {
            let (a, b) = spans[k];
            let reward = sigmoid(-((b - i + 1) as f64) / ((b - a + 1) as f64)) / sigmoid(-1.0);
            if let Some(slot) = best.get_mut(&k) {
                *slot = Some(slot.map_or(reward, |r: f64| r.max(reward)));
            }
        } else {
            let cost = match spans.iter().rfind(|&&(_, b)| b < i) {
                None => -1.0,
                Some(&(a, b)) => sigmoid((i - b) as f64 / (b - a) as f64),
            };
            tally.raw += 0.11 * cost;
            tally.false_alarms += 1;
        }
    }
    tally.windows = best.len();
    tally.hits = best.values().filter(|r| r.is_some()).count();
    tally.raw += best.values().map(|r| r.unwrap_or(-1.0)).sum::<f64>();
    tally
}

/// Per-series tallies added up by category, and over everything under `"all"`.
pub fn by_category<'a>(series: &'a [Series], tallies: &[Tally]) -> BTreeMap<&'a str, Tally> {
    let mut out: BTreeMap<&str, Tally> = BTreeMap::new();
    for (s, t) in series.iter().zip(tallies) {
        out.entry(&s.category).or_default().add(t);
        out.entry("all").or_default().add(t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000_000;

    /// 1,000 readings a minute apart, one window over readings 500..=599.
    fn series() -> Series {
        Series {
            name: "c/f.csv".into(),
            category: "c".into(),
            readings: (0..1000).map(|i| (i * MINUTE, 0.0)).collect(),
            windows: vec![(500 * MINUTE, 599 * MINUTE)],
        }
    }

    #[test]
    fn nab_rules_score_hits_misses_and_false_alarms() {
        let s = series();
        // No alarm: the window is missed, score 0.
        assert_eq!(
            score(&s, &[]),
            Tally {
                raw: -1.0,
                windows: 1,
                hits: 0,
                false_alarms: 0
            }
        );
        assert_eq!(score(&s, &[]).score(), Some(0.0));
        // At the window's first reading: the whole reward.
        let first = score(&s, &[500 * MINUTE]);
        assert_eq!((first.hits, first.false_alarms), (1, 0));
        assert!((first.raw - 1.0).abs() < 1e-12, "{first:?}");
        // Later in the window is worth less; only the earliest alarm counts.
        let later = score(&s, &[550 * MINUTE, 590 * MINUTE]);
        let expected = sigmoid(-50.0 / 100.0) / sigmoid(-1.0);
        assert_eq!(later.raw, expected);
        // In the probation period (the first 150 readings): not scored at all.
        assert_eq!(score(&s, &[100 * MINUTE]), score(&s, &[]));
        // Before every window: a full false alarm; between readings: counted at the next one.
        let early = score(&s, &[300 * MINUTE + 1]);
        assert_eq!(
            early,
            Tally {
                raw: -1.0 - 0.11,
                windows: 1,
                hits: 0,
                false_alarms: 1
            }
        );
        // Just after a window: costs less.
        let after = score(&s, &[600 * MINUTE]);
        assert_eq!(after.raw, -1.0 + 0.11 * sigmoid(1.0 / 99.0));
        assert_eq!(after.false_alarms, 1);
    }
}
