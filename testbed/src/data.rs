//! Measurement files for tests and benchmarks.

use std::fmt::Write as _;

/// 2013-01-01T00:00:00Z, where generated readings start.
pub const FIRST_READING: i64 = 1_356_998_400;

/// A measurement file of `rows` readings of `sensor`, one a second from [`FIRST_READING`], every
/// one with `value`.
pub fn steady_readings(sensor: &str, rows: usize, value: f64) -> String {
    let mut s = String::with_capacity(rows * 70);
    s.push_str("timestamp;sensor_uuid;sensor_value\n");
    for i in 0..rows {
        let t = chrono::DateTime::from_timestamp(FIRST_READING + i as i64, 0).expect("in range");
        let _ = writeln!(s, "{};{sensor};{value}", t.format("%Y-%m-%dT%H:%M:%SZ"));
    }
    s
}
