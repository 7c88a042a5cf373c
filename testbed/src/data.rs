//! Measurement files for tests and benchmarks.

use std::fmt::Write as _;

/// 2013-01-01T00:00:00Z, where generated readings start.
pub const FIRST_READING: i64 = 1_356_998_400;

/// The contract's example query (page 2 of 10 of `sensor_00007`), as `query-cli` arguments: the
/// demo prints its answer, the CLI tests check it.
pub const EXAMPLE_QUERY: [&str; 11] = [
    "readings",
    "--sensor-name",
    "sensor_00007",
    "--start-timestamp",
    "2012-12-31T23:07:00+00",
    "--end-timestamp",
    "2013-02-16T11:03:00+00",
    "--page-number",
    "2",
    "--page-size",
    "10",
];

/// `query-cli` arguments for `readings` of `sensor` in `[start, end]` as CSV, `extra` (such as
/// `--every 1h`) before the format.
pub fn readings_args<'a>(
    sensor: &'a str,
    start: &'a str,
    end: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "readings",
        "--sensor-name",
        sensor,
        "--start-timestamp",
        start,
        "--end-timestamp",
        end,
    ];
    args.extend(extra);
    args.extend(["--format", "csv"]);
    args
}

/// The instant `us` microseconds after the epoch as SPEC §7's messages write it (RFC 3339, UTC,
/// `Z`, only the fractional digits it needs).
pub fn rfc3339_micros(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .expect("in range")
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

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

/// A reading as the sample fixtures describe it: (sensor UUID, microseconds since the Unix epoch,
/// value), ordered by UUID text and time.
pub type Reading = (String, i64, f64);

/// The readings of a `sample-expected/measurements.csv` (`sensor_uuid,ts_us,value`), ordered.
pub fn expected_readings(csv: &std::path::Path) -> Vec<Reading> {
    let text =
        std::fs::read_to_string(csv).unwrap_or_else(|e| panic!("reading {}: {e}", csv.display()));
    let mut rows: Vec<Reading> = text
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let bad = |e: &dyn std::fmt::Display| -> ! {
                panic!("{}: bad line {l:?}: {e}", csv.display())
            };
            (
                f[0].to_string(),
                f[1].parse().unwrap_or_else(|e| bad(&e)),
                f[2].parse().unwrap_or_else(|e| bad(&e)),
            )
        })
        .collect();
    rows.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    rows
}

/// Every stored reading in the same form and order as [`expected_readings`].
pub async fn stored_readings(db: &tokio_postgres::Client) -> Vec<Reading> {
    db.query(
        "SELECT sensor_uuid::text, (extract(epoch FROM ts) * 1000000)::bigint, value \
         FROM measurements ORDER BY sensor_uuid::text, ts",
        &[],
    )
    .await
    .expect("reading the stored measurements")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}
