//! `cargo xtask gen`: a realistic, deterministic dataset in the bucket layout.
//!
//! N sensors × readings every `interval` over `days`, from `start`: a daily cycle per sensor
//! (own base, amplitude and phase) and Gaussian-ish noise, with anomalies injected on a schedule
//! of nine-day slots from day 4 — a spike in each slot, and in the first three slots a lasting
//! level shift, a stuck stretch (one value repeated for 6 hours) and a gap (12 hours without
//! readings), each on its own day. What was injected is written to `anomalies.json` beside the
//! objects (sensor, kind, start, end: what `query-cli anomalies` should find). A configurable share of the messiness the data contract allows or rejects: timestamps
//! without offset (Berlin wall time) or with `+01:00`, decimal commas, duplicate keys (the later
//! line wins), and bad rows (not a number, not a UUID, a missing field). The same seed gives the
//! same bytes; the random generator is SplitMix64 (`testbed::rng`), written out so that stays true
//! forever.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use testbed::rng::Rng;

#[derive(Debug, Clone, clap::Args)]
pub struct GenArgs {
    /// Folder to write the bucket layout into (`mapping/`, `timeseries/`).
    #[arg(long, default_value = ".demo/data")]
    pub out: PathBuf,
    /// Number of sensors (named sensor_00001, sensor_00002, …).
    #[arg(long, default_value_t = 10)]
    pub sensors: usize,
    /// First instant (UTC).
    #[arg(long, default_value = "2012-12-01T00:00:00Z")]
    pub start: DateTime<Utc>,
    /// Days of readings.
    #[arg(long, default_value_t = 90)]
    pub days: i64,
    /// Seconds between two readings of a sensor.
    #[arg(long, default_value_t = 300)]
    pub interval_secs: i64,
    /// Lines per measurement file.
    #[arg(long, default_value_t = 50_000)]
    pub rows_per_file: usize,
    /// Write `.csv.gz` instead of `.csv`.
    #[arg(long)]
    pub gzip: bool,
    /// Share of rows with each kind of messiness (0 for clean files).
    #[arg(long, default_value_t = 0.01)]
    pub mess: f64,
    /// Seed: the same seed gives the same files.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// What was generated.
#[derive(Debug, Default)]
pub struct Generated {
    /// (key, path) of every file, mapping first.
    pub files: Vec<(String, PathBuf)>,
    pub readings: u64,
    pub duplicates: u64,
    pub bad_rows: u64,
    /// `anomalies.json`: what was injected.
    pub truth: Option<PathBuf>,
}

struct Sensor {
    uuid: uuid::Uuid,
    base: f64,
    amplitude: f64,
    phase: f64,
    noise: f64,
    plan: Plan,
}

/// The anomalies injected into one sensor's readings, in steps (reading numbers).
#[derive(Debug, Default)]
struct Plan {
    /// (step, amount added).
    spikes: Vec<(i64, f64)>,
    /// (first step at the new level, amount added from there on).
    shift: Option<(i64, f64)>,
    /// (first step, steps) repeating the first step's value.
    stuck: Option<(i64, i64)>,
    /// (first missing step, steps missing).
    gap: Option<(i64, i64)>,
}

impl Plan {
    fn new(rng: &mut Rng, steps: i64, interval_secs: i64, amplitude: f64, noise: f64) -> Self {
        let per_day = (86_400 / interval_secs).max(1);
        let at = |rng: &mut Rng, day: i64| {
            day * per_day + ((2.0 + rng.unit() * 18.0) / 24.0 * per_day as f64) as i64
        };
        let mut plan = Plan::default();
        let mut slot = 0;
        while 4 + 9 * slot + 9 <= steps / per_day {
            let first = 4 + 9 * slot;
            let up = rng.unit() < 0.7;
            let size = amplitude + 6.0 + rng.unit() * 10.0;
            let spike_day = first + (rng.unit() * 3.0) as i64;
            plan.spikes
                .push((at(rng, spike_day), if up { size } else { -size }));
            let other_day = first + 5 + (rng.unit() * 2.0) as i64;
            let other = at(rng, other_day);
            match slot {
                0 => {
                    let size = 3.0 + 12.0 * noise + rng.unit() * 2.0;
                    plan.shift = Some((other, if rng.unit() < 0.5 { size } else { -size }));
                }
                1 => plan.stuck = Some((other, (21_600 / interval_secs).max(24))),
                2 => plan.gap = Some((other, (43_200 / interval_secs).max(40))),
                _ => {}
            }
            slot += 1;
        }
        plan
    }

    fn missing(&self, step: i64) -> bool {
        self.gap.is_some_and(|(g, n)| step >= g && step < g + n)
    }

    fn stuck(&self, step: i64) -> Option<i64> {
        self.stuck
            .filter(|&(s, n)| step >= s && step < s + n)
            .map(|(s, _)| s)
    }

    /// Whether the reading at `step` must be written as a clean reading (it is part of an
    /// anomaly or borders one), never replaced by a bad row.
    fn keep(&self, step: i64) -> bool {
        self.spikes.iter().any(|&(s, _)| s == step)
            || self.shift.is_some_and(|(s, _)| s == step)
            || self.stuck(step).is_some()
            || self
                .gap
                .is_some_and(|(g, n)| step == g - 1 || step == g + n)
    }
}

pub fn generate(args: &GenArgs) -> Result<Generated> {
    let mut rng = Rng(args.seed);
    let steps = args.days * 86_400 / args.interval_secs;
    let sensors: Vec<Sensor> = (0..args.sensors)
        .map(|_| Sensor {
            uuid: uuid::Builder::from_random_bytes(
                [rng.next_u64().to_le_bytes(), rng.next_u64().to_le_bytes()]
                    .concat()
                    .try_into()
                    .expect("16 bytes"),
            )
            .into_uuid(),
            base: 15.0 + rng.unit() * 10.0,
            amplitude: 2.0 + rng.unit() * 6.0,
            phase: rng.unit() * std::f64::consts::TAU,
            noise: 0.1 + rng.unit() * 0.5,
            plan: Plan::default(),
        })
        .collect();
    let mut sensors = sensors;
    for s in &mut sensors {
        s.plan = Plan::new(&mut rng, steps, args.interval_secs, s.amplitude, s.noise);
    }

    if args.out.exists() {
        std::fs::remove_dir_all(&args.out)
            .with_context(|| format!("clearing {}", args.out.display()))?;
    }
    let mut out = Generated::default();
    let mapping = args.out.join("mapping/sensors.csv");
    std::fs::create_dir_all(mapping.parent().expect("has a parent"))?;
    let mut text = String::from("sensor_uuid;sensor_name\n");
    for (i, s) in sensors.iter().enumerate() {
        text.push_str(&format!("{};sensor_{:05}\n", s.uuid, i + 1));
    }
    std::fs::write(&mapping, text)?;
    out.files.push(("mapping/sensors.csv".into(), mapping));

    let berlin = chrono_tz::Europe::Berlin;
    let mut writer: Option<FileWriter> = None;
    let mut lines_in_file = 0;
    let mut file_no = 0;
    let mut previous: Option<String> = None;
    let mut stuck_values: Vec<Option<f64>> = vec![None; sensors.len()];
    for step in 0..steps {
        let t = args.start + Duration::seconds(step * args.interval_secs);
        let day_fraction = (t.timestamp().rem_euclid(86_400)) as f64 / 86_400.0;
        for (n, s) in sensors.iter().enumerate() {
            if s.plan.missing(step) {
                continue;
            }
            if writer.is_none() || lines_in_file >= args.rows_per_file {
                if let Some(w) = writer.take() {
                    w.finish()?;
                }
                let suffix = if args.gzip { "csv.gz" } else { "csv" };
                let key = format!(
                    "timeseries/{}/{:02}/part-{file_no:04}.{suffix}",
                    t.year(),
                    t.month()
                );
                let path = args.out.join(&key);
                writer = Some(FileWriter::create(&path, args.gzip)?);
                out.files.push((key, path));
                file_no += 1;
                lines_in_file = 0;
            }
            let w = writer.as_mut().expect("open");
            let mut value = s.base
                + s.amplitude * (std::f64::consts::TAU * day_fraction + s.phase).sin()
                + s.noise * rng.normal();
            if let Some((at, shift)) = s.plan.shift {
                if step >= at {
                    value += shift;
                }
            }
            if let Some(&(_, spike)) = s.plan.spikes.iter().find(|&&(at, _)| at == step) {
                value += spike;
            }
            let mut value = (value * 1000.0).round() / 1000.0;
            if s.plan.stuck(step).is_some() {
                value = *stuck_values[n].get_or_insert(value);
            }
            let r = rng.unit();
            let m = args.mess;
            let ts = if r < m {
                // Wall time in Berlin, unless that hour is ambiguous (it would mean another instant).
                let local = t.with_timezone(&berlin).naive_local();
                match berlin.from_local_datetime(&local) {
                    chrono::LocalResult::Single(_) => local.format("%Y-%m-%d %H:%M:%S").to_string(),
                    _ => t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
                }
            } else if r < 2.0 * m {
                (t + Duration::hours(1))
                    .format("%Y-%m-%dT%H:%M:%S+01:00")
                    .to_string()
            } else {
                t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
            };
            let value_text = if rng.unit() < m {
                value.to_string().replace('.', ",")
            } else {
                value.to_string()
            };
            let line = format!("{ts};{};{value_text}\n", s.uuid);
            let kind = rng.unit();
            if kind < m / 4.0 && !s.plan.keep(step) {
                // A bad row instead of this reading.
                let bad = match rng.next_u64() % 3 {
                    0 => format!("{ts};{};n/a\n", s.uuid),
                    1 => format!("{ts};sensor-{};{value_text}\n", rng.next_u64() % 100),
                    _ => format!("{ts};{}\n", s.uuid),
                };
                w.write(bad.as_bytes())?;
                out.bad_rows += 1;
            } else {
                w.write(line.as_bytes())?;
                out.readings += 1;
            }
            lines_in_file += 1;
            if kind > 1.0 - m / 4.0 {
                if let Some(p) = &previous {
                    // A repeated line: the same key again (same value; the later line wins).
                    w.write(p.as_bytes())?;
                    out.duplicates += 1;
                    lines_in_file += 1;
                }
            }
            previous = Some(line);
        }
    }
    if let Some(w) = writer.take() {
        w.finish()?;
    }
    let truth = args.out.join("anomalies.json");
    std::fs::write(&truth, truth_json(&sensors, args))?;
    out.truth = Some(truth);
    Ok(out)
}

/// `anomalies.json`: one object per injected anomaly, by sensor then start.
fn truth_json(sensors: &[Sensor], args: &GenArgs) -> String {
    let at = |step: i64| {
        (args.start + Duration::seconds(step * args.interval_secs))
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    };
    let mut lines = Vec::new();
    for (i, s) in sensors.iter().enumerate() {
        let mut found: Vec<(i64, &str, i64)> = Vec::new();
        found.extend(s.plan.spikes.iter().map(|&(at, _)| (at, "spike", at)));
        found.extend(s.plan.shift.map(|(at, _)| (at, "level_shift", at)));
        found.extend(s.plan.stuck.map(|(at, n)| (at, "stuck", at + n - 1)));
        found.extend(s.plan.gap.map(|(at, n)| (at - 1, "gap", at + n)));
        found.sort();
        for (start, kind, end) in found {
            lines.push(format!(
                "  {{\"sensor\": \"sensor_{:05}\", \"sensor_uuid\": \"{}\", \"kind\": \"{kind}\", \"start\": \"{}\", \"end\": \"{}\"}}",
                i + 1,
                s.uuid,
                at(start),
                at(end)
            ));
        }
    }
    format!("[\n{}\n]\n", lines.join(",\n"))
}

/// A measurement file being written, plain or gzip, with its header.
struct FileWriter {
    inner: Box<dyn Write>,
}

impl FileWriter {
    fn create(path: &Path, gzip: bool) -> Result<Self> {
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        let file = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut inner: Box<dyn Write> = if gzip {
            Box::new(flate2::write::GzEncoder::new(
                file,
                flate2::Compression::fast(),
            ))
        } else {
            Box::new(file)
        };
        inner.write_all(b"timestamp;sensor_uuid;sensor_value\n")?;
        Ok(Self { inner })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        Ok(self.inner.write_all(bytes)?)
    }

    fn finish(mut self) -> Result<()> {
        Ok(self.inner.flush()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(out: &Path, seed: u64, gzip: bool) -> GenArgs {
        GenArgs {
            out: out.to_path_buf(),
            sensors: 3,
            start: "2013-03-30T00:00:00Z".parse().unwrap(),
            days: 2,
            interval_secs: 600,
            rows_per_file: 300,
            gzip,
            mess: 0.05,
            seed,
        }
    }

    fn contents(g: &Generated) -> Vec<(String, Vec<u8>)> {
        g.files
            .iter()
            .map(|(k, p)| (k.clone(), std::fs::read(p).unwrap()))
            .collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_bytes() {
        let dir = std::env::temp_dir().join(format!("xtask-gen-{}", std::process::id()));
        let a = contents(&generate(&args(&dir.join("a"), 7, false)).unwrap());
        let b = contents(&generate(&args(&dir.join("b"), 7, false)).unwrap());
        let c = contents(&generate(&args(&dir.join("c"), 8, false)).unwrap());
        let z = generate(&args(&dir.join("z"), 7, true)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        // 3 sensors × 2 days × 144 readings, over files of 300 lines, plus the mapping.
        assert_eq!(a.len(), 1 + 3);
        assert_eq!(a[0].0, "mapping/sensors.csv");
        assert!(z.files[1].0.ends_with(".csv.gz"));
        let text = String::from_utf8(a[1].1.clone()).unwrap();
        assert!(text.starts_with("timestamp;sensor_uuid;sensor_value\n"));
        // Some messiness made it in: decimal commas and naive timestamps.
        let all: String = a[1..]
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert!(all
            .lines()
            .any(|l| l.rsplit(';').next().unwrap().contains(',')));
        assert!(all.lines().any(|l| l.len() > 19 && &l[10..11] == " "));
    }

    /// Every reading in the generated files, per sensor in time order (later lines win, bad rows
    /// and the mapping skipped), read the way the data contract reads them.
    fn readings_of(g: &Generated) -> std::collections::BTreeMap<String, Vec<(i64, f64)>> {
        use sensor_pipeline::contract::{number::parse_decimal, timestamp::parse_datetime};
        let mut all: std::collections::BTreeMap<String, std::collections::BTreeMap<i64, f64>> =
            Default::default();
        for (key, path) in g.files.iter().filter(|(k, _)| k.starts_with("timeseries/")) {
            assert!(key.ends_with(".csv"));
            for line in std::fs::read_to_string(path).unwrap().lines().skip(1) {
                let f: Vec<&str> = line.split(';').collect();
                if f.len() != 3 || uuid::Uuid::parse_str(f[1]).is_err() {
                    continue;
                }
                let (Ok(ts), Ok(v)) = (
                    parse_datetime(f[0].as_bytes()),
                    parse_decimal(f[2].as_bytes()),
                ) else {
                    continue;
                };
                let at = ts.resolve(chrono_tz::Europe::Berlin).unwrap();
                all.entry(f[1].to_string()).or_default().insert(at, v);
            }
        }
        all.into_iter()
            .map(|(k, v)| (k, v.into_iter().collect()))
            .collect()
    }

    #[test]
    fn the_detector_finds_what_was_injected() {
        let dir = std::env::temp_dir().join(format!("xtask-truth-{}", std::process::id()));
        let g = generate(&GenArgs {
            out: dir.clone(),
            sensors: 12,
            start: "2013-01-01T00:00:00Z".parse().unwrap(),
            days: 60,
            interval_secs: 300,
            rows_per_file: 50_000,
            gzip: false,
            mess: 0.01,
            seed: 42,
        })
        .unwrap();
        let truth: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(g.truth.as_ref().unwrap()).unwrap())
                .unwrap();
        let readings = readings_of(&g);
        std::fs::remove_dir_all(&dir).unwrap();
        let micros = |s: &str| s.parse::<DateTime<Utc>>().unwrap().timestamp_micros();
        let mut per_kind: std::collections::BTreeMap<&str, (usize, usize, usize)> =
            Default::default(); // kind -> (truth, found, matched)
        let mut unmatched = Vec::new();
        for (sensor, series) in &readings {
            let found = sensor_pipeline::anomaly::detect(series.iter().copied(), 1.0);
            let expected: Vec<&serde_json::Value> = truth
                .iter()
                .filter(|t| t["sensor_uuid"] == sensor.as_str())
                .collect();
            for t in &expected {
                per_kind.entry(t["kind"].as_str().unwrap()).or_default().0 += 1;
            }
            // Each injected anomaly is matched by one detection at most.
            let mut used = vec![false; expected.len()];
            for a in &found {
                let e = per_kind.entry(a.kind.as_str()).or_default();
                e.1 += 1;
                let hit = expected.iter().enumerate().position(|(i, t)| {
                    !used[i]
                        && t["kind"] == a.kind.as_str()
                        && (micros(t["start"].as_str().unwrap()) - a.start).abs() <= 600_000_000
                });
                match hit {
                    Some(i) => {
                        used[i] = true;
                        e.2 += 1;
                    }
                    None => unmatched.push(format!("{sensor} {a:?}")),
                }
            }
        }
        for (kind, (truth, found, matched)) in &per_kind {
            let precision = *matched as f64 / (*found).max(1) as f64;
            let recall = *matched as f64 / (*truth).max(1) as f64;
            eprintln!("{kind}: truth {truth}, found {found}, matched {matched}: precision {precision:.3}, recall {recall:.3}");
        }
        eprintln!("unmatched detections: {unmatched:#?}");
        // Precision and recall 1.0 for every kind: (truth, found, matched).
        assert_eq!(
            per_kind.into_iter().collect::<Vec<_>>(),
            [
                ("gap", (12, 12, 12)),
                ("level_shift", (12, 12, 12)),
                ("spike", (72, 72, 72)),
                ("stuck", (12, 12, 12))
            ]
        );
    }
}
