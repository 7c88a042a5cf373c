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
    testbed::connect(url)
        .await
        .unwrap()
        .query_one(sql, &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn migrate_then_ingest_all_then_again() {
    let env = TestEnv::new().await.unwrap();
    env.s3.put_tree(Path::new(SAMPLE_DATA)).await.unwrap();
    let vars = env.vars();

    let out = worker(&vars, &["migrate"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "mapping+measurement database: applied ledger/V1__ledger_and_quarantine, ledger/V2__object_versions, \
         ledger/V3__versions_without_lock, mapping/V1__sensors, mapping/V2__sensor_versions, measurements/V1__measurements, \
         measurements/V2__measurement_days, measurements/V3__measurement_versions, \
         measurements/V4__anomalies, measurements/V5__measurement_hours; measurements is a plain \
         table (TimescaleDB not available)\n"
    );
    let out = worker(&vars, &["migrate"]).await;
    assert_eq!(
        text(&out.stdout),
        "mapping+measurement database: already up to date; measurements is a plain table (TimescaleDB not available)\n"
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
