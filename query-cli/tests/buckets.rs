//! `query-cli readings --every`: every aggregate of every bucket equals a plain SQL over the
//! stored readings, after re-uploads and corrections, in UTC and in zones with DST or a
//! half-hour offset, over whole and cut ranges, paged; and its usage errors.

mod common;

use chrono::{DateTime, Duration, TimeZone, Utc};
use common::{ok, query, text};
use sensor_pipeline::config::ContractSettings;
use sensor_pipeline::ingest::Ingestor;
use sensor_pipeline::store::{migrate::migrate, Databases};
use testbed::TestEnv;

const SENSOR: &str = "0a5a2b8e-7c0f-4a55-9a39-0000000000b1";
const OTHER: &str = "0a5a2b8e-7c0f-4a55-9a39-0000000000b2";

/// `n` readings every 5 minutes from `from`, valued `value(i)`.
fn every_5m(from: DateTime<Utc>, n: i64, value: impl Fn(i64) -> f64) -> Vec<(DateTime<Utc>, f64)> {
    (0..n)
        .map(|i| (from + Duration::minutes(5 * i), value(i)))
        .collect()
}

fn csv_of(sensor: &str, rows: &[(DateTime<Utc>, f64)]) -> String {
    let mut csv = String::from("timestamp;sensor_uuid;sensor_value\n");
    for (t, v) in rows {
        csv.push_str(&format!(
            "{};{sensor};{v}\n",
            t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        ));
    }
    csv
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

/// Migrates the test's databases, uploads the mapping `rows` (after the header) and returns an
/// ingestor for them.
async fn migrated(env: &TestEnv, rows: &str) -> Ingestor {
    migrate(&env.database_settings()).await.unwrap();
    env.s3
        .put(
            "mapping/sensors.csv",
            format!("sensor_uuid;sensor_name\n{rows}"),
        )
        .await
        .unwrap();
    let dbs = Databases::connect(&env.database_settings(), 2).unwrap();
    Ingestor::new(env.s3.store().clone(), dbs, ContractSettings::default())
}

/// Stores, by ingesting objects one after the other (each written later than the one before):
/// readings every 5 minutes over the DST change of 2013-03-31 in Europe/Berlin, re-uploaded with
/// other values; a correction of part of a day whose hours are left to detection; new readings
/// between stored ones with some stored ones overwritten; and a correction settled in its own
/// transaction. Values are multiples of 1/8, so that sums are exact in any order.
async fn stored(env: &TestEnv) {
    let ingestor = migrated(env, &format!("{SENSOR};bucketed\n{OTHER};other\n")).await;
    let start = at("2013-03-29T20:00:00Z");
    let n = 12 * 56 + 1;
    let first = every_5m(start, n, |i| ((i * 37) % 201 - 100) as f64 / 8.0);
    let mut first_csv = csv_of(SENSOR, &first);
    first_csv.push_str(&csv_of(OTHER, &first)[35..]);
    let objects: [(&str, String, bool); 5] = [
        ("timeseries/a.csv", first_csv, true),
        (
            "timeseries/a.csv",
            csv_of(
                SENSOR,
                &every_5m(start, n, |i| ((i * 53) % 211 - 105) as f64 / 4.0),
            ),
            true,
        ),
        (
            "timeseries/correction.csv",
            csv_of(
                SENSOR,
                &every_5m(at("2013-03-30T10:10:00Z"), 43, |i| {
                    50.0 + (i % 17) as f64 / 2.0
                }),
            ),
            true,
        ),
        (
            "timeseries/between.csv",
            {
                let mut rows = every_5m(at("2013-03-31T00:02:30Z"), 37, |i| -(i as f64) / 8.0);
                rows.push((at("2013-03-31T01:00:00Z"), 99.5));
                rows.push((at("2013-03-31T01:05:00Z"), -99.5));
                csv_of(SENSOR, &rows)
            },
            false,
        ),
        (
            "timeseries/evening.csv",
            csv_of(
                SENSOR,
                &every_5m(at("2013-03-31T20:20:00Z"), 16, |i| 7.0 - (i % 5) as f64),
            ),
            false,
        ),
    ];
    let outcome = ingestor.ingest("mapping/sensors.csv", None).await.unwrap();
    assert_eq!(outcome.rows_rejected, 0);
    let now = std::time::SystemTime::now();
    for (i, (key, body, detect)) in objects.into_iter().enumerate() {
        env.s3.put(key, body).await.unwrap();
        let written = now + std::time::Duration::from_secs(60 * (i as u64 + 1));
        env.s3.set_written_at(key, written).unwrap();
        let outcome = ingestor
            .clone()
            .detect_anomalies(detect)
            .ingest(key, None)
            .await
            .unwrap();
        assert_eq!(outcome.rows_rejected, 0, "{key}");
    }
    let client = testbed::connect(&env.measurements_db).await.unwrap();
    assert_eq!(
        testbed::derived_drift(&client).await.unwrap(),
        Vec::<String>::new()
    );
    // The correction left hours to its detection (which does not run here): those are read from
    // the readings.
    assert!(testbed::inexact_hours(&client).await.unwrap() > 0);
}

/// The CSV `readings --every` must print, by a plain SQL over the stored readings: buckets by
/// `bucket` (SQL over `ts`, in the session's time zone `zone`), aggregates by window functions.
async fn expected(
    client: &tokio_postgres::Client,
    (start, end): (DateTime<Utc>, DateTime<Utc>),
    zone: &str,
    bucket: &str,
) -> String {
    client
        .batch_execute(&format!("SET TIME ZONE '{zone}'"))
        .await
        .unwrap();
    let offset = if zone == "UTC" {
        "'Z'"
    } else {
        "to_char(b, 'TZH:TZM')"
    };
    let rows = client
        .query(
            &format!(
                "WITH r AS (
                    SELECT {bucket} AS b, ts, value FROM measurements
                    WHERE sensor_uuid = $1::text::uuid AND ts >= $2 AND ts <= $3
                 ), w AS (
                    SELECT b, count(*) OVER p AS n, avg(value) OVER p AS mean,
                           min(value) OVER p AS low, max(value) OVER p AS high,
                           first_value(value) OVER p AS first, last_value(value) OVER p AS last,
                           row_number() OVER (PARTITION BY b ORDER BY ts) AS k
                    FROM r
                    WINDOW p AS (PARTITION BY b ORDER BY ts
                                 ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
                 )
                 SELECT to_char(b, 'YYYY-MM-DD\"T\"HH24:MI:SS') || {offset},
                        n, mean, low, high, first, last
                 FROM w WHERE k = 1 ORDER BY b"
            ),
            &[&SENSOR, &start, &end],
        )
        .await
        .unwrap();
    let mut csv = String::from("bucket_start,readings,mean,min,max,first,last\n");
    for r in rows {
        let (b, n): (String, i64) = (r.get(0), r.get(1));
        let v = |i| r.get::<_, f64>(i);
        csv.push_str(&format!(
            "{b},{n},{},{},{},{},{}\n",
            v(2),
            v(3),
            v(4),
            v(5),
            v(6)
        ));
    }
    client.batch_execute("RESET TIME ZONE").await.unwrap();
    csv
}

fn utc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// What `readings --sensor-name bucketed --every EVERY --format csv` prints over `[start, end]`
/// (RFC 3339), buckets aligned in `zone`.
async fn csv_buckets(
    vars: &[(String, String)],
    (start, end): (&str, &str),
    every: &str,
    zone: &str,
) -> String {
    let mut extra = vec!["--every", every];
    if zone != "UTC" {
        extra.extend(["--timezone", zone]);
    }
    let args = testbed::data::readings_args("bucketed", start, end, &extra);
    ok(vars, &args).await
}

/// `readings --sensor-name bucketed` over 2013, then `extra`.
fn over_2013(extra: &[&'static str]) -> Vec<&'static str> {
    let mut args = vec![
        "readings",
        "--sensor-name",
        "bucketed",
        "--start-timestamp",
        "2013-01-01",
        "--end-timestamp",
        "2014-01-01",
    ];
    args.extend(extra);
    args
}

#[tokio::test]
async fn every_bucket_is_what_sql_over_the_readings_says() {
    let env = TestEnv::new().await.unwrap();
    stored(&env).await;
    let client = testbed::connect(&env.measurements_db).await.unwrap();
    let vars = env.vars();
    let whole = (
        Utc.with_ymd_and_hms(2013, 1, 1, 0, 0, 0).unwrap(),
        Utc.with_ymd_and_hms(2014, 1, 1, 0, 0, 0).unwrap(),
    );
    let cut = (at("2013-03-30T10:17:00Z"), at("2013-03-31T21:03:00Z"));
    // (--every, zone, the bucket in SQL written independently of the command's)
    let cases = [
        ("5m", "UTC", "date_bin('5 minutes', ts, timestamptz '1970-01-01Z')"),
        ("1h", "UTC", "date_trunc('hour', ts)"),
        ("6h", "UTC", "date_bin('6 hours', ts, timestamptz '1970-01-01Z')"),
        ("1d", "UTC", "date_trunc('day', ts)"),
        ("1w", "UTC", "date_trunc('week', ts)"),
        ("1h", "Asia/Kolkata", "date_trunc('hour', ts)"),
        ("1d", "Asia/Kolkata", "date_trunc('day', ts)"),
        (
            "3h",
            "Europe/Berlin",
            "date_trunc('day', ts) + floor(extract(epoch FROM ts - date_trunc('day', ts)) / 10800) \
             * interval '3 hours'",
        ),
        ("1d", "Europe/Berlin", "date_trunc('day', ts)"),
        ("1w", "Europe/Berlin", "date_trunc('week', ts)"),
    ];
    for (every, zone, bucket) in cases {
        for range in [whole, cut] {
            let (start, end) = (utc(range.0), utc(range.1));
            let printed = csv_buckets(&vars, (&start, &end), every, zone).await;
            assert_eq!(
                printed,
                expected(&client, range, zone, bucket).await,
                "{every} in {zone} over {start} – {end}"
            );
        }
    }
    // Days in Berlin across the change to summer time: the day of 2013-03-31 is 23 hours long.
    let days = ok(
        &vars,
        &over_2013(&[
            "--every",
            "1d",
            "--timezone",
            "Europe/Berlin",
            "--format",
            "json",
        ]),
    )
    .await;
    let starts: Vec<String> = days
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["bucket_start"].to_string())
        .collect();
    assert_eq!(
        starts,
        [
            "\"2013-03-29T00:00:00+01:00\"",
            "\"2013-03-30T00:00:00+01:00\"",
            "\"2013-03-31T00:00:00+01:00\"",
            "\"2013-04-01T00:00:00+02:00\""
        ]
    );
    // Pages count buckets.
    let hours = |page: &'static [&'static str]| {
        let mut args = over_2013(&["--every", "1h", "--format", "csv"]);
        args.extend(page);
        let vars = &vars;
        async move { ok(vars, &args).await }
    };
    let all = hours(&[]).await;
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 1 + 57, "56 hours and a reading at 04:00");
    let page = hours(&["--page-number", "2", "--page-size", "10"]).await;
    assert_eq!(
        page,
        format!("{}\n{}\n", lines[0], lines[11..21].join("\n"))
    );
    let past = hours(&["--page-number", "7", "--page-size", "10"]).await;
    assert_eq!(past, format!("{}\n", lines[0]));
}

#[tokio::test]
async fn the_table_and_json_say_the_same_as_the_csv() {
    let env = TestEnv::new().await.unwrap();
    stored(&env).await;
    let vars = env.vars();
    let args = |format: &'static str| {
        [
            "readings",
            "--sensor-name",
            "bucketed",
            "--start-timestamp",
            "2013-03-31T20:00:00Z",
            "--end-timestamp",
            "2013-03-31T21:59:59Z",
            "--every",
            "1h",
            "--timezone",
            "Asia/Kolkata",
            "--format",
            format,
        ]
    };
    assert_eq!(
        ok(&vars, &args("csv")).await,
        "bucket_start,readings,mean,min,max,first,last\n\
         2013-04-01T01:00:00+05:30,6,4.333333333333333,-16.5,23,9.75,6\n\
         2013-04-01T02:00:00+05:30,12,4.916666666666667,3,7,5,4\n\
         2013-04-01T03:00:00+05:30,6,4.666666666666667,-15.25,24.25,3,-2\n"
    );
    assert_eq!(
        ok(&vars, &args("table")).await,
        "bucket_start                readings                  mean             min             max           first            last\n\
         2013-04-01T01:00:00+05:30          6     4.333333333333333           -16.5              23            9.75               6\n\
         2013-04-01T02:00:00+05:30         12     4.916666666666667               3               7               5               4\n\
         2013-04-01T03:00:00+05:30          6     4.666666666666667          -15.25           24.25               3              -2\n"
    );
    let json = ok(&vars, &args("json")).await;
    assert_eq!(json.lines().count(), 3);
    assert_eq!(
        json.lines().next().unwrap(),
        "{\"bucket_start\":\"2013-04-01T01:00:00+05:30\",\"readings\":6,\
         \"mean\":4.333333333333333,\"min\":-16.5,\"max\":23,\"first\":9.75,\"last\":6}"
    );
}

#[tokio::test]
async fn bad_bucket_flags_are_usage_errors() {
    let env = TestEnv::new().await.unwrap();
    stored(&env).await;
    let vars = env.vars();
    let cases: [(&[&str], &str); 4] = [
        (
            &["--every", "7h"],
            "error: invalid value '7h' for '--every <DURATION>': is not a bucket length: buckets \
             shorter than a day restart at midnight, so they must divide a day (e.g. 1h, 2h, 3h, \
             4h, 6h, 8h or 12h), or be whole days (see --help)\n",
        ),
        (
            &["--every", "1y"],
            "error: invalid value '1y' for '--every <DURATION>': is not a bucket length; \
             accepted: a whole number and a unit, s, m, h, d or w (5m, 1h, 1d, 1w) (see --help)\n",
        ),
        (
            &["--timezone", "Europe/Berlin"],
            "error: the following required arguments were not provided: --every <DURATION> \
             (see --help)\n",
        ),
        (
            &["--every", "1d", "--timezone", "Mars/Olympus"],
            "error: unknown time zone \"Mars/Olympus\"; accepted: an IANA time zone name such \
             as Europe/Berlin or America/New_York, or UTC\n",
        ),
    ];
    for (flags, message) in cases {
        let out = query(&vars, &over_2013(flags)).await;
        assert_eq!(
            (out.status.code(), text(&out.stderr), text(&out.stdout)),
            (Some(2), message.to_string(), String::new()),
            "{flags:?}"
        );
    }
}

/// Ranges longer than what is read at once (20,000 hours, or days): the buckets are the same,
/// one that spans two reads included.
#[tokio::test]
async fn long_ranges_are_read_in_parts_and_buckets_span_them() {
    let env = TestEnv::new().await.unwrap();
    let ingestor = migrated(&env, &format!("{SENSOR};bucketed\n")).await;
    // 20,000 hours after 2013-01-01T00:00Z is 2015-04-13T08:00Z: the last two readings are
    // read apart, and lie in one local day in Berlin.
    let rows = [
        (at("2013-01-01T00:30:00Z"), 1.5),
        (at("2015-04-13T07:10:00Z"), 2.25),
        (at("2015-04-13T08:20:00Z"), -4.0),
    ];
    env.s3
        .put("timeseries/long.csv", csv_of(SENSOR, &rows))
        .await
        .unwrap();
    for key in ["mapping/sensors.csv", "timeseries/long.csv"] {
        assert_eq!(ingestor.ingest(key, None).await.unwrap().rows_rejected, 0);
    }
    let client = testbed::connect(&env.measurements_db).await.unwrap();
    let vars = env.vars();
    let range = (at("2013-01-01T00:10:00Z"), at("2016-01-01T00:00:00Z"));
    let (start, end) = (utc(range.0), utc(range.1));
    for (every, zone, bucket, buckets) in [
        ("1h", "UTC", "date_trunc('hour', ts)", 3),
        ("1d", "Europe/Berlin", "date_trunc('day', ts)", 2),
        ("1w", "UTC", "date_trunc('week', ts)", 2),
    ] {
        let printed = csv_buckets(&vars, (&start, &end), every, zone).await;
        assert_eq!(printed.lines().count(), 1 + buckets, "{every} in {zone}");
        assert_eq!(
            printed,
            expected(&client, range, zone, bucket).await,
            "{every} in {zone}"
        );
    }
}

/// Hours that do not stand, on days far apart: their readings are read run by run (a run ends
/// where a day passes without such an hour; each run's statement bounded by the run's span), or
/// all in one statement past sixteen runs. The buckets are SQL's either way.
#[tokio::test]
async fn hours_read_from_their_readings_on_days_far_apart() {
    let env = TestEnv::new().await.unwrap();
    let ingestor = migrated(&env, &format!("{SENSOR};bucketed\n")).await;
    // Sixty days of a reading every 30 minutes; then twenty corrections, each of the reading at
    // 10:00 of every third day (one of its hour's two, so one of its extremes), their hours left
    // to the detection that follows an object (which does not run here).
    let from = at("2013-05-01T00:00:00Z");
    let rows: Vec<(DateTime<Utc>, f64)> = (0..60 * 48)
        .map(|i| {
            (
                from + Duration::minutes(30 * i),
                ((i * 29) % 97) as f64 / 8.0,
            )
        })
        .collect();
    env.s3
        .put("timeseries/days.csv", csv_of(SENSOR, &rows))
        .await
        .unwrap();
    for key in ["mapping/sensors.csv", "timeseries/days.csv"] {
        assert_eq!(ingestor.ingest(key, None).await.unwrap().rows_rejected, 0);
    }
    let now = std::time::SystemTime::now();
    for k in 0..20 {
        let at_10 = from + Duration::days(3 * k) + Duration::hours(10);
        let key = format!("timeseries/correction-{k:02}.csv");
        let body = csv_of(SENSOR, &[(at_10, -(k as f64) - 0.5)]);
        env.s3.put(&key, body).await.unwrap();
        env.s3
            .set_written_at(
                &key,
                now + std::time::Duration::from_secs(60 * (k as u64 + 1)),
            )
            .unwrap();
        let outcome = ingestor
            .clone()
            .detect_anomalies(true)
            .ingest(&key, None)
            .await
            .unwrap();
        assert_eq!(outcome.rows_rejected, 0, "{key}");
    }
    let client = testbed::connect(&env.measurements_db).await.unwrap();
    assert_eq!(testbed::inexact_hours(&client).await.unwrap(), 20);
    let vars = env.vars();
    // The whole sixty days: twenty runs, read at once. From the first to the ninth day, cut
    // within hours: three runs.
    let whole = (from, from + Duration::days(60));
    let three = (at("2013-05-01T10:20:00Z"), at("2013-05-09T23:10:00Z"));
    for range in [whole, three] {
        let (start, end) = (utc(range.0), utc(range.1));
        for (every, zone, bucket) in [
            ("1h", "UTC", "date_trunc('hour', ts)"),
            ("1d", "UTC", "date_trunc('day', ts)"),
            ("1h", "Asia/Kolkata", "date_trunc('hour', ts)"),
        ] {
            assert_eq!(
                csv_buckets(&vars, (&start, &end), every, zone).await,
                expected(&client, range, zone, bucket).await,
                "{every} in {zone} over {start} – {end}"
            );
        }
    }
}
