//! `sensors-worker migrate` and `ingest` as a user runs them, against real PostgreSQL and S3.

use std::path::Path;
use std::process::Output;

use testbed::TestEnv;

const SAMPLE_DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../pipeline/tests/fixtures/sample-data"
);

async fn worker(env: &[(String, String)], args: &[&str]) -> Output {
    testbed::run_binary(env!("CARGO_BIN_EXE_sensors-worker"), env, args).await
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The summary without its timing line (which varies).
fn summary(out: &Output) -> String {
    text(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("time:"))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn count(url: &str, sql: &str) -> i64 {
    testbed::scalar(&testbed::connect(url).await.unwrap(), sql).await
}

#[tokio::test]
async fn migrate_then_ingest_all_then_again() {
    let env = TestEnv::new().await.unwrap();
    env.s3.put_tree(Path::new(SAMPLE_DATA)).await.unwrap();
    let vars = env.vars();

    // The test server does not preload TimescaleDB; why the table is plain depends on whether
    // this machine has it installed.
    let installed = testbed::timescaledb_installed(&env.measurements_db)
        .await
        .unwrap();
    let plain = match installed {
        true => {
            "a plain table (TimescaleDB is installed but not in shared_preload_libraries: add it \
             there, restart PostgreSQL and migrate again for a hypertable)"
        }
        false => "a plain table (TimescaleDB not available)",
    };
    let out = worker(&vars, &["migrate"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "mapping+measurement database: applied ledger/V1__ledger_and_quarantine, \
             ledger/V2__object_versions, ledger/V3__versions_without_lock, mapping/V1__sensors, \
             mapping/V2__sensor_versions, measurements/V1__measurements, \
             measurements/V2__measurement_days, measurements/V3__measurement_versions, \
             measurements/V4__anomalies, measurements/V5__measurement_hours, \
             measurements/V6__measurement_hour_values, measurements/V7__measurement_day_values, \
             measurements/V8__measurements_without_time_index, \
             measurements/V9__days_written_by_their_writer; measurements is {plain}\n"
        )
    );
    let out = worker(&vars, &["migrate"]).await;
    assert_eq!(
        text(&out.stdout),
        format!("mapping+measurement database: already up to date; measurements is {plain}\n")
    );

    let out = worker(&vars, &["ingest", "--all"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        summary(&out),
        "objects: 4 done, 0 already done, 0 failed, 0 ignored, 0 errors\nrows:    209 ok, 2 rejected\nanomalies: 1 opened"
    );
    assert_eq!(
        count(&env.measurements_db, "SELECT count(*) FROM measurements").await,
        203
    );
    assert_eq!(
        count(&env.mapping_db, "SELECT count(*) FROM sensors").await,
        5
    );

    let out = worker(&vars, &["ingest", "--all"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        summary(&out),
        "objects: 0 done, 4 already done, 0 failed, 0 ignored, 0 errors\nrows:    0 ok, 0 rejected\nanomalies: 0 opened"
    );
}

/// `ingest --all` ingests a listing's pages as they come: a bucket of 1,002 objects (two pages of
/// the store's 1,000) is ingested whole, the objects of both pages once each.
#[tokio::test]
async fn ingest_all_takes_every_page_of_the_listing() {
    let env = TestEnv::new().await.unwrap();
    let sensor = "9b6a3c39-1f6e-4a53-9e3e-2f6b1c3c3b11";
    env.s3
        .put(
            "mapping/names.csv",
            format!("sensor_uuid;sensor_name\n{sensor};pump\n"),
        )
        .await
        .unwrap();
    env.s3.put("other/notes.txt", "not ours").await.unwrap();
    for i in 0..1000 {
        let csv = format!(
            "timestamp;sensor_uuid;sensor_value\n2013-01-01T{:02}:{:02}:00Z;{sensor};{i}\n",
            i / 60,
            i % 60
        );
        env.s3
            .put(&format!("timeseries/{i:04}.csv"), csv)
            .await
            .unwrap();
    }
    let mut vars = env.vars();
    vars.push(("ANOMALY_DETECTION".into(), "off".into()));
    assert!(worker(&vars, &["migrate"]).await.status.success());
    let out = worker(&vars, &["ingest", "--all"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        summary(&out),
        "objects: 1001 done, 0 already done, 0 failed, 1 ignored, 0 errors\nrows:    1001 ok, 0 rejected"
    );
    assert_eq!(
        count(
            &env.measurements_db,
            "SELECT count(DISTINCT value) FROM measurements"
        )
        .await,
        1000
    );
}

fn readings(rows: usize, value: f64) -> String {
    testbed::data::steady_readings("cd613e30-d8f1-4adf-91b7-584a2265b1f5", rows, value)
}

#[tokio::test]
async fn a_correction_written_later_wins_although_ingest_all_reads_it_first() {
    let env = TestEnv::new().await.unwrap();
    // The correction sorts first, so `ingest --all` ingests it before the object it corrects.
    env.s3
        .put("timeseries/2013/part-0000.csv", readings(50_000, 1.0))
        .await
        .unwrap();
    env.s3
        .put("timeseries/2013/0-correction.csv", readings(1_000, 2.0))
        .await
        .unwrap();
    let written = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_767_225_600);
    env.s3
        .set_written_at("timeseries/2013/part-0000.csv", written)
        .unwrap();
    env.s3
        .set_written_at(
            "timeseries/2013/0-correction.csv",
            written + std::time::Duration::from_secs(2),
        )
        .unwrap();
    let vars = env.vars();
    assert!(worker(&vars, &["migrate"]).await.status.success());
    let out = worker(&vars, &["ingest", "--all"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let by_value: Vec<(f64, i64)> = testbed::connect(&env.measurements_db)
        .await
        .unwrap()
        .query(
            "SELECT value, count(*) FROM measurements GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(by_value, vec![(1.0, 49_000), (2.0, 1_000)]);
    let corrected = count(
        &env.measurements_db,
        "SELECT count(*) FROM measurements WHERE value = 2 AND ts < '2013-01-01T00:16:40Z'",
    )
    .await;
    assert_eq!(corrected, 1_000);
}

/// 2,000 readings of `sensor`, one a second from `testbed::data::FIRST_READING`, around 20 with a
/// little regular noise, and 500 at reading `spike`.
fn with_a_spike(sensor: &str, spike: usize) -> String {
    let mut s = String::from("timestamp;sensor_uuid;sensor_value\n");
    for i in 0..2_000 {
        let t =
            chrono::DateTime::from_timestamp(testbed::data::FIRST_READING + i as i64, 0).unwrap();
        let value = if i == spike {
            500.0
        } else {
            20.0 + ((i * 7_919) % 13) as f64 / 10.0
        };
        s.push_str(&format!(
            "{};{sensor};{value}\n",
            t.format("%Y-%m-%dT%H:%M:%SZ")
        ));
    }
    s
}

#[tokio::test]
async fn ingest_detects_the_corrections_of_several_sensors_after_the_last_object() {
    let env = TestEnv::new().await.unwrap();
    let sensors = [
        "0b6a8f52-3a1e-4c55-9d1c-1f0c8e4c1a01",
        "5c2d7e90-8b4f-4e21-a3c6-2d9e5f7a8b02",
        "e4f1a2b3-c5d6-4e7f-8a9b-0c1d2e3f4a03",
    ];
    for u in sensors {
        env.s3
            .put(&format!("timeseries/a-{u}.csv"), with_a_spike(u, 1_500))
            .await
            .unwrap();
    }
    let mut vars = env.vars();
    // More detections at once than sensors: each takes the next sensor nobody is detecting.
    vars.push(("WORKER_CONCURRENCY".into(), "4".into()));
    assert!(worker(&vars, &["migrate"]).await.status.success());
    let out = worker(&vars, &["ingest", "--all"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        summary(&out).ends_with("anomalies: 3 opened"),
        "{}",
        summary(&out)
    );

    // Newer versions move every sensor's spike: every reading meets a stored one, so their
    // detection runs after the last object, sensor by sensor.
    let mut keys = vec!["ingest".to_string()];
    for u in sensors {
        let key = format!("timeseries/b-{u}.csv");
        env.s3.put(&key, with_a_spike(u, 1_700)).await.unwrap();
        keys.push(key);
    }
    let args: Vec<&str> = keys.iter().map(String::as_str).collect();
    let out = worker(&vars, &args).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        summary(&out),
        "objects: 3 done, 0 already done, 0 failed, 0 ignored, 0 errors\nrows:    6000 ok, 0 rejected\nanomalies: 3 opened"
    );
    let client = testbed::connect(&env.measurements_db).await.unwrap();
    let anomalies: Vec<(String, String, String, i64)> = testbed::rows(
        &client,
        "SELECT sensor_uuid::text, kind, state, extract(epoch FROM start_ts)::bigint
             FROM anomalies ORDER BY 1, 4",
    )
    .await;
    let first = testbed::data::FIRST_READING;
    let want: Vec<(String, String, String, i64)> = sensors
        .iter()
        .flat_map(|u| {
            [
                (
                    u.to_string(),
                    "spike".into(),
                    "resolved".into(),
                    first + 1_500,
                ),
                (u.to_string(), "spike".into(), "open".into(), first + 1_700),
            ]
        })
        .collect();
    assert_eq!(anomalies, want);
    assert_eq!(
        count(&env.measurements_db, "SELECT count(*) FROM anomaly_work").await,
        0
    );
}

#[tokio::test]
async fn a_failed_object_makes_ingest_exit_1_and_the_rest_is_stored() {
    let env = TestEnv::new().await.unwrap();
    env.s3
        .put("timeseries/good.csv", "timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;cd613e30-d8f1-4adf-91b7-584a2265b1f5;1\n")
        .await
        .unwrap();
    env.s3
        .put("timeseries/bad.csv", "timestamp;sensor_value\n")
        .await
        .unwrap();
    env.s3.put("notes/readme.txt", "hello").await.unwrap();
    let vars = env.vars();
    assert!(worker(&vars, &["migrate"]).await.status.success());
    let out = worker(&vars, &["ingest", "--all"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        summary(&out),
        "objects: 1 done, 0 already done, 1 failed, 1 ignored, 0 errors\n\
         rows:    1 ok, 0 rejected\n\
         anomalies: 0 opened\n\
         failed:  timeseries/bad.csv: the header lacks required column(s) sensor_uuid; it has: timestamp, sensor_value"
    );
    assert_eq!(
        count(&env.measurements_db, "SELECT count(*) FROM measurements").await,
        1
    );

    // Named keys work too.
    let out = worker(&vars, &["ingest", "timeseries/good.csv"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        summary(&out),
        "objects: 0 done, 1 already done, 0 failed, 0 ignored, 0 errors\nrows:    0 ok, 0 rejected\nanomalies: 0 opened"
    );
}

#[tokio::test]
async fn configuration_errors_are_one_line_naming_the_variable() {
    let out = worker(&[], &["migrate"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: missing required setting DATABASE_URL: set it in the environment, in config/.env, or as DATABASE_URL_FILE\n"
    );
    let out = worker(
        &[("DATABASE_URL".into(), "postgres://x@127.0.0.1:1/db".into())],
        &["ingest", "--all"],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: missing required setting MINIO_ENDPOINT: set it in the environment, in config/.env, or as MINIO_ENDPOINT_FILE\n"
    );
    let out = worker(&[], &["ingest"]).await;
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(text(&out.stderr).contains("--all"), "{}", text(&out.stderr));
    let out = worker(&[], &["--env-file", "/nonexistent/.env", "migrate"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).starts_with("error: cannot read env file /nonexistent/.env"));
}

#[tokio::test]
async fn settings_from_an_env_file_and_secret_files() {
    let env = TestEnv::new().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("db-url");
    std::fs::write(&secret, format!("{}\n", env.mapping_db)).unwrap();
    let env_file = dir.path().join("worker.env");
    std::fs::write(
        &env_file,
        format!("DATABASE_URL_FILE={}\n", secret.display()),
    )
    .unwrap();
    let out = worker(&[], &["--env-file", env_file.to_str().unwrap(), "migrate"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains(&env.mapping_db),
        "no secret in logs"
    );
    assert_eq!(
        count(
            &env.mapping_db,
            "SELECT count(*) FROM schema_history_ledger"
        )
        .await,
        3
    );
}
