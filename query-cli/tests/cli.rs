//! `query-cli` as a user runs it, against real PostgreSQL (and S3 where ledger entries are needed).

mod common;

use std::path::Path;

use common::{ok, query, text};

use chrono::{DateTime, Duration, TimeZone, Utc};
use sensor_pipeline::config::ContractSettings;
use sensor_pipeline::ingest::Ingestor;
use sensor_pipeline::store::{migrate::migrate, Databases};
use testbed::TestEnv;

const SAMPLE_DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../pipeline/tests/fixtures/sample-data"
);
const SENSOR_7: &str = "0a5a2b8e-7c0f-4a55-9a39-000000000007";
const TWIN_A: &str = "0a5a2b8e-7c0f-4a55-9a39-00000000000a";
const TWIN_B: &str = "0a5a2b8e-7c0f-4a55-9a39-00000000000b";
const UNMAPPED: &str = "0a5a2b8e-7c0f-4a55-9a39-0000000000ff";
/// Readings of sensor_00007: every 2 minutes from this instant, more than one keyset batch.
const READINGS: i64 = 64_800;

fn first_reading() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2012, 12, 1, 0, 0, 0).unwrap()
}

/// The model of what is stored for sensor_00007: (instant, value).
fn model() -> Vec<(DateTime<Utc>, f64)> {
    (0..READINGS)
        .map(|i| {
            let value = ((i * 37) % 2001 - 1000) as f64 / 8.0 + if i % 3 == 0 { 0.1 } else { 0.0 };
            (first_reading() + Duration::minutes(2 * i), value)
        })
        .collect()
}

fn csv_of(rows: &[(DateTime<Utc>, f64)]) -> String {
    rows.iter()
        .map(|(t, v)| {
            format!(
                "{},{v}\n",
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
            )
        })
        .collect()
}

fn in_range(start: DateTime<Utc>, end: DateTime<Utc>) -> Vec<(DateTime<Utc>, f64)> {
    model()
        .into_iter()
        .filter(|(t, _)| *t >= start && *t <= end)
        .collect()
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().to_utc()
}

/// Databases with the schema, sensor_00007's readings, two sensors sharing a name, and readings
/// of a sensor that is not mapped — stored the way the pipeline stores them: by ingesting objects.
async fn seeded(env: &TestEnv) {
    migrate(&env.database_settings()).await.unwrap();
    let mapping =
        format!("sensor_uuid;sensor_name\n{SENSOR_7};sensor_00007\n{TWIN_A};twin\n{TWIN_B};twin\n");
    let mut readings = String::from("timestamp;sensor_uuid;sensor_value\n");
    for (t, v) in model() {
        readings.push_str(&format!(
            "{};{SENSOR_7};{v}\n",
            t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
        ));
    }
    readings.push_str(&format!(
        "2013-01-05T10:00:00Z;{UNMAPPED};1.5\n2013-01-06T10:00:00Z;{UNMAPPED};-2\n"
    ));
    env.s3.put("mapping/sensors.csv", mapping).await.unwrap();
    env.s3
        .put("timeseries/readings.csv", readings)
        .await
        .unwrap();
    let dbs = Databases::connect(&env.database_settings(), 2).unwrap();
    let ingestor = Ingestor::new(env.s3.store().clone(), dbs, ContractSettings::default());
    for key in ["mapping/sensors.csv", "timeseries/readings.csv"] {
        let outcome = ingestor.ingest(key, None).await.unwrap();
        assert_eq!(outcome.rows_rejected, 0, "{key}");
    }
}

/// Asserts two multi-line texts are equal, reporting the first differing line (not both texts).
#[track_caller]
fn assert_same_lines(actual: &str, expected: &str, what: &str) {
    for (i, (a, e)) in actual.lines().zip(expected.lines()).enumerate() {
        assert_eq!(a, e, "{what}: line {} differs", i + 1);
    }
    assert_eq!(
        actual.lines().count(),
        expected.lines().count(),
        "{what}: line counts differ"
    );
    assert_eq!(actual, expected, "{what}");
}

/// Runs a command that must fail: exit code, the one stderr line, nothing on stdout.
async fn fails(env: &[(String, String)], args: &[&str], code: i32) -> String {
    let out = query(env, args).await;
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "", "{args:?}");
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{args:?}: one line expected: {err}");
    err.trim_end().to_string()
}

fn range_args<'a>(start: &'a str, end: &'a str) -> Vec<&'a str> {
    testbed::data::readings_args("sensor_00007", start, end, &[])
}

#[tokio::test]
async fn the_seed_example_works_exactly_as_written() {
    let env = TestEnv::new().await.unwrap();
    seeded(&env).await;
    let out = ok(&env.vars(), &testbed::data::EXAMPLE_QUERY).await;
    let page: Vec<_> = in_range(at("2012-12-31T23:07:00Z"), at("2013-02-16T11:03:00Z"))
        .into_iter()
        .skip(10)
        .take(10)
        .collect();
    // First reading at or after 23:07 is 23:08 (every 2 minutes from midnight); page 2 starts 10 later.
    assert_eq!(page[0].0, at("2012-12-31T23:28:00Z"));
    let mut expected = format!("{:<27}  {:>14}\n", "timestamp", "sensor_value");
    for (t, v) in &page {
        let t = t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        expected.push_str(&format!("{t:<27}  {:>14}\n", v.to_string()));
    }
    assert_eq!(out, expected);
}

#[tokio::test]
async fn pages_compose_to_the_unpaginated_stream() {
    let env = TestEnv::new().await.unwrap();
    seeded(&env).await;
    let vars = env.vars();

    // A short range that starts and ends exactly on a reading, and the whole series (which is
    // longer than one keyset batch).
    let short = ("2013-01-10T10:00:00Z", "2013-01-10T10:44:00Z");
    let whole = ("2012-12-01", "2013-12-31");
    for ((start, end), sizes, expected_rows) in [
        (short, &[1u64, 5, 23, 24][..], 23),
        (
            whole,
            &[10_000, 50_000, 64_800, 100_000][..],
            READINGS as usize,
        ),
        // Starts and ends mid-day and between readings: deep pages go through the page index,
        // with partial first and last days.
        (
            ("2012-12-01T00:31:00Z", "2013-02-20T05:17:30Z"),
            &[9_999, 10_001, 25_000][..],
            58_463,
        ),
    ] {
        let expected = csv_of(&in_range(crate::parse(start), crate::parse(end)));
        assert_eq!(expected.lines().count(), expected_rows);
        let all = ok(&vars, &range_args(start, end)).await;
        assert_same_lines(
            &all,
            &format!("timestamp,sensor_value\n{expected}"),
            &format!("{start}..{end}"),
        );

        for &size in sizes {
            let mut joined = String::new();
            let size_text = size.to_string();
            for page in 1.. {
                let page_text = page.to_string();
                let mut args = range_args(start, end);
                args.extend(["--page-number", &page_text, "--page-size", &size_text]);
                let out = ok(&vars, &args).await;
                let body = out
                    .strip_prefix("timestamp,sensor_value\n")
                    .expect("CSV header on every page");
                if body.is_empty() {
                    break;
                }
                // Full pages, then what is left.
                let left = expected.lines().count() - (page - 1) * size as usize;
                assert_eq!(body.lines().count(), left.min(size as usize));
                joined.push_str(body);
            }
            assert_same_lines(
                &joined,
                &expected,
                &format!("{start}..{end} in pages of {size}"),
            );
        }
    }

    // Small pages anywhere: in the partial first day, across a day's end, inside a whole day,
    // in the partial last day, and the last one.
    let (start, end) = ("2012-12-01T00:31:00Z", "2013-02-20T05:17:30Z");
    let expected = csv_of(&in_range(crate::parse(start), crate::parse(end)));
    let lines: Vec<&str> = expected.lines().collect();
    let size = 7;
    for page in [
        1,
        2,
        100,
        206,
        207,
        4_000,
        8_350,
        8_352,
        lines.len().div_ceil(size),
    ] {
        let mut args = range_args(start, end);
        let (page_text, size_text) = (page.to_string(), size.to_string());
        args.extend(["--page-number", &page_text, "--page-size", &size_text]);
        let first = (page - 1) * size;
        let want: String = lines[first..(first + size).min(lines.len())]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            ok(&vars, &args).await,
            format!("timestamp,sensor_value\n{want}"),
            "page {page} of {size}"
        );
    }
}

fn parse(s: &str) -> DateTime<Utc> {
    if s.len() == 10 {
        at(&format!("{s}T00:00:00Z"))
    } else {
        at(s)
    }
}

#[tokio::test]
async fn every_timestamp_form_and_bare_dates() {
    let env = TestEnv::new().await.unwrap();
    seeded(&env).await;
    let vars = env.vars();
    let expected = format!(
        "timestamp,sensor_value\n{}",
        csv_of(&in_range(
            at("2013-01-01T00:00:00Z"),
            at("2013-01-01T00:10:00Z")
        ))
    );
    assert_eq!(expected.lines().count(), 7);
    let starts = [
        "2013-01-01",
        "2013-01-01T00:00:00Z",
        "2013-01-01t00:00:00z",
        "2013-01-01 00:00",
        "2013-01-01T00:00:00",
        "2013-01-01T00:00:00.000000",
        "2013-01-01T01:00:00+01",
        "2013-01-01T01:00:00+0100",
        "2013-01-01T01:00:00+01:00",
        "2012-12-31T23:00:00-01:00",
        "2012-12-31T23:59:59.999999999-00:00",
        " 2013-01-01T00:00:00,0Z ",
    ];
    let ends = [
        "2013-01-01T00:10:00Z",
        "2013-01-01 00:10",
        "2013-01-01T01:10:00+01",
        "2013-01-01T00:10:00.9",
    ];
    for start in starts {
        for end in ends {
            assert_eq!(
                ok(&vars, &range_args(start, end)).await,
                expected,
                "{start}..{end}"
            );
        }
    }
    // A range of one bare date: midnight to midnight, both inclusive.
    let day = ok(&vars, &range_args("2013-01-01", "2013-01-02")).await;
    assert_eq!(
        day,
        format!(
            "timestamp,sensor_value\n{}",
            csv_of(&in_range(
                at("2013-01-01T00:00:00Z"),
                at("2013-01-02T00:00:00Z")
            ))
        )
    );
    assert_eq!(day.lines().count(), 1 + 721);
    assert!(day.ends_with("2013-01-02T00:00:00Z,-118.15\n"));
}

#[tokio::test]
async fn json_and_table_formats() {
    let env = TestEnv::new().await.unwrap();
    seeded(&env).await;
    let vars = env.vars();
    let base = [
        "readings",
        "--sensor-uuid",
        "{0A5A2B8E-7C0F-4A55-9A39-0000000000FF}",
        "--start-timestamp",
        "2013-01-01",
        "--end-timestamp",
        "2013-02-01",
    ];
    let mut args = base.to_vec();
    args.extend(["--format", "json"]);
    assert_eq!(
        ok(&vars, &args).await,
        "{\"timestamp\":\"2013-01-05T10:00:00Z\",\"sensor_value\":1.5}\n\
         {\"timestamp\":\"2013-01-06T10:00:00Z\",\"sensor_value\":-2}\n"
    );
    assert_eq!(
        ok(&vars, &base).await,
        "timestamp                      sensor_value\n\
         2013-01-05T10:00:00Z                    1.5\n\
         2013-01-06T10:00:00Z                     -2\n"
    );
}

#[tokio::test]
async fn errors_say_what_is_wrong_with_distinct_exit_codes() {
    let env = TestEnv::new().await.unwrap();
    seeded(&env).await;
    let vars = env.vars();
    let readings = |name: &'static str, start: &'static str, end: &'static str| {
        vec![
            "readings",
            "--sensor-name",
            name,
            "--start-timestamp",
            start,
            "--end-timestamp",
            end,
        ]
    };

    // Nothing to show: exit 1.
    assert_eq!(
        fails(
            &vars,
            &readings("sensor_99999", "2013-01-01", "2013-01-02"),
            1
        )
        .await,
        "error: unknown sensor name \"sensor_99999\": no sensor in the mapping has it \
         (`query-cli sensors` lists them; --sensor-uuid reads unmapped sensors)"
    );
    let evil = "x'; DROP TABLE measurements; --\"";
    assert_eq!(
        fails(&vars, &readings(evil, "2013-01-01", "2013-01-02"), 1).await,
        "error: unknown sensor name \"x'; DROP TABLE measurements; --\\\"\": no sensor in the mapping \
         has it (`query-cli sensors` lists them; --sensor-uuid reads unmapped sensors)"
    );
    assert_eq!(
        fails(&vars, &readings("twin", "2013-01-01", "2013-01-02"), 1).await,
        format!("error: sensor name \"twin\" is mapped to 2 UUIDs: {TWIN_A}, {TWIN_B}; use --sensor-uuid")
    );
    let unknown_uuid = [
        "readings",
        "--sensor-uuid",
        "00000000-0000-0000-0000-000000000001",
        "--start-timestamp",
        "2013-01-01",
        "--end-timestamp",
        "2013-01-02",
    ];
    assert_eq!(
        fails(&vars, &unknown_uuid, 1).await,
        "error: unknown sensor UUID 00000000-0000-0000-0000-000000000001: neither mapped nor with any reading"
    );

    // Usage: exit 2.
    assert_eq!(
        fails(
            &vars,
            &readings("sensor_00007", "2013-01-02", "2013-01-01T23:59:59Z"),
            2
        )
        .await,
        "error: --start-timestamp (2013-01-02T00:00:00Z) is after --end-timestamp \
         (2013-01-01T23:59:59Z); the range is [start, end], both inclusive"
    );
    assert_eq!(
        fails(&vars, &readings("sensor_00007", "2013-13-01", "2013-01-02"), 2).await,
        "error: invalid value '2013-13-01' for '--start-timestamp <T>': is not a valid calendar date \
         or time of day; accepted: YYYY-MM-DD, or YYYY-MM-DD[T| ]HH:MM[:SS[.ffffff]] optionally \
         followed by Z, ±HH, ±HHMM or ±HH:MM (UTC when omitted) (see --help)"
    );
    assert_eq!(
        fails(&vars, &readings("sensor_00007", "2013-01-01", "01/02/2013"), 2).await,
        "error: invalid value '01/02/2013' for '--end-timestamp <T>': is not an ISO 8601 date-time \
         (expected YYYY-MM-DDTHH:MM[:SS[.ffffff]][Z|±HH[:MM]]); accepted: YYYY-MM-DD, or \
         YYYY-MM-DD[T| ]HH:MM[:SS[.ffffff]] optionally followed by Z, ±HH, ±HHMM or ±HH:MM (UTC when \
         omitted) (see --help)"
    );
    let mut one_flag = readings("sensor_00007", "2013-01-01", "2013-01-02");
    one_flag.extend(["--page-number", "2"]);
    assert_eq!(
        fails(&vars, &one_flag, 2).await,
        "error: the following required arguments were not provided: --page-size <S> (see --help)"
    );
    let mut one_flag = readings("sensor_00007", "2013-01-01", "2013-01-02");
    one_flag.extend(["--page-size", "2"]);
    assert_eq!(
        fails(&vars, &one_flag, 2).await,
        "error: the following required arguments were not provided: --page-number <P> (see --help)"
    );
    let mut page_zero = readings("sensor_00007", "2013-01-01", "2013-01-02");
    page_zero.extend(["--page-number", "0", "--page-size", "10"]);
    assert_eq!(
        fails(&vars, &page_zero, 2).await,
        "error: invalid value '0' for '--page-number <P>': pages and page sizes start at 1 (see --help)"
    );
    let mut size_zero = readings("sensor_00007", "2013-01-01", "2013-01-02");
    size_zero.extend(["--page-number", "1", "--page-size", "0"]);
    assert_eq!(
        fails(&vars, &size_zero, 2).await,
        "error: invalid value '0' for '--page-size <S>': pages and page sizes start at 1 (see --help)"
    );
    let mut size_negative = readings("sensor_00007", "2013-01-01", "2013-01-02");
    size_negative.extend(["--page-number", "1", "--page-size", "-3"]);
    assert_eq!(
        fails(&vars, &size_negative, 2).await,
        "error: invalid value '-3' for '--page-size <S>': pages and page sizes start at 1 (see --help)"
    );
    assert_eq!(
        fails(&vars, &["readings", "--start-timestamp", "2013-01-01", "--end-timestamp", "2013-01-02"], 2).await,
        "error: the following required arguments were not provided: <--sensor-name <NAME>|--sensor-uuid <UUID>> (see --help)"
    );

    // Infrastructure: exit 3.
    let port = testbed::free_port().unwrap();
    let mut unreachable = vars.clone();
    for (k, v) in unreachable.iter_mut() {
        if k == "DATABASE_URL" || k == "TIMESCALE_DATABASE_URL" {
            *v = format!("postgres://nobody:secret-password@127.0.0.1:{port}/db");
        }
    }
    let err = fails(
        &unreachable,
        &readings("sensor_00007", "2013-01-01", "2013-01-02"),
        3,
    )
    .await;
    assert!(
        err.starts_with("error: cannot reach the mapping database: error connecting to server"),
        "{err}"
    );
    assert!(!err.contains("secret-password"));
    let no_config: Vec<(String, String)> = Vec::new();
    assert_eq!(
        fails(&no_config, &["sensors"], 3).await,
        "error: missing required setting DATABASE_URL: set it in the environment, in config/.env, or as DATABASE_URL_FILE"
    );

    // A page past the end is not an error: the header, no rows.
    let mut past = readings("sensor_00007", "2013-01-01", "2013-01-02");
    past.extend([
        "--page-number",
        "1000",
        "--page-size",
        "10",
        "--format",
        "csv",
    ]);
    assert_eq!(ok(&vars, &past).await, "timestamp,sensor_value\n");
    let mut huge = readings("sensor_00007", "2013-01-01", "2013-01-02");
    huge.extend([
        "--page-number",
        "9223372036854775807",
        "--page-size",
        "9223372036854775807",
        "--format",
        "json",
    ]);
    assert_eq!(ok(&vars, &huge).await, "");

    // The evil name did nothing.
    let client = testbed::connect(&env.measurements_db).await.unwrap();
    let n: i64 = testbed::scalar(&client, "SELECT count(*) FROM measurements").await;
    assert_eq!(n, READINGS + 2);
}

/// Ingests the sample data plus a failed object, so the ledgers have every status.
async fn ingested(env: &TestEnv) {
    migrate(&env.database_settings()).await.unwrap();
    env.s3.put_tree(Path::new(SAMPLE_DATA)).await.unwrap();
    env.s3
        .put(
            "timeseries/2013/no-value.csv",
            "timestamp;sensor_uuid\n2013-01-01T00:00:00Z;x\n",
        )
        .await
        .unwrap();
    env.s3.put("notes/readme.txt", "hello").await.unwrap();
    let dbs = Databases::connect(&env.database_settings(), 2).unwrap();
    let ingestor = Ingestor::new(env.s3.store().clone(), dbs, ContractSettings::default());
    for key in [
        "mapping/mapping.csv",
        "timeseries/2013/part-0000.csv",
        "timeseries/2013/part-0001.csv",
        "timeseries/2013/rules-sample.csv",
        "timeseries/2013/no-value.csv",
        "notes/readme.txt",
    ] {
        ingestor.ingest(key, None).await.unwrap();
    }
}

async fn etag(env: &TestEnv, key: &str) -> String {
    for url in [&env.mapping_db, &env.measurements_db] {
        let c = testbed::connect(url).await.unwrap();
        if let Some(row) = c
            .query_opt(
                "SELECT etag FROM ingest_ledger WHERE object_key = $1",
                &[&key],
            )
            .await
            .unwrap()
        {
            return row.get(0);
        }
    }
    panic!("{key} not in a ledger");
}

async fn sensors_and_status(env: TestEnv) {
    ingested(&env).await;
    let vars = env.vars();

    let sensors = ok(&vars, &["sensors", "--format", "json"]).await;
    let lines: Vec<serde_json::Value> = sensors
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(
        lines[0],
        serde_json::json!({
            "sensor_uuid": "cd613e30-d8f1-4adf-91b7-584a2265b1f5", "sensor_name": "sensor_00001",
            "readings": 33, "first": "2012-12-31T23:01:00Z", "last": "2013-01-20T09:00:00Z"
        })
    );
    let csv = ok(&vars, &["sensors", "--format", "csv"]).await;
    assert_eq!(
        csv.lines().next(),
        Some("sensor_uuid,sensor_name,readings,first,last")
    );
    assert_eq!(csv.lines().count(), 6);
    let table = ok(&vars, &["sensors"]).await;
    assert!(
        table.starts_with("sensor_uuid                           sensor_name   readings  first"),
        "{table}"
    );

    let status = ok(&vars, &["status", "--format", "json"]).await;
    let rows: Vec<serde_json::Value> = status
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
                r["rows_ok"].as_i64().unwrap(),
                r["rows_rejected"].as_i64().unwrap(),
                r["reason"].as_str().map(str::to_string),
            )
        })
        .collect();
    let s = |k: &str, st: &str, ok, rej, reason: Option<&str>| {
        (
            k.to_string(),
            st.to_string(),
            ok,
            rej,
            reason.map(str::to_string),
        )
    };
    assert_eq!(
        summary,
        vec![
            s("mapping/mapping.csv", "done", 5, 0, None),
            s("notes/readme.txt", "ignored", 0, 0, Some("key is outside the mapping/ and timeseries/ prefixes")),
            s("timeseries/2013/no-value.csv", "failed", 0, 0, Some("the header lacks required column(s) sensor_value; it has: timestamp, sensor_uuid")),
            s("timeseries/2013/part-0000.csv", "done", 100, 0, None),
            s("timeseries/2013/part-0001.csv", "done", 100, 0, None),
            s("timeseries/2013/rules-sample.csv", "done", 4, 2, None),
        ]
    );
    assert_eq!(rows[0]["etag"], etag(&env, "mapping/mapping.csv").await);
    // The version's write time: the object's Last-Modified; none for a key that was never read.
    let written = env
        .s3
        .store()
        .head("mapping/mapping.csv")
        .await
        .unwrap()
        .written_at
        .unwrap();
    assert_eq!(
        rows[0]["written_at"],
        written.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    );
    assert_eq!(rows[1]["written_at"], serde_json::Value::Null);

    let failed = ok(&vars, &["status", "--failed", "--format", "csv"]).await;
    let no_value_etag = etag(&env, "timeseries/2013/no-value.csv").await;
    let failed_lines: Vec<&str> = failed.lines().collect();
    assert_eq!(failed_lines.len(), 2);
    assert_eq!(
        failed_lines[0],
        "key,etag,status,rows_ok,rows_rejected,reason,attempts,finished_at,written_at"
    );
    assert!(
        failed_lines[1].starts_with(&format!(
            "timeseries/2013/no-value.csv,{no_value_etag},failed,0,0,\"the header lacks required column(s) sensor_value; it has: timestamp, sensor_uuid\",1,"
        )),
        "{failed}"
    );

    let table = ok(&vars, &["status"]).await;
    assert!(
        table.ends_with(
            "\ntotal: 6 object versions (4 done, 1 failed, 1 ignored); rows: 209 ok, 2 rejected\n"
        ),
        "{table}"
    );

    let rules_etag = etag(&env, "timeseries/2013/rules-sample.csv").await;
    assert_eq!(
        ok(&vars, &["status", "--object", "timeseries/2013/rules-sample.csv", "--format", "json"]).await,
        format!(
            "{{\"key\":\"timeseries/2013/rules-sample.csv\",\"etag\":\"{rules_etag}\",\"line\":5,\
             \"reason\":\"sensor_value \\\"not-a-number\\\" is not a decimal number\",\
             \"raw\":\"not-a-number;2013-01-20T11:00:00Z;C;cd613e30-d8f1-4adf-91b7-584a2265b1f5\"}}\n\
             {{\"key\":\"timeseries/2013/rules-sample.csv\",\"etag\":\"{rules_etag}\",\"line\":6,\
             \"reason\":\"sensor_uuid \\\"not-a-uuid\\\" is not a UUID (expected e.g. cd613e30-d8f1-4adf-91b7-584a2265b1f5)\",\
             \"raw\":\"23.0;2013-01-20T12:00:00Z;C;not-a-uuid\"}}\n"
        )
    );
    let table = ok(
        &vars,
        &["status", "--object", "timeseries/2013/rules-sample.csv"],
    )
    .await;
    assert!(
        table.ends_with("\n2 rejected rows in timeseries/2013/rules-sample.csv\n"),
        "{table}"
    );
    assert_eq!(
        fails(&vars, &["status", "--object", "timeseries/nope.csv"], 1).await,
        "error: no object \"timeseries/nope.csv\" in the ledger (`query-cli status` lists every object version)"
    );
}

#[tokio::test]
async fn sensors_and_status_in_one_database() {
    sensors_and_status(TestEnv::new().await.unwrap()).await;
}

#[tokio::test]
async fn sensors_and_status_with_mapping_and_measurements_apart() {
    sensors_and_status(TestEnv::with_two_databases().await.unwrap()).await;
}

#[tokio::test]
async fn readings_with_mapping_and_measurements_apart() {
    let env = TestEnv::with_two_databases().await.unwrap();
    seeded(&env).await;
    let out = ok(
        &env.vars(),
        &range_args("2013-01-10T10:00:00Z", "2013-01-10T10:04:00Z"),
    )
    .await;
    assert_eq!(
        out,
        format!(
            "timestamp,sensor_value\n{}",
            csv_of(&in_range(
                at("2013-01-10T10:00:00Z"),
                at("2013-01-10T10:04:00Z")
            ))
        )
    );
    let sensors = ok(&env.vars(), &["sensors", "--format", "csv"]).await;
    assert_eq!(
        sensors,
        format!(
            "sensor_uuid,sensor_name,readings,first,last\n\
             {SENSOR_7},sensor_00007,{READINGS},2012-12-01T00:00:00Z,2013-02-28T23:58:00Z\n\
             {TWIN_A},twin,0,,\n{TWIN_B},twin,0,,\n\
             {UNMAPPED},,2,2013-01-05T10:00:00Z,2013-01-06T10:00:00Z\n"
        )
    );
}

#[tokio::test]
async fn help_shows_an_example_and_the_exit_codes_for_every_command() {
    for (command, example) in [
        ("readings", "query-cli readings --sensor-name sensor_00007 --start-timestamp \"2012-12-31T23:07:00+00\""),
        ("sensors", "query-cli sensors --format csv"),
        ("status", "query-cli status --object timeseries/2013/part-0000.csv"),
    ] {
        let help = ok(&[], &[command, "--help"]).await;
        assert!(help.contains(example), "{command}: {help}");
        assert!(
            help.contains("3  configuration or infrastructure error"),
            "{command}: {help}"
        );
    }
    let help = ok(&[], &["--help"]).await;
    assert!(help.contains("2  usage error"), "{help}");
}

/// `query-cli` over `verify-full` against a server that accepts only TLS; the wrong CA is one line
/// naming the database and the reason, exit 3.
#[tokio::test]
async fn reads_over_verified_tls_and_a_wrong_ca_is_one_line_and_exit_3() {
    let pki = testbed::tls::Pki::new().unwrap();
    let (_pg, url) = testbed::owned_postgres_tls(&pki, false).await.unwrap();
    let with_ca = |ca: &Path| format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());
    let settings = sensor_pipeline::config::DatabaseSettings {
        mapping_url: sensor_pipeline::config::Secret::new(with_ca(&pki.ca)),
        measurements_url: sensor_pipeline::config::Secret::new(with_ca(&pki.ca)),
        timeouts: Default::default(),
    };
    migrate(&settings).await.unwrap();
    let env = |ca: &Path| vec![("DATABASE_URL".to_string(), with_ca(ca))];
    let out = query(&env(&pki.ca), &["sensors", "--format", "csv"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "sensor_uuid,sensor_name,readings,first,last\n"
    );

    let out = query(&env(&pki.other_ca), &["sensors"]).await;
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        text(&out.stderr),
        "error: cannot reach the mapping database: error performing TLS handshake: invalid peer \
         certificate: UnknownIssuer\n"
    );
}
