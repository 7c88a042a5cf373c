//! Labelled series of kinds of sensor the NAB bench does not hold, generated here: the second
//! yardstick of `bench-anomalies --loco --kinds`, so that a change to the detector is also judged
//! on data of other shapes than the bench it was developed on.
//!
//! Five kinds, six series each (four with anomalies, two without, each with its own seed, level
//! and scale): a CPU that saturates at a ceiling every few hours (`kindCeiling`), counts of events
//! with a daily rhythm (`kindCounts`), a demand with a daily and a weekly rhythm (`kindDemand`), a
//! temperature whose baseline drifts (`kindDrift`) and a road sensor read at irregular intervals,
//! with silences of up to an hour several times a day (`kindTraffic`). The anomalies are what an
//! operator of such a sensor would want to hear of: a job that never ends, a service that dies, a
//! weekday like a Sunday, a storm, an accident, a rate six times the usual, a count that stops.
//! Windows are NAB's: a tenth of the series shared among its anomalies, centred on each start.
//!
//! The random numbers are [`crate::rng::Rng`]'s: the same series on every machine, forever.

use crate::nab::Series;
use crate::rng::Rng;

const T0: i64 = 1_614_556_800_000_000; // 2021-03-01T00:00:00Z
const SECOND: i64 = 1_000_000;
const HOUR: f64 = 3600.0;
const DAY: f64 = 86_400.0;

/// One series from its offsets in seconds, values and the offsets at which anomalies start.
fn labelled(kind: &str, name: String, seconds: &[f64], values: &[f64], starts: &[f64]) -> Series {
    let at = |s: f64| T0 + (s * SECOND as f64).round() as i64;
    let n = seconds.len();
    let half = if starts.is_empty() {
        0
    } else {
        n / 10 / starts.len() / 2
    };
    let windows = starts
        .iter()
        .map(|&s| {
            let i = seconds.partition_point(|&x| x < s);
            (
                at(seconds[i.saturating_sub(half)]),
                at(seconds[(i + half).min(n - 1)]),
            )
        })
        .collect();
    Series {
        name: format!("{kind}/{name}.csv"),
        category: kind.to_string(),
        readings: seconds
            .iter()
            .zip(values)
            .map(|(&s, &v)| (at(s), v))
            .collect(),
        windows,
    }
}

/// Offsets of `n` readings every `step` seconds.
fn regular(n: usize, step: f64) -> Vec<f64> {
    (0..n).map(|i| i as f64 * step).collect()
}

fn bump(hour: f64, centre: f64, width: f64) -> f64 {
    (-((hour - centre) / width).powi(2)).exp()
}

/// A CPU at a base load with noise; every 2–6 hours a job drives it to the ceiling (100) for
/// 15–90 minutes. Anomalies: a job that runs 10 hours; the service dead (near 0) for 6 hours.
fn ceiling(r: &mut Rng, anomalous: bool) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = 40 * 288;
    let t = regular(n, 300.0);
    let base = r.uniform(15.0, 50.0);
    let noise = r.uniform(1.0, 5.0);
    let mut v: Vec<f64> = (0..n).map(|_| base + noise * r.normal()).collect();
    let mut k = 0;
    while k < n {
        k += r.uniform(24.0, 72.0) as usize;
        let d = r.uniform(3.0, 18.0) as usize;
        let high = base + r.uniform(55.0, 80.0);
        for x in v.iter_mut().skip(k).take(d) {
            *x = high + 3.0 * r.normal();
        }
        k += d;
    }
    let mut starts = Vec::new();
    if anomalous {
        let s = n * 45 / 100;
        for x in &mut v[s..s + 120] {
            *x = 100.0 + 3.0 * r.normal();
        }
        starts.push(t[s]);
        let s = n * 75 / 100;
        let dead = r.uniform(1.0, 3.0);
        for x in &mut v[s..s + 72] {
            *x = dead + 0.3 * r.normal();
        }
        starts.push(t[s]);
    }
    let v = v.into_iter().map(|x| x.clamp(0.0, 100.0)).collect();
    (t, v, starts)
}

/// Demand every 30 minutes over 200 days: a morning, a midday and an evening peak, weekends at
/// 60 %, 5 % noise. Anomalies: a weekday like a weekend (a holiday), a storm (a quarter of the
/// demand for 8 hours), a busy night, a morning without its peak.
fn demand(r: &mut Rng, anomalous: bool) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = 200 * 48;
    let t = regular(n, 1800.0);
    let first_day = (r.unit() * 7.0) as usize;
    let scale = r.uniform(500.0, 30_000.0);
    let profile = |i: usize| {
        let hour = (t[i] % DAY) / HOUR;
        0.3 + 0.5 * bump(hour, 8.5, 1.5) + 0.9 * bump(hour, 18.5, 2.5) + 0.3 * bump(hour, 13.0, 3.0)
    };
    let weekend = |i: usize| (i / 48 + first_day) % 7 >= 5;
    let mut v: Vec<f64> = (0..n)
        .map(|i| {
            let week = if weekend(i) { 0.6 } else { 1.0 };
            scale * profile(i) * week * (1.0 + 0.05 * r.normal())
        })
        .collect();
    let mut starts = Vec::new();
    if anomalous {
        // Each on a weekday (the first weekday from the given day on).
        let weekday = |mut day: usize| {
            while weekend(day * 48) {
                day += 1;
            }
            day * 48
        };
        let s = weekday(60);
        for (i, x) in v.iter_mut().enumerate().skip(s).take(48) {
            *x = scale * profile(i) * 0.6 * (1.0 + 0.05 * r.normal());
        }
        starts.push(t[s + 14]);
        let s = weekday(95) + 20;
        for x in &mut v[s..s + 16] {
            *x *= 0.25;
        }
        starts.push(t[s]);
        let s = weekday(130) + 2;
        for x in &mut v[s..s + 8] {
            *x = scale * 1.1 * (1.0 + 0.05 * r.normal());
        }
        starts.push(t[s]);
        let s = weekday(170) + 12;
        for (i, x) in v.iter_mut().enumerate().skip(s).take(10) {
            *x = scale * profile(i) * 0.45;
        }
        starts.push(t[s]);
    }
    (t, v, starts)
}

/// A temperature every 5 minutes over 60 days: a slowly wandering baseline, a small daily swing,
/// noise. Anomalies: a drop of 12 degrees over two hours, held for ten (a cooling failure); a
/// rise of 6 over 17 hours with three times the noise (a bearing wearing out).
fn drift(r: &mut Rng, anomalous: bool) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = 60 * 288;
    let t = regular(n, 300.0);
    let mut walk = Vec::with_capacity(n);
    let mut level = 0.0;
    for _ in 0..n {
        level += 0.02 * r.normal();
        walk.push(level);
    }
    let end = level;
    let base = r.uniform(60.0, 90.0);
    let mut v: Vec<f64> = (0..n)
        .map(|i| {
            let wander = walk[i] - end * i as f64 / (n - 1) as f64;
            base + wander + 1.5 * (std::f64::consts::TAU * t[i] / DAY).sin() + 0.4 * r.normal()
        })
        .collect();
    let mut starts = Vec::new();
    if anomalous {
        let s = n * 4 / 10;
        for k in 0..168 {
            let drop = if k < 24 {
                -12.0 * k as f64 / 23.0
            } else if k < 144 {
                -12.0
            } else {
                -12.0 * (167 - k) as f64 / 23.0
            };
            v[s + k] += drop;
        }
        starts.push(t[s]);
        let s = n * 8 / 10;
        for k in 0..300 {
            v[s + k] += 6.0 * (k as f64 / 199.0).min(1.0) + 1.5 * r.normal();
        }
        starts.push(t[s]);
    }
    (t, v, starts)
}

/// A road's speed over 30 days, read every 1–15 minutes (5 on average) with a silence of 20–60
/// minutes now and then (1 % of the intervals); rush hours slow weekday traffic. Anomalies: an
/// accident (10–20 km/h for 90 minutes at midday), a night of roadworks (70 % of the speed for 6
/// hours).
fn traffic(r: &mut Rng, anomalous: bool) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let mut t = Vec::new();
    let mut s = 0.0;
    loop {
        s += r.exponential(300.0) + 60.0;
        if r.unit() < 0.01 {
            s += r.uniform(1200.0, 3600.0);
        }
        if s >= 30.0 * DAY {
            break;
        }
        t.push(s);
    }
    let free = r.uniform(55.0, 70.0);
    let mut v: Vec<f64> = t
        .iter()
        .map(|&s| {
            let hour = (s % DAY) / HOUR;
            let weekday = (s / DAY) as usize % 7 < 5;
            let rush = if weekday {
                25.0 * bump(hour, 8.0, 1.0) + 20.0 * bump(hour, 17.5, 1.2)
            } else {
                0.0
            };
            free - rush + 3.0 * r.normal()
        })
        .collect();
    let mut starts = Vec::new();
    if anomalous {
        let span =
            |from: f64, to: f64| t.partition_point(|&x| x < from)..t.partition_point(|&x| x < to);
        let accident = span(12.0 * DAY + 11.0 * HOUR, 12.0 * DAY + 12.5 * HOUR);
        let crawl = r.uniform(10.0, 20.0);
        starts.push(t[accident.start]);
        for x in &mut v[accident] {
            *x = crawl + 2.0 * r.normal();
        }
        let works = span(22.0 * DAY + 2.0 * HOUR, 22.0 * DAY + 8.0 * HOUR);
        starts.push(t[works.start]);
        for x in &mut v[works] {
            *x *= 0.7;
        }
    }
    let v = v.into_iter().map(|x| x.max(0.0)).collect();
    (t, v, starts)
}

/// Events counted every 5 minutes over 50 days, at a rate with a daily rhythm (0.5–9 an
/// interval). Anomalies: six times the rate for two hours; no events at all for a day.
fn counts(r: &mut Rng, anomalous: bool) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let n = 50 * 288;
    let t = regular(n, 300.0);
    let rate = r.uniform(0.5, 3.0);
    let mut rates: Vec<f64> = t
        .iter()
        .map(|&s| rate * (1.0 + 2.0 * bump((s % DAY) / HOUR, 14.0, 4.0)))
        .collect();
    let mut starts = Vec::new();
    if anomalous {
        let s = n / 2;
        for x in &mut rates[s..s + 24] {
            *x *= 6.0;
        }
        starts.push(t[s]);
        let s = n * 8 / 10;
        for x in &mut rates[s..s + 288] {
            *x = 0.0;
        }
        starts.push(t[s]);
    }
    let v = rates.iter().map(|&x| r.poisson(x)).collect();
    (t, v, starts)
}

type Generator = fn(&mut Rng, bool) -> (Vec<f64>, Vec<f64>, Vec<f64>);

/// Every series, by kind: seeds 0 to 3 with anomalies, 4 and 5 without.
pub fn all() -> Vec<Series> {
    let kinds: [(&str, &str, Generator); 5] = [
        ("kindCeiling", "cpu", ceiling),
        ("kindCounts", "counts", counts),
        ("kindDemand", "demand", demand),
        ("kindDrift", "temperature", drift),
        ("kindTraffic", "speed", traffic),
    ];
    let mut out = Vec::new();
    for (k, (kind, name, generate)) in kinds.into_iter().enumerate() {
        for seed in 0..6u64 {
            let mut r = Rng(1_000 * k as u64 + seed);
            let (t, v, starts) = generate(&mut r, seed < 4);
            out.push(labelled(kind, format!("{name}_{seed}"), &t, &v, &starts));
        }
    }
    out
}
