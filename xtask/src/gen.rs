//! `cargo xtask gen`: a realistic, deterministic dataset in the bucket layout.
//!
//! N sensors × readings every `interval` over `days`, from `start`: a daily cycle per sensor
//! (own base, amplitude and phase), Gaussian-ish noise, rare spikes, and an occasional lasting level
//! shift. A configurable share of the messiness the data contract allows or rejects: timestamps
//! without offset (Berlin wall time) or with `+01:00`, decimal commas, duplicate keys (the later
//! line wins), and bad rows (not a number, not a UUID, a missing field). The same seed gives the
//! same bytes; the random generator is SplitMix64, written out here so that stays true forever.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};

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
}

/// SplitMix64: tiny, fast, and its sequence never changes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Approximately normal (sum of uniforms), mean 0, deviation 1.
    fn normal(&mut self) -> f64 {
        (0..12).map(|_| self.unit()).sum::<f64>() - 6.0
    }
}

struct Sensor {
    uuid: uuid::Uuid,
    base: f64,
    amplitude: f64,
    phase: f64,
    noise: f64,
    shift_at: i64,
    shift: f64,
}

pub fn generate(args: &GenArgs) -> Result<Generated> {
    let mut rng = Rng(args.seed);
    let steps = args.days * 86_400 / args.interval_secs;
    let sensors: Vec<Sensor> = (0..args.sensors)
        .map(|_| Sensor {
            uuid: uuid::Builder::from_random_bytes(
                [rng.next().to_le_bytes(), rng.next().to_le_bytes()]
                    .concat()
                    .try_into()
                    .expect("16 bytes"),
            )
            .into_uuid(),
            base: 15.0 + rng.unit() * 10.0,
            amplitude: 2.0 + rng.unit() * 6.0,
            phase: rng.unit() * std::f64::consts::TAU,
            noise: 0.1 + rng.unit() * 0.5,
            shift_at: (rng.unit() * steps as f64) as i64,
            shift: (rng.unit() - 0.5) * 8.0,
        })
        .collect();

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
    for step in 0..steps {
        let t = args.start + Duration::seconds(step * args.interval_secs);
        let day_fraction = (t.timestamp().rem_euclid(86_400)) as f64 / 86_400.0;
        for s in &sensors {
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
            if step >= s.shift_at {
                value += s.shift;
            }
            if rng.unit() < 0.001 {
                value += (rng.unit() - 0.3) * 40.0; // a spike
            }
            let value = (value * 1000.0).round() / 1000.0;
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
            if kind < m / 4.0 {
                // A bad row instead of this reading.
                let bad = match rng.next() % 3 {
                    0 => format!("{ts};{};n/a\n", s.uuid),
                    1 => format!("{ts};sensor-{};{value_text}\n", rng.next() % 100),
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
    Ok(out)
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
}
