//! What the `bench-*` binaries share: the release binary they time, the dataset, the database
//! switch, the median.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

/// The sensors of [`fleet_readings`]: 100 UUIDs `5e500000-0000-4000-8000-0000000000NN`.
pub fn fleet_sensor(i: usize) -> uuid::Uuid {
    fleet_sensor_of(i, 100)
}

/// Sensor `i % sensors` of a fleet of `sensors`.
pub fn fleet_sensor_of(i: usize, sensors: usize) -> uuid::Uuid {
    uuid::Uuid::from_u128(0x5e50_0000_0000_4000_8000_0000_0000_0000 + (i % sensors.max(1)) as u128)
}

/// `rows` clean UTC readings spread over 100 sensors at one-second steps from 2013-01-01,
/// starting at reading number `offset` (so files with disjoint offsets hold disjoint readings).
pub fn fleet_readings(offset: usize, rows: usize) -> String {
    fleet_readings_of(offset, rows, 100, 0.0)
}

/// [`fleet_readings`] over `sensors` sensors, with the share `naive` of the rows (spread evenly)
/// written without an offset in Berlin winter time (UTC+1: the readings stay in January 2013,
/// before daylight saving time, so every local time names one instant), as
/// `YYYY-MM-DD HH:MM:SS` — what the worker reads with `NAIVE_TIMEZONE=Europe/Berlin`, and
/// `psql` with `PGTZ=Europe/Berlin`.
pub fn fleet_readings_of(offset: usize, rows: usize, sensors: usize, naive: f64) -> String {
    fleet_readings_every(offset, rows, sensors, 1, naive)
}

/// [`fleet_readings_of`] with each sensor reading every `interval` seconds: the same number of
/// readings over a longer span, as fleets in the field read (a minute to hours apart). Naive
/// timestamps need the span to end before Berlin's summer time of 2013.
pub fn fleet_readings_every(
    offset: usize,
    rows: usize,
    sensors: usize,
    interval: i64,
    naive: f64,
) -> String {
    use std::fmt::Write as _;
    let sensors = sensors.max(1);
    let mut out = String::with_capacity(rows * 70);
    out.push_str("timestamp;sensor_uuid;sensor_value\n");
    let per_thousand = (naive.clamp(0.0, 1.0) * 1000.0).round() as usize;
    for r in 0..rows {
        let i = offset + r;
        let secs = crate::data::FIRST_READING + (i / sensors) as i64 * interval.max(1);
        let ts = chrono::DateTime::from_timestamp(secs, 0).expect("in range");
        assert!(
            naive == 0.0
                || ts < chrono::DateTime::from_timestamp(1_364_691_600, 0).expect("in range"),
            "naive Berlin winter time only holds before 2013-03-31T01:00:00Z"
        );
        let value = 20.0 + ((i * 7919) % 10_000) as f64 / 1000.0;
        let sensor = fleet_sensor_of(i, sensors);
        let _ = if (i * 7) % 1000 < per_thousand {
            let local = ts + chrono::Duration::hours(1);
            writeln!(
                out,
                "{};{sensor};{value}",
                local.format("%Y-%m-%d %H:%M:%S")
            )
        } else {
            writeln!(out, "{};{sensor};{value}", ts.format("%Y-%m-%dT%H:%M:%SZ"))
        };
    }
    out
}

/// File number `file` of a fleet that writes one file per device: `rows` clean UTC readings of
/// sensor [`fleet_sensor`]`(file)` at one-second steps, disjoint from every other file's.
pub fn device_readings(file: usize, rows: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(rows * 70);
    out.push_str("timestamp;sensor_uuid;sensor_value\n");
    let sensor = fleet_sensor(file);
    let first = crate::data::FIRST_READING + ((file / 100) * rows) as i64;
    for r in 0..rows {
        let ts = chrono::DateTime::from_timestamp(first + r as i64, 0).expect("in range");
        let value = 20.0 + ((file * 7919 + r) % 10_000) as f64 / 1000.0;
        let _ = writeln!(out, "{};{sensor};{value}", ts.format("%Y-%m-%dT%H:%M:%SZ"));
    }
    out
}

/// The absolute path of a binary to time, or what to build when it is missing.
pub fn binary(path: &Path, package: &str) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| {
        format!(
            "{} not found: cargo build --release -p {package}",
            path.display()
        )
    })
}

/// `vars` with both database URLs pointing at `db`.
pub fn with_database(vars: &[(String, String)], db: &str) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| match k.as_str() {
            "DATABASE_URL" | "TIMESCALE_DATABASE_URL" => (k.clone(), db.to_string()),
            _ => (k.clone(), v.clone()),
        })
        .collect()
}

/// The median (the upper one of an even count).
pub fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}
