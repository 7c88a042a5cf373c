//! Ingestion of single objects against real PostgreSQL and a real S3 server (SPEC §2, §3, §6).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use std::time::Duration;

use sensor_pipeline::config::{ContractSettings, DatabaseTimeouts, LimitSettings};
use sensor_pipeline::ingest::{Disposition, Ingestor, Outcome};
use sensor_pipeline::store::migrate::{migrate, MeasurementsTable};
use sensor_pipeline::store::Databases;
use testbed::TestEnv;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const U1: &str = "cd613e30-d8f1-4adf-91b7-584a2265b1f5";
const U2: &str = "1e2feb89-414c-443c-9027-c4d1c386bbc4";

struct Harness {
    env: TestEnv,
    ingestor: Ingestor,
    mapping: tokio_postgres::Client,
    measurements: tokio_postgres::Client,
    /// Whether the ingestor queues detection (else the merge settles every rollup hour).
    detect: bool,
}

impl Harness {
    /// Whether `measurements` is a TimescaleDB hypertable (the tests run on a server that preloads
    /// it when `TEST_DATABASE_URL` points at one); CI's plain PostgreSQL gives a plain table.
    async fn hypertable(&self) -> bool {
        testbed::scalar(
            &self.measurements,
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
        )
        .await
    }

    async fn new() -> Self {
        Self::from_env(TestEnv::new().await.unwrap()).await
    }

    async fn from_env(env: TestEnv) -> Self {
        let db = env.database_settings();
        migrate(&db).await.unwrap();
        let dbs = Databases::connect(&db, 4).unwrap();
        let store = env.s3.store().clone();
        let ingestor = Ingestor::new(store, dbs, ContractSettings::default());
        let mapping = testbed::connect(&env.mapping_db).await.unwrap();
        let measurements = testbed::connect(&env.measurements_db).await.unwrap();
        Self {
            env,
            ingestor,
            mapping,
            measurements,
            detect: true,
        }
    }

    /// [`Harness::new`] with anomaly detection off: a replacing merge settles the rollup's
    /// hours itself instead of leaving those it cannot tell to the detection it would queue.
    async fn without_detection() -> Self {
        let mut h = Self::new().await;
        h.ingestor = h.ingestor.detect_anomalies(false);
        h.detect = false;
        h
    }

    /// An ingestor of its own with these session timeouts and limits.
    fn ingestor_with(&self, timeouts: DatabaseTimeouts, limits: LimitSettings) -> Ingestor {
        let mut settings = self.env.database_settings();
        settings.timeouts = timeouts;
        Ingestor::new(
            self.env.s3.store().clone(),
            Databases::connect(&settings, 2).unwrap(),
            ContractSettings::default(),
        )
        .limits(limits)
    }

    /// Puts an object written `secs` seconds from now (later than what was put without).
    async fn put_written(&self, key: &str, body: impl Into<Vec<u8>>, secs: u64) {
        self.env.s3.put(key, body).await.unwrap();
        self.env.s3.set_written_at(key, later(secs)).unwrap();
    }

    async fn put_and_ingest(&self, key: &str, body: impl Into<Vec<u8>>) -> Outcome {
        self.env.s3.put(key, body).await.unwrap();
        self.ingestor.ingest(key, None).await.unwrap()
    }

    /// Returns once `n` sessions of the measurement database wait for a lock.
    async fn until_waiting(&self, n: i64) {
        loop {
            let now: i64 = testbed::scalar(
                &self.measurements,
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .await;
            if now == n {
                return;
            }
            tokio::task::yield_now().await;
        }
    }

    /// A connection whose open transaction holds an older write of one key (`U1` at
    /// 2013-01-20T08:00:00Z, value 7, version 0: it loses to any object), uncommitted, with its
    /// page index and rollup entries.
    async fn older_write_held(&self) -> tokio_postgres::Client {
        let held = testbed::connect(&self.env.measurements_db).await.unwrap();
        held.batch_execute(&format!(
            "BEGIN;
             INSERT INTO measurements (sensor_uuid, ts, value, version)
                 VALUES ('{U1}', '2013-01-20T08:00:00Z', 7, 0);
             INSERT INTO measurement_hours (sensor_uuid, hour, readings, low, high, exact, total,
                                            first_at, first_value, last_at, last_value)
                 VALUES ('{U1}', '2013-01-20T08:00:00Z', 1, 7, 7, true, 7,
                         '2013-01-20T08:00:00Z', 7, '2013-01-20T08:00:00Z', 7);
             INSERT INTO measurement_days (sensor_uuid, day, readings)
                 VALUES ('{U1}', '2013-01-20T00:00:00Z', 1);"
        ))
        .await
        .unwrap();
        held
    }

    /// All readings as (uuid, RFC 3339 UTC with microseconds, value), ordered.
    /// Also checks that the page index (`measurement_days`) counts exactly the stored rows and
    /// that the hourly rollup (`measurement_hours`) holds their exact count, and their low and
    /// high (exact ones without detection; with it, bounds around them where a correction left
    /// the hour to its detection).
    async fn readings(&self) -> Vec<(String, String, f64)> {
        let drift = testbed::derived_drift(&self.measurements).await.unwrap();
        assert_eq!(
            drift,
            Vec::<String>::new(),
            "derived tables disagree with measurements"
        );
        if !self.detect {
            let inexact = testbed::inexact_hours(&self.measurements).await.unwrap();
            assert_eq!(inexact, 0, "hours left inexact without detection");
        }
        testbed::rows(
            &self.measurements,
            "SELECT sensor_uuid::text,
                    to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), value
             FROM measurements ORDER BY sensor_uuid, ts",
        )
        .await
    }

    async fn quarantine(
        &self,
        client: &tokio_postgres::Client,
    ) -> Vec<(String, i64, String, String)> {
        testbed::rows(
            client,
            "SELECT object_key, line, convert_from(raw, 'UTF8'), reason FROM ingest_quarantine
             ORDER BY object_key, line",
        )
        .await
    }

    /// (key, status, rows_ok, rows_rejected, reason) of every ledger entry in `client`'s database.
    async fn ledger(
        &self,
        client: &tokio_postgres::Client,
    ) -> Vec<(String, String, i64, i64, Option<String>)> {
        let rows: Vec<(String, String, i64, i64, Option<String>)> = testbed::rows(
            client,
            "SELECT object_key, status, rows_ok, rows_rejected, reason FROM ingest_ledger
             ORDER BY object_key, id",
        )
        .await;
        rows.into_iter()
            .map(|(k, s, ok, rejected, reason)| {
                (k, s, ok, rejected, reason.map(|r| on_plain_table(&r)))
            })
            .collect()
    }

    async fn sensor_names(&self) -> Vec<String> {
        let rows = self
            .mapping
            .query("SELECT sensor_name FROM sensors ORDER BY 1", &[])
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }

    async fn count(&self, client: &tokio_postgres::Client, table: &str) -> i64 {
        testbed::scalar(client, &format!("SELECT count(*) FROM {table}")).await
    }
}

/// A write time `secs` seconds from now (whole seconds, as Last-Modified has them).
/// A server message as it reads on a plain table: on a TimescaleDB hypertable PostgreSQL names the
/// chunk a refused row went to (`"_hyper_1_3_chunk"`, numbered by the chunks created, rolled back
/// ones included) where on a plain table it names `"measurements"`.
fn on_plain_table(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("\"_hyper_") {
        out.push_str(&rest[..i]);
        let name = &rest[i + 1..];
        match name.find('"') {
            Some(j) if name[..j].ends_with("_chunk") => {
                out.push_str("\"measurements\"");
                rest = &name[j + 1..];
            }
            _ => {
                out.push('"');
                rest = name;
            }
        }
    }
    out.push_str(rest);
    out
}

/// [`on_plain_table`] of a failed object's reason.
fn plain(disposition: Disposition) -> Disposition {
    match disposition {
        Disposition::Failed(reason) => Disposition::Failed(on_plain_table(&reason)),
        other => other,
    }
}

fn later(secs: u64) -> std::time::SystemTime {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(now + secs)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn reading(uuid: &str, ts: &str, value: f64) -> (String, String, f64) {
    (uuid.to_string(), ts.to_string(), value)
}

fn assert_done(o: &Outcome, ok: u64, rejected: u64) {
    assert_eq!(o.disposition, Disposition::Done, "{o:?}");
    assert_eq!((o.rows_ok, o.rows_rejected), (ok, rejected), "{o:?}");
}

/// Uploads the sample objects and ingests them.
async fn ingest_sample_data(h: &Harness) -> Vec<Outcome> {
    let keys = h
        .env
        .s3
        .put_tree(&Path::new(FIXTURES).join("sample-data"))
        .await
        .unwrap();
    ingest_keys(h, &keys).await
}

/// Ingests the current versions of `keys`, mapping first as `ingest --all` does (the order does
/// not change the end state).
async fn ingest_keys(h: &Harness, keys: &[String]) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for key in keys
        .iter()
        .filter(|k| k.starts_with("mapping/"))
        .chain(keys.iter().filter(|k| !k.starts_with("mapping/")))
    {
        outcomes.push(h.ingestor.ingest(key, None).await.unwrap());
    }
    outcomes
}

/// Readings and mapping equal `sample-expected/`, exactly, and so do the ledgers.
async fn assert_sample_end_state(h: &Harness) {
    assert_sample_end_state_values_only(h).await;
    let expected_dir = Path::new(FIXTURES).join("sample-expected");
    // Per-object statuses and counts, from both ledgers.
    let objects: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(expected_dir.join("objects.json")).unwrap())
            .unwrap();
    let want: BTreeMap<String, (String, i64, i64)> = objects
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                (
                    v["status"].as_str().unwrap().to_string(),
                    v["rows_ok"].as_i64().unwrap(),
                    v["rows_rejected"].as_i64().unwrap(),
                ),
            )
        })
        .collect();
    let mut got = BTreeMap::new();
    let same = h.env.mapping_db == h.env.measurements_db;
    let clients: Vec<&tokio_postgres::Client> = if same {
        vec![&h.mapping]
    } else {
        vec![&h.mapping, &h.measurements]
    };
    for c in clients {
        for (key, status, ok, rejected, _) in h.ledger(c).await {
            assert!(got.insert(key, (status, ok, rejected)).is_none());
        }
    }
    assert_eq!(got, want);
}

#[tokio::test]
async fn sample_data_produces_the_expected_end_state() {
    let h = Harness::new().await;
    let outcomes = ingest_sample_data(&h).await;
    assert!(
        outcomes.iter().all(|o| o.disposition == Disposition::Done),
        "{outcomes:?}"
    );
    assert_sample_end_state(&h).await;
    // The two quarantined rows of rules-sample.csv, with line, raw line and reason.
    assert_eq!(
        h.quarantine(&h.measurements).await,
        vec![
            (
                "timeseries/2013/rules-sample.csv".to_string(),
                5,
                format!("not-a-number;2013-01-20T11:00:00Z;C;{U1}"),
                "sensor_value \"not-a-number\" is not a decimal number".to_string()
            ),
            (
                "timeseries/2013/rules-sample.csv".to_string(),
                6,
                "23.0;2013-01-20T12:00:00Z;C;not-a-uuid".to_string(),
                "sensor_uuid \"not-a-uuid\" is not a UUID (expected e.g. cd613e30-d8f1-4adf-91b7-584a2265b1f5)".to_string()
            ),
        ]
    );
}

#[tokio::test]
async fn sample_data_with_mapping_and_measurements_in_two_databases() {
    let h = Harness::from_env(TestEnv::with_two_databases().await.unwrap()).await;
    ingest_sample_data(&h).await;
    assert_sample_end_state(&h).await;
    // Each ledger holds its own objects; the mapping database has no readings and vice versa.
    assert_eq!(h.ledger(&h.mapping).await.len(), 1);
    assert_eq!(h.ledger(&h.measurements).await.len(), 3);
    async fn exists(c: &tokio_postgres::Client, table: &str) -> bool {
        c.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await
            .unwrap()
            .get(0)
    }
    assert!(!exists(&h.mapping, "measurements").await);
    assert!(!exists(&h.measurements, "sensors").await);
    assert!(exists(&h.mapping, "ingest_quarantine").await);
}

#[tokio::test]
async fn ingesting_everything_twice_changes_no_row() {
    let h = Harness::new().await;
    let first = ingest_sample_data(&h).await;
    let keys: Vec<String> = first.iter().map(|o| o.version.key.clone()).collect();
    const MEAS: &str = "SELECT sensor_uuid::text || ts::text || xmin::text || ctid::text FROM measurements ORDER BY 1";
    const SENS: &str =
        "SELECT sensor_uuid::text || xmin::text || ctid::text FROM sensors ORDER BY 1";
    let before = (
        snapshot(&h.measurements, MEAS).await,
        snapshot(&h.mapping, SENS).await,
    );

    // Same versions again: skipped through the ledger.
    let again = ingest_keys(&h, &keys).await;
    assert!(
        again
            .iter()
            .all(|o| o.disposition == Disposition::AlreadyDone),
        "{again:?}"
    );
    // Same versions again with the ledger forgotten: merged, and still no row is rewritten (a row
    // is only overwritten by a version that beats the one it came from).
    h.measurements
        .execute("DELETE FROM ingest_ledger", &[])
        .await
        .unwrap();
    let again = ingest_keys(&h, &keys).await;
    assert!(
        again.iter().all(|o| o.disposition == Disposition::Done),
        "{again:?}"
    );
    let after = (
        snapshot(&h.measurements, MEAS).await,
        snapshot(&h.mapping, SENS).await,
    );
    assert_eq!(before, after);
    assert_sample_end_state_values_only(&h).await;
}

#[tokio::test]
async fn a_newer_version_with_the_same_rows_takes_them_over() {
    let h = Harness::new().await;
    ingest_sample_data(&h).await;
    // New versions with the same rows (a trailing blank line changes the ETag), written later:
    // every row they hold now comes from them, so that a version written between the two cannot
    // win over them later.
    for key in [
        "mapping/mapping.csv",
        "timeseries/2013/part-0000.csv",
        "timeseries/2013/part-0001.csv",
    ] {
        let mut body = std::fs::read(Path::new(FIXTURES).join("sample-data").join(key)).unwrap();
        body.extend_from_slice(b"\n\n");
        h.env.s3.put(key, body).await.unwrap();
        h.env.s3.set_written_at(key, later(60)).unwrap();
        let o = h.ingestor.ingest(key, None).await.unwrap();
        assert_eq!(o.disposition, Disposition::Done);
    }
    let ledger = h.ledger(&h.measurements).await;
    assert_eq!(ledger.len(), 7, "one entry per object version: {ledger:?}");
    assert_sample_end_state_values_only(&h).await;
    // Every reading and name comes from the newest version of its key.
    for (client, table) in [(&h.measurements, "measurements"), (&h.mapping, "sensors")] {
        let by_source: Vec<(String, bool, i64)> = client
            .query(
                &format!(
                    "SELECT v.object_key,
                            v.written_at = (SELECT max(written_at) FROM object_versions w
                                            WHERE w.object_key = v.object_key),
                            count(*)
                     FROM {table} JOIN object_versions v USING (version) GROUP BY 1, 2 ORDER BY 1, 2"
                ),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let total: i64 = by_source.iter().map(|(.., n)| n).sum();
        assert_eq!(total, h.count(client, table).await, "{by_source:?}");
        let from_older: Vec<_> = by_source.iter().filter(|(_, newest, _)| !newest).collect();
        assert_eq!(from_older, Vec::<&(String, bool, i64)>::new());
    }
}

/// An overwrite keeps the hourly rollup exact: an hour whose every reading a newer object
/// rewrote takes that object's low and high (the old extremes are gone), an hour it rewrote in
/// part is recomputed from the stored readings (its untouched reading is still the high).
#[tokio::test]
async fn overwritten_hours_keep_their_exact_low_and_high() {
    let h = Harness::new().await;
    let old = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:00:00Z;{U1};10\n\
         2013-01-20T08:30:00Z;{U1};20\n\
         2013-01-20T09:00:00Z;{U1};30\n\
         2013-01-20T09:30:00Z;{U1};40\n"
    );
    assert_done(&h.put_and_ingest("timeseries/old.csv", old).await, 4, 0);
    let new = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:00:00Z;{U1};1\n\
         2013-01-20T08:30:00Z;{U1};2\n\
         2013-01-20T09:30:00Z;{U1};3\n\
         2013-01-20T10:00:00Z;{U1};4\n"
    );
    h.env.s3.put("timeseries/new.csv", new).await.unwrap();
    h.env
        .s3
        .set_written_at("timeseries/new.csv", later(60))
        .unwrap();
    let o = h.ingestor.ingest("timeseries/new.csv", None).await.unwrap();
    assert_done(&o, 4, 0);
    let hours: Vec<(String, i64, f64, f64, bool)> = testbed::rows(
        &h.measurements,
        "SELECT to_char(hour AT TIME ZONE 'UTC', 'HH24'), readings, low, high, exact
             FROM measurement_hours ORDER BY hour",
    )
    .await;
    assert_eq!(
        hours,
        vec![
            ("08".to_string(), 2, 1.0, 2.0, true),
            ("09".to_string(), 2, 3.0, 30.0, true),
            ("10".to_string(), 1, 4.0, 4.0, true),
        ]
    );
    assert_eq!(
        h.readings().await,
        vec![
            reading(U1, "2013-01-20T08:00:00.000000Z", 1.0),
            reading(U1, "2013-01-20T08:30:00.000000Z", 2.0),
            reading(U1, "2013-01-20T09:00:00.000000Z", 30.0),
            reading(U1, "2013-01-20T09:30:00.000000Z", 3.0),
            reading(U1, "2013-01-20T10:00:00.000000Z", 4.0),
        ]
    );
}

/// Readings of two sensors over three hours, for the corrections below.
fn own_old() -> String {
    format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:00:00Z;{U1};10\n\
         2013-01-20T08:20:00Z;{U1};5\n\
         2013-01-20T08:40:00Z;{U1};20\n\
         2013-01-20T09:00:00Z;{U1};30\n\
         2013-01-20T09:30:00Z;{U1};40\n\
         2013-01-20T10:00:00Z;{U1};50\n\
         2013-01-20T08:00:00Z;{U2};1\n\
         2013-01-20T08:10:00Z;{U2};5\n\
         2013-01-20T08:20:00Z;{U2};6\n\
         2013-01-20T08:50:00Z;{U2};9\n"
    )
}

/// A correction of some of [`own_old`]'s readings.
fn own_new() -> String {
    format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:20:00Z;{U1};6\n\
         2013-01-20T08:40:00Z;{U1};7\n\
         2013-01-20T09:00:00Z;{U1};3\n\
         2013-01-20T09:30:00Z;{U1};4\n\
         2013-01-20T08:10:00Z;{U2};100\n\
         2013-01-20T08:20:00Z;{U2};2\n"
    )
}

/// A correction whose span reaches outside the years 1 to 9999 (year 0 here) cannot name its
/// span in the replacing `DELETE`'s literals: its readings are upserted instead, to the same end
/// state.
#[tokio::test]
async fn a_correction_of_readings_in_year_0_is_upserted() {
    let h = Harness::without_detection().await;
    let csv = |a: f64, b: f64| {
        format!(
            "timestamp;sensor_uuid;sensor_value\n\
             0000-06-01T00:00:00Z;{U1};{a}\n\
             2013-01-20T08:00:00Z;{U1};{b}\n"
        )
    };
    assert_done(
        &h.put_and_ingest("timeseries/old.csv", csv(1.0, 2.0)).await,
        2,
        0,
    );
    h.put_written("timeseries/new.csv", csv(3.0, 4.0), 60).await;
    let outcome = h.ingestor.ingest("timeseries/new.csv", None).await;
    assert_done(&outcome.unwrap(), 2, 0);
    assert_eq!(
        h.readings().await,
        vec![
            // Year 0 is 1 BC, which `to_char` writes as year 0001.
            reading(U1, "0001-06-01T00:00:00.000000Z", 3.0),
            reading(U1, "2013-01-20T08:00:00.000000Z", 4.0),
        ]
    );
}

/// A correction that rewrites readings it has (the stored readings within its span are exactly
/// its keys) replaces them: the stored rows are deleted and its readings copied in, and the
/// rollup stays exact — an hour whose extremes it removed is recomputed, an hour it removed only
/// inner readings of keeps its bounds, an hour it rewrote whole takes its bounds. The replacing
/// statement is seen waiting on a row the test holds. (With detection off: with it on, the
/// recomputing is left to detection, see the next test.)
#[tokio::test]
async fn a_correction_of_its_own_readings_replaces_them_and_keeps_the_rollup_exact() {
    let h = Harness::without_detection().await;
    assert_done(
        &h.put_and_ingest("timeseries/old.csv", own_old()).await,
        10,
        0,
    );
    h.put_written("timeseries/new.csv", own_new(), 60).await;
    let holder = testbed::connect(&h.env.measurements_db).await.unwrap();
    holder
        .batch_execute(&format!(
            "BEGIN; SELECT FROM measurements
             WHERE sensor_uuid = '{U1}' AND ts = '2013-01-20T09:00:00Z' FOR UPDATE"
        ))
        .await
        .unwrap();
    let ingest = h.ingestor.ingest("timeseries/new.csv", None);
    let watch = async {
        let pid = loop {
            let rows = h
                .measurements
                .query(
                    "SELECT pid FROM pg_stat_activity
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap();
            if let Some(row) = rows.first() {
                break row.get::<_, i32>(0);
            }
            tokio::task::yield_now().await;
        };
        // One read of pg_stat_activity may pair a backend's current wait with the text of the
        // statement before (the texts are copied first, the waits read live): read the text
        // again now that the statement is held on the test's row.
        let waiting: String = h
            .measurements
            .query_one(
                "SELECT left(query, 30) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        holder.batch_execute("COMMIT").await.unwrap();
        waiting
    };
    let (outcome, waiting) = tokio::join!(ingest, watch);
    assert_eq!(waiting, "COPY (DELETE FROM measurements");
    assert_done(&outcome.unwrap(), 6, 0);
    assert_eq!(
        h.readings().await,
        vec![
            reading(U2, "2013-01-20T08:00:00.000000Z", 1.0),
            reading(U2, "2013-01-20T08:10:00.000000Z", 100.0),
            reading(U2, "2013-01-20T08:20:00.000000Z", 2.0),
            reading(U2, "2013-01-20T08:50:00.000000Z", 9.0),
            reading(U1, "2013-01-20T08:00:00.000000Z", 10.0),
            reading(U1, "2013-01-20T08:20:00.000000Z", 6.0),
            reading(U1, "2013-01-20T08:40:00.000000Z", 7.0),
            reading(U1, "2013-01-20T09:00:00.000000Z", 3.0),
            reading(U1, "2013-01-20T09:30:00.000000Z", 4.0),
            reading(U1, "2013-01-20T10:00:00.000000Z", 50.0),
        ]
    );
    let hours: Vec<(String, String, i64, f64, f64)> = testbed::rows(
        &h.measurements,
        "SELECT sensor_uuid::text, to_char(hour AT TIME ZONE 'UTC', 'HH24'), readings, low,
                    high
             FROM measurement_hours WHERE exact ORDER BY sensor_uuid, hour",
    )
    .await;
    let hour = |u: &str, hh: &str, n: i64, low: f64, high: f64| {
        (u.to_string(), hh.to_string(), n, low, high)
    };
    assert_eq!(
        hours,
        vec![
            hour(U2, "08", 4, 1.0, 100.0),
            hour(U1, "08", 3, 6.0, 10.0),
            hour(U1, "09", 2, 3.0, 4.0),
            hour(U1, "10", 1, 50.0, 50.0),
        ]
    );
}

/// With detection on, the same correction leaves the hour whose bounds it cannot tell inexact,
/// its bounds around the readings' (what a plot reads the hour's readings for), and the
/// detection it queued settles it from the stored readings: the object holds only two of the
/// hour's three readings. The hour it rewrote whole is fed to the detector from memory.
#[tokio::test]
async fn a_correction_leaves_the_hours_it_cannot_tell_to_its_detection() {
    let h = Harness::new().await;
    assert_done(
        &h.put_and_ingest("timeseries/old.csv", own_old()).await,
        10,
        0,
    );
    h.put_written("timeseries/new.csv", own_new(), 60).await;
    let outcome = h.ingestor.ingest("timeseries/new.csv", None).await.unwrap();
    assert_done(&outcome, 6, 0);
    let hours = || async {
        h.measurements
            .query(
                "SELECT sensor_uuid::text, to_char(hour AT TIME ZONE 'UTC', 'HH24'), readings,
                        low, high, exact
                 FROM measurement_hours ORDER BY sensor_uuid, hour",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
            .collect::<Vec<(String, String, i64, f64, f64, bool)>>()
    };
    let hour = |u: &str, hh: &str, n: i64, low: f64, high: f64, exact: bool| {
        (u.to_string(), hh.to_string(), n, low, high, exact)
    };
    // U1's 08 lost its low (5) and high (20) and still holds 10: bounds around 6 to 10.
    assert_eq!(
        hours().await,
        vec![
            hour(U2, "08", 4, 1.0, 100.0, true),
            hour(U1, "08", 3, 5.0, 20.0, false),
            hour(U1, "09", 2, 3.0, 4.0, true),
            hour(U1, "10", 1, 50.0, 50.0, true),
        ]
    );
    let alerts = sensor_pipeline::alerts::Alerts::new(
        Databases::connect(&h.env.database_settings(), 2).unwrap(),
        sensor_pipeline::config::AnomalySettings::from_env(
            &sensor_pipeline::config::Env::from_map(Vec::<(String, String)>::new()),
        )
        .unwrap(),
    );
    let fresh: Vec<_> = outcome.fresh.as_deref().into_iter().collect();
    let done = alerts
        .detect_held(Some(&outcome.anomaly_work), &fresh)
        .await
        .unwrap();
    assert_eq!((done.settled, done.held), (1, 2));
    assert_eq!(
        hours().await,
        vec![
            hour(U2, "08", 4, 1.0, 100.0, true),
            hour(U1, "08", 3, 6.0, 10.0, true),
            hour(U1, "09", 2, 3.0, 4.0, true),
            hour(U1, "10", 1, 50.0, 50.0, true),
        ]
    );
    // (`readings` checks the rollup against the stored readings.)
    assert_eq!(h.readings().await.len(), 10);
}

/// A correction whose span holds an older reading it does not have (another object's, which it
/// beats) must not remove it: the replacing `DELETE` meets it among the rows it streams back,
/// the worker stops reading there, rolls back and upserts, and the reading stays.
#[tokio::test]
async fn a_correction_missing_an_older_reading_in_its_span_keeps_it() {
    let h = Harness::without_detection().await;
    let old = [
        ("08:00", 1.0),
        ("08:10", 2.0),
        ("08:20", 3.0),
        ("08:30", 4.0),
        ("08:40", 5.0),
    ];
    let new = [
        ("08:00", 10.0),
        ("08:20", 30.0),
        ("08:30", 40.0),
        ("08:40", 50.0),
    ];
    let outcome = h
        .put_and_ingest("timeseries/old.csv", u1_on_jan_20(&old))
        .await;
    assert_done(&outcome, 5, 0);
    h.put_written("timeseries/new.csv", u1_on_jan_20(&new), 60)
        .await;
    let outcome = h.ingestor.ingest("timeseries/new.csv", None).await;
    assert_done(&outcome.unwrap(), 4, 0);
    let end = [
        ("08:00", 10.0),
        ("08:10", 2.0),
        ("08:20", 30.0),
        ("08:30", 40.0),
        ("08:40", 50.0),
    ];
    assert_eq!(h.readings().await, u1_readings_on_jan_20(&end));
    // The connection is fine after the abandoned stream: another correction is replaced.
    h.put_written(
        "timeseries/newer.csv",
        u1_on_jan_20(&[("08:10", 20.0)]),
        120,
    )
    .await;
    let outcome = h.ingestor.ingest("timeseries/newer.csv", None).await;
    assert_done(&outcome.unwrap(), 1, 0);
    assert_eq!(h.readings().await[1].2, 20.0);
}

/// A measurement file of sensor U1 on 2013-01-20 (time of day `HH:MM`, value).
fn u1_on_jan_20(rows: &[(&str, f64)]) -> String {
    let mut csv = String::from("timestamp;sensor_uuid;sensor_value\n");
    for (at, value) in rows {
        csv.push_str(&format!("2013-01-20T{at}:00Z;{U1};{value}\n"));
    }
    csv
}

/// The stored readings [`u1_on_jan_20`] writes, as [`Harness::readings`] lists them.
fn u1_readings_on_jan_20(rows: &[(&str, f64)]) -> Vec<(String, String, f64)> {
    rows.iter()
        .map(|(at, value)| reading(U1, &format!("2013-01-20T{at}:00.000000Z"), *value))
        .collect()
}

/// A correction whose span holds a newer reading it does not have (written later than the
/// correction) replaces only what it beats: the newer reading stays, and the hour it shares with
/// it — whose bounds neither the readings removed nor those outside the correction's span tell —
/// is recomputed from the stored readings (with detection off, as above).
#[tokio::test]
async fn a_correction_around_a_newer_reading_replaces_only_what_it_beats() {
    let h = Harness::without_detection().await;
    let put = |key: &'static str, body: String, secs: u64| {
        let h = &h;
        async move {
            h.put_written(key, body, secs).await;
            h.ingestor.ingest(key, None).await.unwrap()
        }
    };
    let oldest = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:00:00Z;{U1};10\n\
         2013-01-20T08:20:00Z;{U1};5\n\
         2013-01-20T08:40:00Z;{U1};20\n"
    );
    assert_done(&put("timeseries/oldest.csv", oldest, 60).await, 3, 0);
    let newest = format!("timestamp;sensor_uuid;sensor_value\n2013-01-20T08:30:00Z;{U1};1\n");
    assert_done(&put("timeseries/newest.csv", newest, 180).await, 1, 0);
    let middle = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:20:00Z;{U1};6\n\
         2013-01-20T08:40:00Z;{U1};7\n"
    );
    assert_done(&put("timeseries/middle.csv", middle, 120).await, 2, 0);
    // (`readings` also checks the rollup: 4 readings, low 1, high 10, exact.)
    assert_eq!(
        h.readings().await,
        vec![
            reading(U1, "2013-01-20T08:00:00.000000Z", 10.0),
            reading(U1, "2013-01-20T08:20:00.000000Z", 6.0),
            reading(U1, "2013-01-20T08:30:00.000000Z", 1.0),
            reading(U1, "2013-01-20T08:40:00.000000Z", 7.0),
        ]
    );
}

/// A correction with a key that is not stored yet is upserted, not replaced: another writer may
/// be inserting that key while it waits for a row the correction deleted. Here writer B inserts
/// the new key 08:10 and then waits for 08:20, which the correction has deleted while it waits
/// for 08:40 (held by C). A replace would go on to copy 08:10 in and wait for B: a deadlock in
/// which PostgreSQL aborts B, the first to wait. Instead the correction rolls back its deletes,
/// B goes on, and the correction's upsert waits for B and wins over its write.
#[tokio::test]
async fn a_correction_with_a_new_key_never_deadlocks_a_writer_of_that_key() {
    let h = Harness::new().await;
    let old = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:20:00Z;{U1};20\n\
         2013-01-20T08:40:00Z;{U1};40\n"
    );
    assert_done(&h.put_and_ingest("timeseries/old.csv", old).await, 2, 0);
    let new = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:10:00Z;{U1};1\n\
         2013-01-20T08:20:00Z;{U1};2\n\
         2013-01-20T08:40:00Z;{U1};4\n"
    );
    h.put_written("timeseries/new.csv", new, 60).await;
    let b = testbed::connect(&h.env.measurements_db).await.unwrap();
    let c = testbed::connect(&h.env.measurements_db).await.unwrap();
    // B: an older write (version 0) of the new key, uncommitted.
    b.batch_execute(&format!(
        "BEGIN; INSERT INTO measurements (sensor_uuid, ts, value, version)
             VALUES ('{U1}', '2013-01-20T08:10:00Z', 7, 0)"
    ))
    .await
    .unwrap();
    // C: holds 08:40.
    c.batch_execute(&format!(
        "BEGIN; SELECT FROM measurements
         WHERE sensor_uuid = '{U1}' AND ts = '2013-01-20T08:40:00Z' FOR UPDATE"
    ))
    .await
    .unwrap();
    let ingest = h.ingestor.ingest("timeseries/new.csv", None);
    let others = async {
        // The correction has deleted 08:20 and waits for 08:40.
        h.until_waiting(1).await;
        let touch = b.execute(
            "UPDATE measurements SET value = value
             WHERE sensor_uuid = $1::text::uuid AND ts = '2013-01-20T08:20:00Z'",
            &[&U1],
        );
        let release = async {
            // B waits for 08:20 too: let the correction go on.
            h.until_waiting(2).await;
            c.batch_execute("COMMIT").await.unwrap();
        };
        let (touched, ()) = tokio::join!(touch, release);
        assert_eq!(touched.unwrap(), 1, "B is not aborted");
        b.batch_execute(&format!(
            "INSERT INTO measurement_hours AS h (sensor_uuid, hour, readings, low, high, total,
                                                 first_at, first_value, last_at, last_value)
                 VALUES ('{U1}', '2013-01-20T08:00:00Z', 1, 7, 7, 7, '2013-01-20T08:10:00Z', 7,
                         '2013-01-20T08:10:00Z', 7)
                 ON CONFLICT (sensor_uuid, hour) DO UPDATE SET readings = h.readings + 1,
                     low = least(h.low, 7), high = greatest(h.high, 7), total = h.total + 7,
                     first_at = least(h.first_at, EXCLUDED.first_at),
                     first_value = CASE WHEN EXCLUDED.first_at < h.first_at THEN 7
                         ELSE h.first_value END,
                     last_at = greatest(h.last_at, EXCLUDED.last_at),
                     last_value = CASE WHEN EXCLUDED.last_at > h.last_at THEN 7
                         ELSE h.last_value END;
             UPDATE measurement_days SET readings = readings + 1
                 WHERE sensor_uuid = '{U1}' AND day = '2013-01-20T00:00:00Z';
             COMMIT"
        ))
        .await
        .unwrap();
    };
    let (outcome, ()) = tokio::join!(ingest, others);
    assert_done(&outcome.unwrap(), 3, 0);
    assert_eq!(
        h.readings().await,
        vec![
            reading(U1, "2013-01-20T08:10:00.000000Z", 1.0),
            reading(U1, "2013-01-20T08:20:00.000000Z", 2.0),
            reading(U1, "2013-01-20T08:40:00.000000Z", 4.0),
        ]
    );
}

/// An object whose sensors read over several days copies the rollup and page index rows of the
/// days strictly inside each sensor's span, and upserts those of the first and last day, which
/// the sensor's neighbouring objects may share: here the second object's first day is the first
/// object's last, and one hour holds readings of both.
#[tokio::test]
async fn objects_over_several_days_share_their_first_and_last_days() {
    let h = Harness::new().await;
    let first = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-01T10:00:00Z;{U1};1\n\
         2013-01-02T10:00:00Z;{U1};2\n\
         2013-01-02T10:20:00Z;{U1};3\n\
         2013-01-03T23:59:59Z;{U1};4\n\
         2013-01-04T10:00:00Z;{U1};5\n\
         2013-01-02T05:00:00Z;{U2};6\n\
         2013-01-05T05:00:00Z;{U2};7\n"
    );
    assert_done(&h.put_and_ingest("timeseries/first.csv", first).await, 7, 0);
    let second = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-04T10:30:00Z;{U1};8\n\
         2013-01-05T00:00:00Z;{U1};9\n\
         2013-01-07T12:00:00Z;{U1};10\n"
    );
    assert_done(
        &h.put_and_ingest("timeseries/second.csv", second).await,
        3,
        0,
    );
    assert_eq!(
        h.readings().await,
        vec![
            reading(U2, "2013-01-02T05:00:00.000000Z", 6.0),
            reading(U2, "2013-01-05T05:00:00.000000Z", 7.0),
            reading(U1, "2013-01-01T10:00:00.000000Z", 1.0),
            reading(U1, "2013-01-02T10:00:00.000000Z", 2.0),
            reading(U1, "2013-01-02T10:20:00.000000Z", 3.0),
            reading(U1, "2013-01-03T23:59:59.000000Z", 4.0),
            reading(U1, "2013-01-04T10:00:00.000000Z", 5.0),
            reading(U1, "2013-01-04T10:30:00.000000Z", 8.0),
            reading(U1, "2013-01-05T00:00:00.000000Z", 9.0),
            reading(U1, "2013-01-07T12:00:00.000000Z", 10.0),
        ]
    );
    let days: Vec<(String, String, i64)> = testbed::rows(
        &h.measurements,
        "SELECT sensor_uuid::text, to_char(day AT TIME ZONE 'UTC', 'MM-DD'), readings
         FROM measurement_days ORDER BY 1 DESC, 2",
    )
    .await;
    let day = |u: &str, d: &str, n: i64| (u.to_string(), d.to_string(), n);
    assert_eq!(
        days,
        vec![
            day(U1, "01-01", 1),
            day(U1, "01-02", 2),
            day(U1, "01-03", 1),
            day(U1, "01-04", 2),
            day(U1, "01-05", 1),
            day(U1, "01-07", 1),
            day(U2, "01-02", 1),
            day(U2, "01-05", 1),
        ]
    );
}

/// Another transaction writing an hour inside an object's days, not yet committed (so the
/// object's check cannot see it), makes the object's `COPY` of that hour's rollup row wait, and
/// fail when it commits: the object's rows are then upserted, and the hour counts both.
#[tokio::test]
async fn an_hour_another_writer_adds_meanwhile_sends_the_rollup_copy_back_to_the_upsert() {
    let h = Harness::without_detection().await;
    let csv = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-01T10:00:00Z;{U1};1\n\
         2013-01-02T10:00:00Z;{U1};2\n\
         2013-01-03T10:00:00Z;{U1};3\n"
    );
    h.env.s3.put("timeseries/days.csv", csv).await.unwrap();
    let b = testbed::connect(&h.env.measurements_db).await.unwrap();
    b.batch_execute(&format!(
        "BEGIN;
         INSERT INTO measurements (sensor_uuid, ts, value, version)
             VALUES ('{U1}', '2013-01-02T10:30:00Z', 7, 0);
         INSERT INTO measurement_hours (sensor_uuid, hour, readings, low, high, total,
                                        first_at, first_value, last_at, last_value)
             VALUES ('{U1}', '2013-01-02T10:00:00Z', 1, 7, 7, 7, '2013-01-02T10:30:00Z', 7,
                     '2013-01-02T10:30:00Z', 7);
         INSERT INTO measurement_days (sensor_uuid, day, readings)
             VALUES ('{U1}', '2013-01-02T00:00:00Z', 1)"
    ))
    .await
    .unwrap();
    let ingest = h.ingestor.ingest("timeseries/days.csv", None);
    let other = async {
        // The object's rollup `COPY` waits for B's hour (on a hypertable its readings' `COPY`
        // waits first, for the chunk B's uncommitted reading created): let B commit.
        h.until_waiting(1).await;
        let waiting: String = testbed::scalar(
            &h.measurements,
            "SELECT left(query, 22) FROM pg_stat_activity
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .await;
        let expected = match h.hypertable().await {
            true => "COPY measurements (sen",
            false => "COPY measurement_hours",
        };
        assert_eq!(waiting, expected);
        b.batch_execute("COMMIT").await.unwrap();
    };
    let (outcome, ()) = tokio::join!(ingest, other);
    assert_done(&outcome.unwrap(), 3, 0);
    assert_eq!(
        h.readings().await,
        vec![
            reading(U1, "2013-01-01T10:00:00.000000Z", 1.0),
            reading(U1, "2013-01-02T10:00:00.000000Z", 2.0),
            reading(U1, "2013-01-02T10:30:00.000000Z", 7.0),
            reading(U1, "2013-01-03T10:00:00.000000Z", 3.0),
        ]
    );
    let hour: (i64, f64, f64) = testbed::rows(
        &h.measurements,
        "SELECT readings, low, high FROM measurement_hours
         WHERE hour = '2013-01-02T10:00:00Z'",
    )
    .await
    .remove(0);
    assert_eq!(hour, (2, 2.0, 7.0));
}

/// Row identities including their physical version (`xmin`, `ctid`): unchanged iff never rewritten.
async fn snapshot(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Readings and mapping equal `sample-expected/`, exactly (the ledgers aside, which may hold more
/// versions).
async fn assert_sample_end_state_values_only(h: &Harness) {
    let expected_dir = Path::new(FIXTURES).join("sample-expected");
    // Measurements, exactly.
    let want = testbed::data::expected_readings(&expected_dir.join("measurements.csv"));
    let got = testbed::data::stored_readings(&h.measurements).await;
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
    // Mapping, exactly.
    let mut want: Vec<(String, String)> = std::fs::read_to_string(expected_dir.join("sensors.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let (u, n) = l.split_once(',').unwrap();
            (u.to_string(), n.to_string())
        })
        .collect();
    want.sort();
    let got: Vec<(String, String)> = testbed::rows(
        &h.mapping,
        "SELECT sensor_uuid::text, sensor_name FROM sensors ORDER BY 1",
    )
    .await;
    assert_eq!(got, want);
}

#[tokio::test]
async fn timestamp_forms_and_time_zones() {
    let h = Harness::new().await;
    let csv = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:00:00Z;{U1};1\n\
         2013-01-20 08:01:00+00;{U1};2\n\
         2013-01-20T09:02:00+0100;{U1};3\n\
         2013-01-20T09:03:00+01:00;{U1};4\n\
         2013-01-20T09:04:00.1234567;{U1};5\n\
         2013-07-20T10:05:00;{U1};6\n\
         2013-01-20t03:06:00-05:00;{U1};7\n"
    );
    let o = h.put_and_ingest("timeseries/tz.csv", csv).await;
    assert_done(&o, 7, 0);
    assert_eq!(
        h.readings().await,
        vec![
            reading(U1, "2013-01-20T08:00:00.000000Z", 1.0),
            reading(U1, "2013-01-20T08:01:00.000000Z", 2.0),
            reading(U1, "2013-01-20T08:02:00.000000Z", 3.0),
            reading(U1, "2013-01-20T08:03:00.000000Z", 4.0),
            reading(U1, "2013-01-20T08:04:00.123456Z", 5.0),
            reading(U1, "2013-01-20T08:06:00.000000Z", 7.0),
            reading(U1, "2013-07-20T08:05:00.000000Z", 6.0),
        ]
    );
}

#[tokio::test]
async fn daylight_saving_ambiguous_and_nonexistent_hours() {
    let h = Harness::new().await;
    let csv = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-10-27T02:30:00;{U1};1\n\
         2013-03-31T02:30:00;{U1};2\n\
         2013-03-31T03:30:00;{U1};3\n"
    );
    let o = h.put_and_ingest("timeseries/dst.csv", csv).await;
    assert_done(&o, 2, 1);
    assert_eq!(
        h.readings().await,
        vec![
            reading(U1, "2013-03-31T01:30:00.000000Z", 3.0),
            reading(U1, "2013-10-27T00:30:00.000000Z", 1.0),
        ]
    );
    assert_eq!(
        h.quarantine(&h.measurements).await,
        vec![(
            "timeseries/dst.csv".into(),
            3,
            format!("2013-03-31T02:30:00;{U1};2"),
            "timestamp \"2013-03-31T02:30:00\" does not exist in Europe/Berlin (skipped by the daylight-saving change)"
                .into()
        )]
    );
}

#[tokio::test]
async fn decimal_comma_signs_and_exponents() {
    let h = Harness::new().await;
    let csv = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:00:00Z;{U1};21,75\n\
         2013-01-20T08:01:00Z;{U1};-1,5e2\n\
         2013-01-20T08:02:00Z;{U1};+0.25\n\
         2013-01-20T08:03:00Z;{U1};1.234,5\n\
         2013-01-20T08:04:00Z;{U1};inf\n"
    );
    let o = h.put_and_ingest("timeseries/num.csv", csv).await;
    assert_done(&o, 3, 2);
    let values: Vec<f64> = h.readings().await.into_iter().map(|r| r.2).collect();
    assert_eq!(values, vec![21.75, -150.0, 0.25]);
    let reasons: Vec<String> = h
        .quarantine(&h.measurements)
        .await
        .into_iter()
        .map(|q| q.3)
        .collect();
    assert_eq!(
        reasons,
        vec![
            "sensor_value \"1.234,5\" is not a decimal number",
            "sensor_value \"inf\" is not a decimal number"
        ]
    );
}

#[tokio::test]
async fn uuid_forms_are_stored_canonical() {
    let h = Harness::new().await;
    let csv = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:00:00Z;{};1\n\
         2013-01-20T08:01:00Z;{};2\n\
         2013-01-20T08:02:00Z;{{{U1}}};3\n\
         2013-01-20T08:03:00Z;urn:uuid:{U1};4\n\
         2013-01-20T08:04:00Z;{}x;5\n",
        U1.to_uppercase(),
        U1.replace('-', ""),
        U1
    );
    let o = h.put_and_ingest("timeseries/uuid.csv", csv).await;
    assert_done(&o, 4, 1);
    let uuids: Vec<String> = h.readings().await.into_iter().map(|r| r.0).collect();
    assert_eq!(uuids, vec![U1; 4]);
}

#[tokio::test]
async fn bom_crlf_quoted_fields_and_blank_lines() {
    let h = Harness::new().await;
    let csv = format!(
        "\u{feff}\"timestamp\";\"sensor_uuid\";\"sensor_value\";\"note\"\r\n\
         \r\n\
         \"2013-01-20T08:00:00Z\";\"{U1}\";\"1,5\";\"a;b\"\r\n\
         \r\n\
         2013-01-20T08:01:00Z;{U1};2;\"multi\r\nline \"\"quoted\"\"\"\r\n\
         \r\n\
         2013-01-20T08:02:00Z;{U1};x;\"\"\r\n"
    );
    let o = h.put_and_ingest("timeseries/dialect.csv", csv).await;
    assert_done(&o, 2, 1);
    assert_eq!(
        h.readings().await,
        vec![
            reading(U1, "2013-01-20T08:00:00.000000Z", 1.5),
            reading(U1, "2013-01-20T08:01:00.000000Z", 2.0)
        ]
    );
    // Line numbers count physical lines, including blank ones and the quoted line break.
    assert_eq!(
        h.quarantine(&h.measurements).await,
        vec![(
            "timeseries/dialect.csv".into(),
            8,
            format!("2013-01-20T08:02:00Z;{U1};x;\"\""),
            "sensor_value \"x\" is not a decimal number".into()
        )]
    );
}

#[tokio::test]
async fn reordered_and_extra_columns() {
    let h = Harness::new().await;
    let csv = format!(
        "site;SENSOR_VALUE; Sensor_UUID ;unit;TimeStamp\nplant-1;3,5;{U1};C;2013-01-20T08:00:00Z\n"
    );
    let o = h.put_and_ingest("timeseries/cols.csv", csv).await;
    assert_done(&o, 1, 0);
    assert_eq!(
        h.readings().await,
        vec![reading(U1, "2013-01-20T08:00:00.000000Z", 3.5)]
    );
    let mapping = format!("location;Sensor_Name;sensor_uuid\nhall-1;  boiler  ;{U1}\n");
    let o = h.put_and_ingest("mapping/m.csv", mapping).await;
    assert_done(&o, 1, 0);
    assert_eq!(h.sensor_names().await, vec!["boiler"]);
}

#[tokio::test]
async fn short_and_long_rows_are_quarantined() {
    let h = Harness::new().await;
    let csv = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:00:00Z;{U1}\n\
         2013-01-20T08:01:00Z;{U1};1;extra\n\
         2013-01-20T08:02:00Z;{U1};2\n"
    );
    let o = h.put_and_ingest("timeseries/short.csv", csv).await;
    assert_done(&o, 1, 2);
    assert_eq!(
        h.quarantine(&h.measurements).await,
        vec![
            (
                "timeseries/short.csv".into(),
                2,
                format!("2013-01-20T08:00:00Z;{U1}"),
                "row has 2 field(s), the header has 3".into()
            ),
            (
                "timeseries/short.csv".into(),
                3,
                format!("2013-01-20T08:01:00Z;{U1};1;extra"),
                "row has 4 field(s), the header has 3".into()
            ),
        ]
    );
}

#[tokio::test]
async fn non_utf8_field_is_quarantined_with_its_raw_bytes() {
    let h = Harness::new().await;
    let mut csv = b"timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;".to_vec();
    csv.extend_from_slice(U1.as_bytes());
    csv.extend_from_slice(b";1\xff\n");
    let o = h.put_and_ingest("timeseries/latin1.csv", csv).await;
    assert_done(&o, 0, 1);
    let row = h
        .measurements
        .query_one("SELECT raw, reason FROM ingest_quarantine", &[])
        .await
        .unwrap();
    let raw: Vec<u8> = row.get(0);
    let mut want = format!("2013-01-20T08:00:00Z;{U1};1").into_bytes();
    want.push(0xff);
    assert_eq!(raw, want);
    assert_eq!(row.get::<_, String>(1), "sensor_value is not valid UTF-8");
}

#[tokio::test]
async fn duplicate_keys_in_one_file_last_line_wins() {
    let h = Harness::new().await;
    let csv = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:00:00Z;{U1};1\n\
         2013-01-20T09:00:00+01:00;{U1};2\n\
         2013-01-20T08:00:00Z;{U2};5\n\
         2013-01-20T10:00:00+02:00;{U1};3\n"
    );
    let o = h.put_and_ingest("timeseries/dup.csv", csv).await;
    // Every valid line counts, including the ones a later line overwrote.
    assert_done(&o, 4, 0);
    assert_eq!(
        h.readings().await,
        vec![
            reading(U2, "2013-01-20T08:00:00.000000Z", 5.0),
            reading(U1, "2013-01-20T08:00:00.000000Z", 3.0),
        ]
    );
}

/// An object with more valid readings than the ingestor holds in memory (per object, or left of
/// the budget of all objects) stages the held ones when the next arrives, and the rest as they
/// stream: the last line of a key still wins, across the held and the streamed part, and
/// rejected rows are quarantined with their own lines.
#[tokio::test]
async fn an_object_too_large_to_hold_is_staged_as_it_streams() {
    let csv = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:00:00Z;{U1};1\n\
         2013-01-20T08:00:00Z;{U1};9\n\
         2013-01-20T08:00:00Z;{U2};5\n\
         2013-01-20T09:00:00Z;{U1};3\n\
         2013-01-20T09:00:00Z;{U1}\n\
         2013-01-20T08:00:00Z;{U2};6\n"
    );
    let want = vec![
        reading(U2, "2013-01-20T08:00:00.000000Z", 6.0),
        reading(U1, "2013-01-20T08:00:00.000000Z", 9.0),
        reading(U1, "2013-01-20T09:00:00.000000Z", 3.0),
    ];
    let quarantined = vec![(
        "timeseries/large.csv".to_string(),
        6,
        format!("2013-01-20T09:00:00Z;{U1}"),
        "row has 2 field(s), the header has 3".to_string(),
    )];
    // Each case on databases of its own: the object ingested by the ingestor `configure` makes,
    // and the same readings stored.
    let ingest = |configure: fn(Ingestor) -> Ingestor| {
        let (csv, want) = (csv.clone(), want.clone());
        async move {
            let h = Harness::new().await;
            h.env.s3.put("timeseries/large.csv", csv).await.unwrap();
            let ingestor = configure(h.ingestor.clone());
            let o = ingestor.ingest("timeseries/large.csv", None).await.unwrap();
            assert_done(&o, 5, 1);
            assert_eq!(h.readings().await, want);
            (h, ingestor, o)
        }
    };
    // Three held, then staged: detection reads the stored readings back.
    let (h, _, o) = ingest(|i| i.hold_most(3)).await;
    assert!(o.fresh.is_none());
    assert_eq!(o.anomaly_work.len(), 2);
    assert_eq!(h.quarantine(&h.measurements).await, quarantined);

    // All five held: written straight into the table, and handed to detection as stored.
    let (h, _, o) = ingest(|i| i.hold_most(5)).await;
    let fresh = o.fresh.expect("the readings held");
    let u1 = uuid::Uuid::parse_str(U1).unwrap();
    assert_eq!(
        fresh.readings[&u1],
        vec![(1_358_668_800_000_000, 9.0), (1_358_672_400_000_000, 3.0)]
    );
    assert_eq!(o.anomaly_work.len(), 2);
    assert_eq!(h.quarantine(&h.measurements).await, quarantined);

    // A budget of three readings for all objects at once: the same as holding three. The
    // budget is given back when the object is done, so the next object is held again.
    let (h, ingestor, o) = ingest(|i| i.hold_budget(3)).await;
    assert!(o.fresh.is_none());
    let next = format!("timestamp;sensor_uuid;sensor_value\n2013-01-21T08:00:00Z;{U1};4\n");
    h.env.s3.put("timeseries/next.csv", next).await.unwrap();
    let o = ingestor.ingest("timeseries/next.csv", None).await.unwrap();
    assert_done(&o, 1, 0);
    assert!(o.fresh.is_some());
}

/// A staged object over more hours than the reader gathers: when its readings are all new, they
/// are inserted and the insert counts the rollup and page index rows from them; a repeated key,
/// or a stored reading within its span, sends it to the upsert. The harness checks the rollup
/// and page index against the readings after each test.
#[tokio::test]
async fn an_object_with_more_hours_than_gathered_counts_them_as_it_inserts() {
    let h = Harness::new().await;
    let ingestor = h.ingestor.clone().hold_most(0).hours_most(2);
    let ingest = |key: &'static str, csv: String| {
        let ingestor = &ingestor;
        let s3 = &h.env.s3;
        async move {
            s3.put(key, csv).await.unwrap();
            ingestor.ingest(key, None).await.unwrap()
        }
    };
    let o = ingest(
        "timeseries/long.csv",
        format!(
            "timestamp;sensor_uuid;sensor_value\n\
             2013-01-20T08:00:00Z;{U1};1\n\
             2013-01-20T08:30:00Z;{U1};2\n\
             2013-01-20T08:15:00Z;{U2};5\n\
             2013-01-20T09:00:00Z;{U1};3\n\
             2013-01-20T09:00:00Z;{U1}\n\
             2013-01-21T11:00:00Z;{U1};4\n\
             2013-01-20T10:00:00Z;{U2};6\n"
        ),
    )
    .await;
    assert_done(&o, 6, 1);
    assert!(!o.met_stored, "inserted, not upserted");
    let hours = || {
        testbed::rows::<(String, String, i64, String)>(
            &h.measurements,
            "SELECT sensor_uuid::text, to_char(hour AT TIME ZONE 'UTC', 'DD HH24'), readings,
                    concat_ws(' ', low, high, first_value, last_value)
             FROM measurement_hours ORDER BY 1 DESC, 2",
        )
    };
    let hour = |u: &str, at: &str, n: i64, low_high_first_last: &str| {
        (
            u.to_string(),
            at.to_string(),
            n,
            low_high_first_last.to_string(),
        )
    };
    assert_eq!(
        hours().await,
        vec![
            hour(U1, "20 08", 2, "1 2 1 2"),
            hour(U1, "20 09", 1, "3 3 3 3"),
            hour(U1, "21 11", 1, "4 4 4 4"),
            hour(U2, "20 08", 1, "5 5 5 5"),
            hour(U2, "20 10", 1, "6 6 6 6"),
        ]
    );
    let days = || {
        testbed::rows::<(String, String, i64)>(
            &h.measurements,
            "SELECT sensor_uuid::text, to_char(day AT TIME ZONE 'UTC', 'DD'), readings
             FROM measurement_days ORDER BY 1 DESC, 2",
        )
    };
    let day = |u: &str, d: &str, n: i64| (u.to_string(), d.to_string(), n);
    assert_eq!(
        days().await,
        vec![day(U1, "20", 3), day(U1, "21", 1), day(U2, "20", 2)]
    );

    // New readings, one key twice: the insert fails on it and the upsert keeps the last line.
    // Then readings within the stored span of U2: upserted.
    let twice = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-22T08:00:00Z;{U1};7\n2013-01-22T09:00:00Z;{U1};8\n\
         2013-01-22T10:00:00Z;{U1};9\n2013-01-22T08:00:00Z;{U1};10\n"
    );
    let within = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T09:00:00Z;{U2};11\n2013-01-20T11:00:00Z;{U2};12\n\
         2013-01-20T12:00:00Z;{U2};13\n"
    );
    for (key, csv, rows) in [
        ("timeseries/twice.csv", twice, 4),
        ("timeseries/within.csv", within, 3),
    ] {
        let o = ingest(key, csv).await;
        assert_done(&o, rows, 0);
        assert!(o.met_stored, "{key} upserted");
    }
    assert_eq!(
        h.readings().await,
        vec![
            reading(U2, "2013-01-20T08:15:00.000000Z", 5.0),
            reading(U2, "2013-01-20T09:00:00.000000Z", 11.0),
            reading(U2, "2013-01-20T10:00:00.000000Z", 6.0),
            reading(U2, "2013-01-20T11:00:00.000000Z", 12.0),
            reading(U2, "2013-01-20T12:00:00.000000Z", 13.0),
            reading(U1, "2013-01-20T08:00:00.000000Z", 1.0),
            reading(U1, "2013-01-20T08:30:00.000000Z", 2.0),
            reading(U1, "2013-01-20T09:00:00.000000Z", 3.0),
            reading(U1, "2013-01-21T11:00:00.000000Z", 4.0),
            reading(U1, "2013-01-22T08:00:00.000000Z", 10.0),
            reading(U1, "2013-01-22T09:00:00.000000Z", 8.0),
            reading(U1, "2013-01-22T10:00:00.000000Z", 9.0),
        ]
    );
    assert_eq!(
        days().await,
        vec![
            day(U1, "20", 3),
            day(U1, "21", 1),
            day(U1, "22", 3),
            day(U2, "20", 5)
        ]
    );
}

/// Objects with repeated keys, rejected rows and keys shared with other objects, ingested in a
/// scrambled order by ingestors that hold 5, 20 or all of an object's readings: the stored
/// readings are exactly what a model says — for each key the last line of the newest object that
/// has it — and the page index and hourly rollup agree with them.
/// An object too large to hold whose held readings are new streams the rest of its valid rows
/// straight into the table, in chunks of as many readings as it held: rejected rows before and
/// after the switch are quarantined with their own lines, and the rollup and page index follow
/// chunk by chunk (the harness checks them against the readings; a sensor's day here spans two
/// chunks). Readings stored beside its own on a day of its spans tell detection to read on; a
/// key repeated after the switch sends it back to be read again and staged (the last line wins,
/// each rejected row is quarantined once); a correction of stored readings is staged without
/// streaming in.
#[tokio::test]
async fn a_large_new_object_streams_straight_into_the_table() {
    let h = Harness::new().await;
    let ingestor = h.ingestor.clone().hold_most(2);
    let ingest = |key: &'static str, csv: String| {
        let ingestor = &ingestor;
        let s3 = &h.env.s3;
        async move {
            s3.put(key, csv).await.unwrap();
            ingestor.ingest(key, None).await.unwrap()
        }
    };
    let path = |o: &Outcome| (o.streamed_in, o.read_again, o.met_stored);

    let o = ingest(
        "timeseries/large.csv",
        format!(
            "timestamp;sensor_uuid;sensor_value\n\
             2013-01-20T08:00:00Z;{U1};1\n\
             2013-01-20T08:10:00Z;{U1}\n\
             2013-01-20T08:15:00Z;{U2};5\n\
             2013-01-20T09:00:00Z;{U1};3\n\
             2013-01-20T09:30:00Z;{U2}\n\
             2013-01-21T10:00:00Z;{U2};6\n"
        ),
    )
    .await;
    assert_done(&o, 4, 2);
    assert_eq!(path(&o), (true, false, false));
    assert_eq!(o.anomaly_work.len(), 2);
    assert_eq!(
        h.readings().await,
        vec![
            reading(U2, "2013-01-20T08:15:00.000000Z", 5.0),
            reading(U2, "2013-01-21T10:00:00.000000Z", 6.0),
            reading(U1, "2013-01-20T08:00:00.000000Z", 1.0),
            reading(U1, "2013-01-20T09:00:00.000000Z", 3.0),
        ]
    );
    let short = "row has 2 field(s), the header has 3".to_string();
    let quarantined =
        |key: &str, line: i64, raw: String| (key.to_string(), line, raw, short.clone());
    assert_eq!(
        h.quarantine(&h.measurements).await,
        vec![
            quarantined(
                "timeseries/large.csv",
                3,
                format!("2013-01-20T08:10:00Z;{U1}")
            ),
            quarantined(
                "timeseries/large.csv",
                6,
                format!("2013-01-20T09:30:00Z;{U2}")
            ),
        ]
    );

    // New keys on a day that holds stored readings: streamed in, and detection reads on.
    let o = ingest(
        "timeseries/later.csv",
        format!(
            "timestamp;sensor_uuid;sensor_value\n\
             2013-01-20T10:00:00Z;{U1};7\n\
             2013-01-20T11:00:00Z;{U1};8\n\
             2013-01-20T12:00:00Z;{U1};9\n"
        ),
    )
    .await;
    assert_done(&o, 3, 0);
    assert_eq!(path(&o), (true, false, true));

    // A key repeated after the switch: read again and staged, the last line winning (the
    // repeat sends the staged rows to the upsert, which counts as meeting a stored key).
    let o = ingest(
        "timeseries/repeated.csv",
        format!(
            "timestamp;sensor_uuid;sensor_value\n\
             2013-01-22T08:00:00Z;{U1};1\n\
             2013-01-22T09:00:00Z;{U1};2\n\
             2013-01-22T08:00:00Z;{U1};3\n\
             2013-01-22T10:00:00Z;{U1}\n"
        ),
    )
    .await;
    assert_done(&o, 3, 1);
    assert_eq!(path(&o), (false, true, true));

    // Repeated within one chunk after the switch (the held two and the next make the first
    // chunk; the repeat is found before the second is written): the same.
    let o = ingest(
        "timeseries/repeated-in-chunk.csv",
        format!(
            "timestamp;sensor_uuid;sensor_value\n\
             2013-01-23T08:00:00Z;{U2};1\n\
             2013-01-23T09:00:00Z;{U2};2\n\
             2013-01-23T10:00:00Z;{U2};3\n\
             2013-01-23T11:00:00Z;{U2};4\n\
             2013-01-23T11:00:00Z;{U2};5\n"
        ),
    )
    .await;
    assert_done(&o, 5, 0);
    assert_eq!(path(&o), (false, true, true));

    // A correction of stored readings, written later: staged at the switch, read once.
    let key = "timeseries/correction.csv";
    h.env
        .s3
        .put(
            key,
            format!(
                "timestamp;sensor_uuid;sensor_value\n\
                 2013-01-20T08:00:00Z;{U1};11\n\
                 2013-01-20T08:15:00Z;{U2};15\n\
                 2013-01-20T09:00:00Z;{U1};13\n"
            ),
        )
        .await
        .unwrap();
    h.env.s3.set_written_at(key, later(60)).unwrap();
    let o = ingestor.ingest(key, None).await.unwrap();
    assert_done(&o, 3, 0);
    assert_eq!(path(&o), (false, false, true));

    assert_eq!(
        h.readings().await,
        vec![
            reading(U2, "2013-01-20T08:15:00.000000Z", 15.0),
            reading(U2, "2013-01-21T10:00:00.000000Z", 6.0),
            reading(U2, "2013-01-23T08:00:00.000000Z", 1.0),
            reading(U2, "2013-01-23T09:00:00.000000Z", 2.0),
            reading(U2, "2013-01-23T10:00:00.000000Z", 3.0),
            reading(U2, "2013-01-23T11:00:00.000000Z", 5.0),
            reading(U1, "2013-01-20T08:00:00.000000Z", 11.0),
            reading(U1, "2013-01-20T09:00:00.000000Z", 13.0),
            reading(U1, "2013-01-20T10:00:00.000000Z", 7.0),
            reading(U1, "2013-01-20T11:00:00.000000Z", 8.0),
            reading(U1, "2013-01-20T12:00:00.000000Z", 9.0),
            reading(U1, "2013-01-22T08:00:00.000000Z", 3.0),
            reading(U1, "2013-01-22T09:00:00.000000Z", 2.0),
        ]
    );
    let mut want = vec![
        quarantined(
            "timeseries/large.csv",
            3,
            format!("2013-01-20T08:10:00Z;{U1}"),
        ),
        quarantined(
            "timeseries/large.csv",
            6,
            format!("2013-01-20T09:30:00Z;{U2}"),
        ),
        quarantined(
            "timeseries/repeated.csv",
            5,
            format!("2013-01-22T10:00:00Z;{U1}"),
        ),
    ];
    want.sort();
    assert_eq!(h.quarantine(&h.measurements).await, want);
}

/// A row another transaction writes meanwhile into a key an object streams straight in fails the
/// stream when it commits; the object is read again to be staged. Overwritten in between, it is
/// not ingested under the version first read (a transient error: the retry reads the new one).
#[tokio::test]
async fn a_large_object_overwritten_before_it_is_read_again_is_tried_again() {
    let h = Harness::new().await;
    let held = h.older_write_held().await;
    let key = "timeseries/large.csv";
    let first = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:30:00Z;{U2};4\n\
         2013-01-20T08:00:00Z;{U1};1\n\
         2013-01-20T09:00:00Z;{U1};2\n"
    );
    let read = h.env.s3.put(key, first).await.unwrap();
    let ingestor = h.ingestor.clone().hold_most(1);
    let overwrite = async {
        // The stream waits on the uncommitted row: overwrite the object, then commit the row.
        h.until_waiting(1).await;
        let now = h
            .env
            .s3
            .put(
                key,
                format!("timestamp;sensor_uuid;sensor_value\n2013-01-20T10:00:00Z;{U1};5\n"),
            )
            .await
            .unwrap();
        held.batch_execute("COMMIT").await.unwrap();
        now
    };
    let (outcome, now) = tokio::join!(ingestor.ingest(key, None), overwrite);
    assert_ne!(read, now);
    assert_eq!(
        outcome.unwrap_err().to_string(),
        format!(
            "object {key:?} was overwritten while it was ingested (ETag {read:?}, now {now:?})"
        )
    );
    assert_eq!(
        h.readings().await,
        vec![reading(U1, "2013-01-20T08:00:00.000000Z", 7.0)]
    );
    assert_eq!(h.ledger(&h.measurements).await, vec![]);

    // Tried again: the version there now.
    let o = ingestor.ingest(key, None).await.unwrap();
    assert_done(&o, 1, 0);
    assert_eq!(o.version.etag, now);
    assert_eq!(
        h.readings().await,
        vec![
            reading(U1, "2013-01-20T08:00:00.000000Z", 7.0),
            reading(U1, "2013-01-20T10:00:00.000000Z", 5.0),
        ]
    );
}

#[tokio::test]
async fn any_mix_of_held_staged_new_and_overwritten_readings_ends_as_the_model_says() {
    let h = Harness::new().await;
    let mut state = 0x5eed_u64;
    let mut next = move |n: u64| {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    };
    let sensors = [U1, U2, "0a0b0c0d-0000-4000-8000-000000000003"];
    let objects: usize = 8;
    let mut model: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut bodies = Vec::new();
    for o in 0..objects {
        let mut csv = String::from("timestamp;sensor_uuid;sensor_value\n");
        let mut lines: Vec<(String, String, f64)> = Vec::new();
        for line in 0..(20 + next(40)) {
            let sensor = sensors[next(3) as usize];
            // 12 instants over three hours: keys repeat within and across objects.
            let minute = next(12) * 15;
            let ts = format!("2013-01-20T{:02}:{:02}:00Z", 8 + minute / 60, minute % 60);
            if next(10) == 0 {
                csv.push_str(&format!("{ts};{sensor};not-a-number\n"));
                continue;
            }
            let value = (o as u64 * 1000 + line) as f64;
            csv.push_str(&format!("{ts};{sensor};{value}\n"));
            let stored = format!("{}.000000Z", ts.trim_end_matches('Z'));
            lines.push((sensor.to_string(), stored, value));
        }
        // Object `o` is written after every object before it: its lines win over theirs.
        for (sensor, ts, value) in lines {
            model.insert((sensor, ts), value);
        }
        bodies.push(csv);
    }
    let mut order: Vec<usize> = (0..objects).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, next(i as u64 + 1) as usize);
    }
    for o in order {
        let key = format!("timeseries/mix/{o}.csv");
        h.env.s3.put(&key, bodies[o].clone()).await.unwrap();
        h.env.s3.set_written_at(&key, later(60 + o as u64)).unwrap();
        let ingestor = h.ingestor.clone().hold_most([5, 20, usize::MAX][o % 3]);
        let outcome = ingestor.ingest(&key, None).await.unwrap();
        assert_eq!(outcome.disposition, Disposition::Done, "{key}");
    }
    let mut want: Vec<(String, String, f64)> = model
        .into_iter()
        .map(|((sensor, ts), value)| (sensor, ts, value))
        .collect();
    want.sort_by(|a, b| {
        let uuid = |s: &str| uuid::Uuid::parse_str(s).unwrap();
        (uuid(&a.0), &a.1).cmp(&(uuid(&b.0), &b.1))
    });
    assert_eq!(h.readings().await, want);
}

/// New readings are inserted without an upsert when nothing is stored in their spans; a row
/// another transaction writes meanwhile (invisible to that check, committed while the insert waits
/// on it) sends the object back to the upsert, where the newer write wins as always.
#[tokio::test]
async fn a_row_written_meanwhile_sends_new_readings_back_to_the_upsert() {
    let h = Harness::new().await;
    let held = h.older_write_held().await;
    let csv = format!(
        "timestamp;sensor_uuid;sensor_value\n\
         2013-01-20T08:30:00Z;{U2};4\n\
         2013-01-20T08:00:00Z;{U1};1\n\
         2013-01-20T09:00:00Z;{U1};2\n"
    );
    h.env.s3.put("timeseries/meanwhile.csv", csv).await.unwrap();
    let ingest = h.ingestor.ingest("timeseries/meanwhile.csv", None);
    let release = async {
        // The object's insert waits on the uncommitted row: then commit it.
        h.until_waiting(1).await;
        held.batch_execute("COMMIT").await.unwrap();
    };
    let (outcome, ()) = tokio::join!(ingest, release);
    assert_done(&outcome.unwrap(), 3, 0);
    assert_eq!(
        h.readings().await,
        vec![
            reading(U2, "2013-01-20T08:30:00.000000Z", 4.0),
            reading(U1, "2013-01-20T08:00:00.000000Z", 1.0),
            reading(U1, "2013-01-20T09:00:00.000000Z", 2.0),
        ]
    );
}

#[tokio::test]
async fn later_object_wins_and_mapping_name_is_replaced() {
    let h = Harness::new().await;
    h.put_and_ingest(
        "timeseries/a.csv",
        format!("timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{U1};1\n"),
    )
    .await;
    h.put_and_ingest(
        "timeseries/b.csv",
        format!("timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{U1};2\n"),
    )
    .await;
    assert_eq!(
        h.readings().await,
        vec![reading(U1, "2013-01-20T08:00:00.000000Z", 2.0)]
    );
    h.put_and_ingest(
        "mapping/a.csv",
        format!("sensor_uuid;sensor_name\n{U1};old\n"),
    )
    .await;
    h.put_and_ingest(
        "mapping/b.csv",
        format!("sensor_uuid;sensor_name\n{U1};new\n{U1};newer\n"),
    )
    .await;
    assert_eq!(h.sensor_names().await, vec!["newer"]);
}

#[tokio::test]
async fn gzip_objects() {
    let h = Harness::new().await;
    let csv = format!("timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{U1};1\n2013-01-20T08:01:00Z;{U1};2\n");
    let o = h
        .put_and_ingest("timeseries/2013/a.csv.gz", gzip(csv.as_bytes()))
        .await;
    assert_done(&o, 2, 0);
    // Concatenated gzip members are one stream.
    let mut two = gzip(b"timestamp;sensor_uuid;sensor_value\n");
    two.extend(gzip(format!("2013-01-20T08:02:00Z;{U1};3\n").as_bytes()));
    let o = h.put_and_ingest("timeseries/2013/b.csv.gz", two).await;
    assert_done(&o, 1, 0);
    assert_eq!(h.count(&h.measurements, "measurements").await, 3);
}

#[tokio::test]
async fn corrupt_gzip_fails_the_object_and_stores_nothing() {
    let h = Harness::new().await;
    // Enough rows that the corruption sits well after the first rows were staged.
    let mut csv = String::from("timestamp;sensor_uuid;sensor_value\n");
    for i in 0..20_000 {
        csv.push_str(&format!("2013-01-20T08:00:00.{i:06}Z;{U1};{i}\n"));
    }
    let mut gz = gzip(csv.as_bytes());
    let mid = gz.len() / 2;
    for b in &mut gz[mid..mid + 64] {
        *b ^= 0x5a;
    }
    let o = h.put_and_ingest("timeseries/bad.csv.gz", gz).await;
    let Disposition::Failed(reason) = &o.disposition else {
        panic!("{o:?}")
    };
    assert!(reason.starts_with("corrupt gzip data: "), "{reason}");
    assert_eq!(h.count(&h.measurements, "measurements").await, 0);
    assert_eq!(h.count(&h.measurements, "ingest_quarantine").await, 0);
    let ledger = h.ledger(&h.measurements).await;
    assert_eq!(ledger.len(), 1);
    assert_eq!(
        (ledger[0].1.as_str(), ledger[0].2, ledger[0].3),
        ("failed", 0, 0)
    );
    assert_eq!(ledger[0].4.as_deref(), Some(reason.as_str()));
    // Not gzip at all, and truncated gzip: failed too.
    let o = h
        .put_and_ingest("timeseries/plain.csv.gz", csv.clone())
        .await;
    assert!(
        matches!(o.disposition, Disposition::Failed(ref r) if r.starts_with("corrupt gzip data")),
        "{o:?}"
    );
    let gz = gzip(csv.as_bytes());
    let o = h
        .put_and_ingest("timeseries/truncated.csv.gz", gz[..gz.len() - 100].to_vec())
        .await;
    assert!(
        matches!(o.disposition, Disposition::Failed(ref r) if r.starts_with("corrupt gzip data")),
        "{o:?}"
    );
    assert_eq!(h.count(&h.measurements, "measurements").await, 0);
}

#[tokio::test]
async fn missing_column_or_header_fails_the_object() {
    let h = Harness::new().await;
    let o = h
        .put_and_ingest(
            "timeseries/nocol.csv",
            format!("timestamp;sensor_uuid\n2013-01-20T08:00:00Z;{U1}\n"),
        )
        .await;
    assert_eq!(
        o.disposition,
        Disposition::Failed(
            "the header lacks required column(s) sensor_value; it has: timestamp, sensor_uuid"
                .into()
        )
    );
    let o = h.put_and_ingest("timeseries/empty.csv", "").await;
    assert_eq!(
        o.disposition,
        Disposition::Failed("the file has no header row".into())
    );
    let o = h
        .put_and_ingest("mapping/bad.csv", b"sensor_uuid;sensor_\xffname\n".to_vec())
        .await;
    assert_eq!(
        o.disposition,
        Disposition::Failed("the header row is not valid UTF-8".into())
    );
    assert_eq!(h.count(&h.measurements, "measurements").await, 0);
    assert_eq!(h.count(&h.mapping, "sensors").await, 0);
    let ledger = h.ledger(&h.mapping).await;
    let statuses: Vec<(&str, &str)> = ledger
        .iter()
        .map(|l| (l.0.as_str(), l.1.as_str()))
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("mapping/bad.csv", "failed"),
            ("timeseries/empty.csv", "failed"),
            ("timeseries/nocol.csv", "failed")
        ]
    );
    // Trying the same version again records another attempt and still stores nothing.
    let o = h
        .ingestor
        .ingest("timeseries/nocol.csv", None)
        .await
        .unwrap();
    assert!(matches!(o.disposition, Disposition::Failed(_)));
    let attempts: i32 = h
        .mapping
        .query_one(
            "SELECT attempts FROM ingest_ledger WHERE object_key = 'timeseries/nocol.csv'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 2);
}

#[tokio::test]
async fn ignored_keys_are_recorded_not_ingested() {
    let h = Harness::new().await;
    let csv = format!("timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{U1};1\n");
    for key in [
        "other/a.csv",
        "timeseries/a.txt",
        "timeseries/a.csv.zip",
        "README.md",
    ] {
        let o = h.put_and_ingest(key, csv.clone()).await;
        assert!(
            matches!(o.disposition, Disposition::Ignored(_)),
            "{key}: {o:?}"
        );
    }
    assert_eq!(h.count(&h.measurements, "measurements").await, 0);
    let ledger = h.ledger(&h.mapping).await;
    let got: Vec<(&str, &str, Option<&str>)> = ledger
        .iter()
        .map(|l| (l.0.as_str(), l.1.as_str(), l.4.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "README.md",
                "ignored",
                Some("key is outside the mapping/ and timeseries/ prefixes")
            ),
            (
                "other/a.csv",
                "ignored",
                Some("key is outside the mapping/ and timeseries/ prefixes")
            ),
            (
                "timeseries/a.csv.zip",
                "ignored",
                Some("key does not end in .csv or .csv.gz")
            ),
            (
                "timeseries/a.txt",
                "ignored",
                Some("key does not end in .csv or .csv.gz")
            ),
        ]
    );
}

#[tokio::test]
async fn object_deleted_before_it_is_read() {
    let h = Harness::new().await;
    let etag = h
        .env
        .s3
        .put(
            "timeseries/gone.csv",
            "timestamp;sensor_uuid;sensor_value\n",
        )
        .await
        .unwrap();
    h.env.s3.delete("timeseries/gone.csv").await.unwrap();
    let o = h
        .ingestor
        .ingest("timeseries/gone.csv", Some(&etag))
        .await
        .unwrap();
    assert_eq!(
        o.disposition,
        Disposition::Ignored("object was deleted before it could be read".into())
    );
    let ledger = h.ledger(&h.measurements).await;
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].1, "ignored");
}

#[tokio::test]
async fn unknown_sensors_are_kept_and_mapping_may_come_later() {
    let h = Harness::new().await;
    h.put_and_ingest(
        "timeseries/a.csv",
        format!("timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{U2};1\n"),
    )
    .await;
    assert_eq!(h.count(&h.measurements, "measurements").await, 1);
    h.put_and_ingest(
        "mapping/m.csv",
        format!("sensor_uuid;sensor_name\n{U2};late\n"),
    )
    .await;
    assert_eq!(h.count(&h.mapping, "sensors").await, 1);
}

/// `measurements/V9`: while `sensor_pipeline.days_written` is on (the merge's `COPY` of hours
/// whose days it writes itself), the daily trigger leaves the days of the hours written alone;
/// otherwise it recomputes them, and a rollback to a savepoint turns the setting off again.
#[tokio::test]
async fn the_daily_trigger_leaves_days_to_a_writer_that_writes_them() {
    let h = Harness::new().await;
    let hour = |at: &str| {
        format!(
            "INSERT INTO measurement_hours (sensor_uuid, hour, readings, low, high, total,
                                            first_at, first_value, last_at, last_value)
             VALUES ('{U1}', '{at}', 1, 2, 2, 2, '{at}', 2, '{at}', 2);"
        )
    };
    h.measurements
        .batch_execute(&format!(
            "BEGIN;
             SAVEPOINT before;
             SET LOCAL sensor_pipeline.days_written = 'on';
             {}
             ROLLBACK TO SAVEPOINT before;
             {}
             SET LOCAL sensor_pipeline.days_written = 'on';
             {}
             SET LOCAL sensor_pipeline.days_written = 'off';
             {}
             COMMIT;",
            hour("2013-01-19T08:00:00Z"),
            hour("2013-01-20T08:00:00Z"),
            hour("2013-01-21T08:00:00Z"),
            hour("2013-01-22T08:00:00Z"),
        ))
        .await
        .unwrap();
    let days: Vec<(String, i64)> = testbed::rows(
        &h.measurements,
        "SELECT to_char(day AT TIME ZONE 'UTC', 'MM-DD'), readings FROM measurement_day_values
         ORDER BY 1",
    )
    .await;
    assert_eq!(
        days,
        vec![("01-20".to_string(), 1), ("01-22".to_string(), 1)]
    );
}

/// The check every test here makes of the derived tables (`testbed::derived_drift`) reports
/// what disagrees with the readings: a wrong count in the page index, a wrong bound in the hourly
/// rollup, and the daily value recomputed from that hour.
#[tokio::test]
async fn the_derived_tables_check_reports_what_disagrees() {
    let h = Harness::without_detection().await;
    let csv = format!("timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{U1};1\n");
    assert_done(&h.put_and_ingest("timeseries/one.csv", csv).await, 1, 0);
    assert_eq!(
        testbed::derived_drift(&h.measurements).await.unwrap(),
        Vec::<String>::new()
    );
    h.measurements
        .batch_execute(
            "UPDATE measurement_hours SET high = 2; UPDATE measurement_days SET readings = 3;
             SET TIME ZONE 'UTC'",
        )
        .await
        .unwrap();
    let mut found: Vec<String> = testbed::derived_drift(&h.measurements)
        .await
        .unwrap()
        .iter()
        .map(|line| line[..line.find(": ").unwrap()].to_string())
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            format!("day {U1} 2013-01-20 00:00:00+00"),
            format!("day values {U1} 2013-01-20 00:00:00+00"),
            format!("hour {U1} 2013-01-20 08:00:00+00"),
        ]
    );
}

#[tokio::test]
async fn migrations_are_idempotent() {
    let env = TestEnv::new().await.unwrap();
    let db = env.database_settings();
    let first = migrate(&db).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(
        first[0].applied,
        vec![
            "ledger/V1__ledger_and_quarantine",
            "ledger/V2__object_versions",
            "ledger/V3__versions_without_lock",
            "mapping/V1__sensors",
            "mapping/V2__sensor_versions",
            "measurements/V1__measurements",
            "measurements/V2__measurement_days",
            "measurements/V3__measurement_versions",
            "measurements/V4__anomalies",
            "measurements/V5__measurement_hours",
            "measurements/V6__measurement_hour_values",
            "measurements/V7__measurement_day_values",
            "measurements/V8__measurements_without_time_index",
            "measurements/V9__days_written_by_their_writer"
        ]
    );
    // CI's test server does not preload TimescaleDB: a plain table, for the reason that holds
    // on this machine; a server that preloads it (`TEST_DATABASE_URL`) gives a hypertable.
    let installed = testbed::timescaledb_installed(&env.measurements_db)
        .await
        .unwrap();
    let preloaded = testbed::timescaledb_preloaded(&env.measurements_db)
        .await
        .unwrap();
    assert_eq!(
        first[0].measurements,
        Some(match (installed, preloaded) {
            (true, true) => MeasurementsTable::Hypertable,
            (true, false) => MeasurementsTable::PlainNotPreloaded,
            (false, _) => MeasurementsTable::PlainNotAvailable,
        })
    );
    // One index on the readings, the primary key: TimescaleDB's own on ts alone is dropped (V8).
    let client = testbed::connect(&env.measurements_db).await.unwrap();
    let indexes: Vec<String> = testbed::column(
        &client,
        "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' \
         AND tablename = 'measurements' ORDER BY 1",
    )
    .await;
    assert_eq!(indexes, ["measurements_pkey"]);
    let second = migrate(&db).await.unwrap();
    assert!(second[0].applied.is_empty());
    // Where an earlier text of the amended measurements/V1 was applied (its checksum recorded),
    // `migrate` goes on and records the current text's checksum instead of refusing the history.
    let recorded = || async {
        client
            .query_one(
                "SELECT checksum FROM schema_history_measurements WHERE version = 1",
                &[],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    let current = recorded().await;
    for earlier in ["10378167297425692550", "2844391930722834833"] {
        client
            .execute(
                "UPDATE schema_history_measurements SET checksum = $1 WHERE version = 1",
                &[&earlier],
            )
            .await
            .unwrap();
        let again = migrate(&db).await.unwrap();
        assert_eq!(again[0].applied, Vec::<String>::new());
        assert_eq!(recorded().await, current);
    }
    // Concurrent runs serialise on the advisory lock.
    let env2 = TestEnv::with_two_databases().await.unwrap();
    let db2 = env2.database_settings();
    let (a, b) = tokio::join!(migrate(&db2), migrate(&db2));
    let (a, b) = (a.unwrap(), b.unwrap());
    let applied: usize = a.iter().chain(&b).map(|r| r.applied.len()).sum();
    // ledger/ on both databases, mapping/ on one, measurements/ on the other.
    assert_eq!(applied, 3 + 3 + 2 + 9, "{a:?} {b:?}");
}

#[tokio::test]
async fn concurrent_ingestion_of_one_version_ingests_once() {
    let h = Harness::new().await;
    let csv = format!("timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{U1};1\n");
    h.env.s3.put("timeseries/race.csv", csv).await.unwrap();
    let (a, b) = tokio::join!(
        h.ingestor.ingest("timeseries/race.csv", None),
        h.ingestor.ingest("timeseries/race.csv", None)
    );
    let mut d = [a.unwrap().disposition, b.unwrap().disposition];
    d.sort_by_key(|d| format!("{d:?}"));
    assert_eq!(d, [Disposition::AlreadyDone, Disposition::Done]);
    let attempts: i32 = h
        .mapping
        .query_one("SELECT attempts FROM ingest_ledger", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(attempts, 1);
}

/// A NUL byte is valid UTF-8 but PostgreSQL's text cannot hold it: in a name it rejects that row
/// (the rest of the file is stored, at the first attempt), and wherever input is echoed into a
/// reason it is escaped, so the reason can be stored.
#[tokio::test]
async fn nul_bytes_reject_their_row_and_are_escaped_in_reasons() {
    let h = Harness::new().await;
    let o = h
        .put_and_ingest(
            "mapping/nul.csv",
            format!("sensor_uuid;sensor_name\n{U1};boi\0ler\n{U2};pump\n"),
        )
        .await;
    assert_done(&o, 1, 1);
    assert_eq!(h.sensor_names().await, vec!["pump"]);
    // (The raw line is bytea and keeps its NUL.)
    let rejected: Vec<(i64, Vec<u8>, String)> = testbed::rows(
        &h.mapping,
        "SELECT line, raw, reason FROM ingest_quarantine",
    )
    .await;
    assert_eq!(
        rejected,
        vec![(
            2,
            format!("{U1};boi\0ler").into_bytes(),
            "sensor_name \"boi\\0ler\" contains a NUL character, which a name cannot hold"
                .to_string()
        )]
    );

    let o = h
        .put_and_ingest(
            "timeseries/nul.csv",
            format!("timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{U1}\0;1\n"),
        )
        .await;
    assert_done(&o, 0, 1);
    let reasons: Vec<String> = testbed::column(
        &h.measurements,
        "SELECT reason FROM ingest_quarantine WHERE object_key = 'timeseries/nul.csv'",
    )
    .await;
    assert_eq!(
        reasons,
        vec![format!(
            "sensor_uuid \"{U1}\\0\" is not a UUID (expected e.g. cd613e30-d8f1-4adf-91b7-584a2265b1f5)"
        )]
    );

    let o = h
        .put_and_ingest(
            "timeseries/nul-header.csv",
            format!("timestamp;sensor\0uuid;sensor_value\n2013-01-20T08:00:00Z;{U1};1\n"),
        )
        .await;
    let reason =
        "the header lacks required column(s) sensor_uuid; it has: timestamp, sensor\\0uuid, sensor_value";
    assert_eq!(o.disposition, Disposition::Failed(reason.into()));
    let ledger = h.ledger(&h.measurements).await;
    let entry = ledger
        .iter()
        .find(|l| l.0 == "timeseries/nul-header.csv")
        .expect("a ledger entry");
    assert_eq!(
        (entry.1.as_str(), entry.4.as_deref()),
        ("failed", Some(reason))
    );
}

/// A database error that says what the data is (here a `CHECK` constraint an operator added) fails
/// the object at once with the server's message — nothing of it stored, ledger `failed`, not
/// retried — while an error about the database's state (a lock timeout) stays transient: nothing
/// recorded, the next attempt succeeds.
#[tokio::test]
async fn a_permanent_database_error_fails_the_object_and_a_transient_one_is_retried() {
    let h = Harness::new().await;
    h.measurements
        .batch_execute("ALTER TABLE measurements ADD CONSTRAINT plausible CHECK (value < 1000000)")
        .await
        .unwrap();
    let key = "timeseries/implausible.csv";
    let o = h
        .put_and_ingest(
            key,
            format!(
                "timestamp;sensor_uuid;sensor_value\n\
                 2013-01-20T08:00:00Z;{U1};1\n2013-01-20T08:01:00Z;{U1};2000000\n"
            ),
        )
        .await;
    let reason = "the database refused the rows: measurement database: new row for relation \
                  \"measurements\" violates check constraint \"plausible\" (SQLSTATE 23514)";
    assert_eq!(plain(o.disposition), Disposition::Failed(reason.into()));
    assert_eq!(
        h.ledger(&h.measurements).await,
        vec![(key.into(), "failed".into(), 0, 0, Some(reason.into()))]
    );
    assert_eq!(h.readings().await, vec![]);

    // A lock held longer than the session's lock timeout, or a statement running past the
    // statement timeout: transient errors, nothing recorded; the next attempt succeeds.
    let key = "timeseries/locked.csv";
    h.env
        .s3
        .put(
            key,
            format!("timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{U1};1\n"),
        )
        .await
        .unwrap();
    let holder = testbed::connect(&h.env.measurements_db).await.unwrap();
    holder
        .batch_execute("BEGIN; LOCK TABLE measurement_days IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let with = |timeouts: DatabaseTimeouts| h.ingestor_with(timeouts, LimitSettings::default());
    let long = Duration::from_secs(600);
    let lock = with(DatabaseTimeouts {
        lock: Duration::from_millis(200),
        ..DatabaseTimeouts::default()
    });
    let e = lock.ingest(key, None).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "measurement database: canceling statement due to lock timeout (SQLSTATE 55P03)"
    );
    let statement = with(DatabaseTimeouts {
        statement: Duration::from_millis(500),
        lock: long,
        idle_in_transaction: long,
    });
    let e = statement.ingest(key, None).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "measurement database: canceling statement due to statement timeout (SQLSTATE 57014)"
    );
    assert_eq!(h.ledger(&h.measurements).await.len(), 1);
    holder.batch_execute("COMMIT").await.unwrap();
    assert_done(&lock.ingest(key, None).await.unwrap(), 1, 0);
}

/// Each limit fails the object at once with its reason — ledger `failed`, nothing of it stored —
/// and the ingestor goes on with the next object.
#[tokio::test]
async fn objects_past_a_limit_fail_with_the_reason() {
    let h = Harness::new().await;
    let with = |limits: LimitSettings| h.ingestor_with(DatabaseTimeouts::default(), limits);
    let failed = |o: &Outcome| match &o.disposition {
        Disposition::Failed(reason) => reason.clone(),
        other => panic!("not failed: {other:?}"),
    };
    let row = format!("2013-01-20T08:00:00Z;{U1};1\n");
    let csv = format!("timestamp;sensor_uuid;sensor_value\n{row}");

    // The size the store reports.
    h.env
        .s3
        .put("timeseries/big.csv", csv.clone())
        .await
        .unwrap();
    let small = with(LimitSettings {
        max_object_bytes: 20,
        ..LimitSettings::default()
    });
    let o = small.ingest("timeseries/big.csv", None).await.unwrap();
    assert_eq!(
        failed(&o),
        format!(
            "the object has {} bytes, more than MAX_OBJECT_BYTES (20)",
            csv.len()
        )
    );

    // A gzip bomb: 100,000 equal rows compress about 300-fold.
    let bomb = gzip(
        format!(
            "timestamp;sensor_uuid;sensor_value\n{}",
            row.repeat(100_000)
        )
        .as_bytes(),
    );
    assert!(bomb.len() * 100 < 100_000 * row.len(), "{}", bomb.len());
    h.env
        .s3
        .put("timeseries/bomb.csv.gz", bomb.clone())
        .await
        .unwrap();
    let o = with(LimitSettings {
        max_decompression_ratio: 100,
        ..LimitSettings::default()
    })
    .ingest("timeseries/bomb.csv.gz", None)
    .await
    .unwrap();
    assert_eq!(
        failed(&o),
        format!(
            "the gzip data of {} bytes decompresses to more than MAX_DECOMPRESSION_RATIO (100) \
             times that",
            bomb.len()
        )
    );

    // Rejected rows.
    h.env
        .s3
        .put(
            "timeseries/rejects.csv",
            format!("{csv}x;{U1};1\ny;{U1};2\n2013-01-20T08:05:00Z;{U1};3\nz;{U1};4\n"),
        )
        .await
        .unwrap();
    let o = with(LimitSettings {
        max_rejected_rows: 2,
        ..LimitSettings::default()
    })
    .ingest("timeseries/rejects.csv", None)
    .await
    .unwrap();
    assert_eq!(
        failed(&o),
        "more than MAX_REJECTED_ROWS (2) rows were rejected, the last at line 6: timestamp \"z\" \
         is not an ISO 8601 date-time (expected YYYY-MM-DDTHH:MM[:SS[.ffffff]][Z|±HH[:MM]])"
    );

    // The deadline: the merge waits on a lock the test holds.
    h.env
        .s3
        .put("timeseries/slow.csv", csv.clone())
        .await
        .unwrap();
    let holder = testbed::connect(&h.env.measurements_db).await.unwrap();
    holder
        .batch_execute("BEGIN; LOCK TABLE measurement_days IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let o = with(LimitSettings {
        object_deadline: Duration::from_secs(1),
        ..LimitSettings::default()
    })
    .ingest("timeseries/slow.csv", None)
    .await
    .unwrap();
    assert_eq!(failed(&o), "not ingested within OBJECT_DEADLINE_SECS (1 s)");
    holder.batch_execute("COMMIT").await.unwrap();

    let statuses: Vec<(String, String, Option<String>)> = h
        .ledger(&h.measurements)
        .await
        .into_iter()
        .map(|l| (l.0, l.1, l.4))
        .collect();
    assert_eq!(statuses.len(), 4);
    assert!(statuses.iter().all(|s| s.1 == "failed"), "{statuses:?}");
    assert_eq!(h.readings().await, vec![]);
    let quarantined: i64 = h
        .measurements
        .query_one("SELECT count(*) FROM ingest_quarantine", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(quarantined, 0);

    // Within the limits, ingestion goes on.
    h.env
        .s3
        .put("timeseries/fine.csv", csv.clone())
        .await
        .unwrap();
    assert_done(
        &h.ingestor
            .ingest("timeseries/fine.csv", None)
            .await
            .unwrap(),
        1,
        0,
    );
}

/// An object store that accepts the connection and never answers: the request fails after
/// `MINIO_READ_TIMEOUT_SECS` (transient, retried through redelivery) instead of hanging.
#[tokio::test]
async fn an_object_store_that_never_answers_times_out() {
    // The kernel completes the handshake into the backlog; nobody ever reads or answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut settings = sensor_pipeline::config::ObjectStoreSettings::plain(
        &silent.local_addr().unwrap().to_string(),
        "key",
        "secret",
        "bucket",
    );
    settings.read_timeout = Duration::from_millis(500);
    let store = sensor_pipeline::object_store::ObjectStore::new(&settings);
    let e = store
        .open("timeseries/a.csv")
        .await
        .err()
        .expect("an error");
    // A failed request (retried through redelivery), not a missing object or bucket. Its
    // message is the S3 client's own wording, which a dependency update may change: not ours to
    // assert.
    match e {
        sensor_pipeline::object_store::ObjectStoreError::Request { operation, message } => {
            assert_eq!((operation, message.is_empty()), ("GetObject", false))
        }
        other => panic!("not a failed request: {other:?}"),
    }
    assert!(store.ping().await.is_err());
}

/// The worker's sessions run with `idle_in_transaction_session_timeout`: a transaction left idle
/// (a hung worker holding locks) is ended by the server, and the pool's next client is a new,
/// working session.
#[tokio::test]
async fn a_transaction_left_idle_is_ended_by_the_server() {
    let h = Harness::new().await;
    let mut settings = h.env.database_settings();
    settings.timeouts = DatabaseTimeouts {
        idle_in_transaction: Duration::from_millis(200),
        ..DatabaseTimeouts::default()
    };
    let dbs = Databases::connect(&settings, 1).unwrap();
    let client = dbs
        .client(sensor_pipeline::contract::Dataset::Measurements)
        .await
        .unwrap();
    let pid: i32 = testbed::scalar(&client, "SELECT pg_backend_pid()").await;
    client.batch_execute("BEGIN").await.unwrap();
    let started = std::time::Instant::now();
    loop {
        let alive: i64 = h
            .measurements
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if alive == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the idle transaction was not ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = client.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(e.is_closed(), "{e:?}");
    drop(client);
    let fresh = dbs
        .client(sensor_pipeline::contract::Dataset::Measurements)
        .await
        .unwrap();
    let one: i32 = testbed::scalar(&fresh, "SELECT 1").await;
    assert_eq!(one, 1);
}

/// The objects of `wanted` (key, body) uploaded in order, then ingested with `ingest_many`.
async fn put_and_ingest_many(
    h: &Harness,
    ingestor: &Ingestor,
    objects: &[(&str, String)],
    wanted: &[&str],
) -> Vec<Result<Outcome, sensor_pipeline::ingest::IngestError>> {
    for (key, body) in objects {
        h.env.s3.put(key, body.clone()).await.unwrap();
    }
    let wanted: Vec<(String, Option<String>)> =
        wanted.iter().map(|k| (k.to_string(), None)).collect();
    ingestor.ingest_many(&wanted).await
}

/// Small objects ingested in one transaction end as each would alone: rows, quarantine, ledger
/// entries, rollup; a failed one (even after some of its rows were staged) stores nothing but its
/// entry; a key asked for twice is ingested once.
#[tokio::test]
async fn a_group_commits_each_object_as_it_would_alone() {
    let h = Harness::new().await;
    let ingestor = h.ingestor_with(
        DatabaseTimeouts::default(),
        LimitSettings {
            max_rejected_rows: 1,
            ..LimitSettings::default()
        },
    );
    let header = "timestamp;sensor_uuid;sensor_value\n";
    let objects = [
        (
            "timeseries/g/a.csv",
            format!(
                "{header}2013-01-20T08:00:00Z;{U1};1\n2013-01-20T08:01:00Z;{U1};2\n\
                 2013-01-20T08:02:00Z;{U1}\n"
            ),
        ),
        (
            "timeseries/g/b.csv",
            format!("{header}2013-01-20T08:00:00Z;{U2};5\n"),
        ),
        ("timeseries/g/c.csv", String::new()),
        (
            "timeseries/g/d.csv",
            format!("{header}2013-01-20T09:00:00Z;{U1};7\n"),
        ),
        (
            "timeseries/g/e.csv",
            format!("{header}2013-01-20T10:00:00Z;{U2};1\nx;{U2};2\ny;{U2};3\n"),
        ),
    ];
    let wanted = [
        "timeseries/g/a.csv",
        "timeseries/g/b.csv",
        "timeseries/g/c.csv",
        "timeseries/g/d.csv",
        "timeseries/g/e.csv",
        "timeseries/g/a.csv",
    ];
    let results = put_and_ingest_many(&h, &ingestor, &objects, &wanted).await;
    // The group's detection work is one row per sensor, carried with every member's readings by
    // its last ingested member (d).
    let held: Vec<(String, Vec<(i64, f64)>)> = results
        .iter()
        .filter_map(|r| r.as_ref().unwrap().fresh.as_deref())
        .flat_map(|f| {
            let mut by: Vec<_> = f
                .readings
                .iter()
                .map(|(u, r)| (u.to_string(), r.clone()))
                .collect();
            by.sort_by(|a, b| a.0.cmp(&b.0));
            by
        })
        .collect();
    let (t8, t9) = (1_358_668_800_000_000_i64, 1_358_672_400_000_000_i64);
    let mut want_held = vec![
        (
            U1.to_string(),
            vec![(t8, 1.0), (t8 + 60_000_000, 2.0), (t9, 7.0)],
        ),
        (U2.to_string(), vec![(t8, 5.0)]),
    ];
    want_held.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(held, want_held);
    let queued: Vec<(String, String, String, String)> = h
        .measurements
        .query(
            "SELECT sensor_uuid::text, to_char(span_start AT TIME ZONE 'UTC', 'HH24:MI'),
                    to_char(span_end AT TIME ZONE 'UTC', 'HH24:MI'), object_key
             FROM anomaly_work ORDER BY object_key",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        queued,
        vec![
            (
                U2.into(),
                "08:00".into(),
                "08:00".into(),
                "timeseries/g/b.csv".into()
            ),
            (
                U1.into(),
                "08:00".into(),
                "09:00".into(),
                "timeseries/g/d.csv".into()
            ),
        ]
    );
    let got: Vec<(Disposition, u64, u64, usize, bool)> = results
        .into_iter()
        .map(|r| {
            let o = r.unwrap();
            let fresh = o.fresh.is_some();
            (
                o.disposition,
                o.rows_ok,
                o.rows_rejected,
                o.anomaly_work.len(),
                fresh,
            )
        })
        .collect();
    let bad_timestamp = |t: &str| {
        format!(
            "timestamp \"{t}\" is not an ISO 8601 date-time (expected \
             YYYY-MM-DDTHH:MM[:SS[.ffffff]][Z|±HH[:MM]])"
        )
    };
    let too_many = format!(
        "more than MAX_REJECTED_ROWS (1) rows were rejected, the last at line 4: {}",
        bad_timestamp("y")
    );
    assert_eq!(
        got,
        vec![
            (Disposition::Done, 2, 1, 0, false),
            (Disposition::Done, 1, 0, 0, false),
            (
                Disposition::Failed("the file has no header row".into()),
                0,
                0,
                0,
                false
            ),
            (Disposition::Done, 1, 0, 2, true),
            (Disposition::Failed(too_many.clone()), 0, 0, 0, false),
            (Disposition::AlreadyDone, 0, 0, 0, false),
        ]
    );
    assert_eq!(
        h.readings().await,
        vec![
            reading(U2, "2013-01-20T08:00:00.000000Z", 5.0),
            reading(U1, "2013-01-20T08:00:00.000000Z", 1.0),
            reading(U1, "2013-01-20T08:01:00.000000Z", 2.0),
            reading(U1, "2013-01-20T09:00:00.000000Z", 7.0),
        ]
    );
    assert_eq!(
        h.quarantine(&h.measurements).await,
        vec![(
            "timeseries/g/a.csv".into(),
            4,
            format!("2013-01-20T08:02:00Z;{U1}"),
            "row has 2 field(s), the header has 3".into()
        )]
    );
    assert_eq!(
        h.ledger(&h.measurements).await,
        vec![
            ("timeseries/g/a.csv".into(), "done".into(), 2, 1, None),
            ("timeseries/g/b.csv".into(), "done".into(), 1, 0, None),
            (
                "timeseries/g/c.csv".into(),
                "failed".into(),
                0,
                0,
                Some("the file has no header row".into())
            ),
            ("timeseries/g/d.csv".into(), "done".into(), 1, 0, None),
            (
                "timeseries/g/e.csv".into(),
                "failed".into(),
                0,
                0,
                Some(too_many)
            ),
        ]
    );
    // The quarantined row points at its own object's entry.
    let owner: String = h
        .measurements
        .query_one(
            "SELECT l.object_key FROM ingest_quarantine q JOIN ingest_ledger l ON l.id = q.ledger_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "timeseries/g/a.csv");
}

/// When some readings of a group are stored already, or two of its objects hold the same key, the
/// group upserts them all at once: the newest write wins, as alone.
#[tokio::test]
async fn a_group_with_stored_or_shared_keys_upserts_and_the_newest_write_wins() {
    let h = Harness::new().await;
    let header = "timestamp;sensor_uuid;sensor_value\n";
    let first = format!("{header}2013-01-20T08:00:00Z;{U1};1\n2013-01-20T08:01:00Z;{U1};2\n");
    assert_done(&h.put_and_ingest("timeseries/x.csv", first).await, 2, 0);
    let objects = [
        (
            "timeseries/x.csv",
            format!("{header}2013-01-20T08:00:00Z;{U1};10\n2013-01-20T08:01:00Z;{U1};20\n"),
        ),
        (
            "timeseries/y.csv",
            format!("{header}2013-01-20T08:00:00Z;{U2};5\n2013-01-20T08:00:00Z;{U2};6\n"),
        ),
    ];
    let results = put_and_ingest_many(
        &h,
        &h.ingestor,
        &objects,
        &["timeseries/x.csv", "timeseries/y.csv"],
    )
    .await;
    for r in &results {
        assert_done(r.as_ref().unwrap(), 2, 0);
    }
    assert_eq!(
        h.readings().await,
        vec![
            reading(U2, "2013-01-20T08:00:00.000000Z", 6.0),
            reading(U1, "2013-01-20T08:00:00.000000Z", 10.0),
            reading(U1, "2013-01-20T08:01:00.000000Z", 20.0),
        ]
    );
    // Two new objects with one key: the one written later (or, in the same second, the greater
    // key) wins, whatever their order in the group.
    let objects = [
        (
            "timeseries/z1.csv",
            format!("{header}2013-01-21T09:00:00Z;{U2};1\n"),
        ),
        (
            "timeseries/z2.csv",
            format!("{header}2013-01-21T09:00:00Z;{U2};2\n"),
        ),
    ];
    let results = put_and_ingest_many(
        &h,
        &h.ingestor,
        &objects,
        &["timeseries/z2.csv", "timeseries/z1.csv"],
    )
    .await;
    for r in &results {
        assert_done(r.as_ref().unwrap(), 1, 0);
    }
    assert_eq!(
        h.readings().await[1],
        reading(U2, "2013-01-21T09:00:00.000000Z", 2.0)
    );
}

/// Every reading with the key of the object version it came from, ordered.
async fn readings_by_object(h: &Harness) -> Vec<(String, String, f64, String)> {
    h.readings().await;
    testbed::rows(
        &h.measurements,
        "SELECT m.sensor_uuid::text, to_char(m.ts AT TIME ZONE 'UTC', 'HH24:MI'), m.value,
                v.object_key
         FROM measurements m JOIN object_versions v ON v.version = m.version
         ORDER BY m.sensor_uuid, m.ts",
    )
    .await
}

/// (rows_ok, met_stored, readings carried to detection) of each result.
fn group_outcomes(
    results: Vec<Result<Outcome, sensor_pipeline::ingest::IngestError>>,
) -> Vec<(u64, bool, usize)> {
    results
        .into_iter()
        .map(|r| {
            let o = r.unwrap();
            assert_eq!(o.disposition, Disposition::Done);
            (o.rows_ok, o.met_stored, o.fresh.map_or(0, |f| f.len()))
        })
        .collect()
}

/// Uploads `objects` (name under `timeseries/h/`, body) and ingests them as one group with
/// `ingestor`; what [`group_outcomes`] says of each.
async fn ingest_group(
    h: &Harness,
    ingestor: &Ingestor,
    objects: &[(&str, String)],
) -> Vec<(u64, bool, usize)> {
    let keyed: Vec<(String, String)> = objects
        .iter()
        .map(|(name, body)| (format!("timeseries/h/{name}.csv"), body.clone()))
        .collect();
    let objects: Vec<(&str, String)> = keyed.iter().map(|(k, b)| (k.as_str(), b.clone())).collect();
    let keys: Vec<&str> = keyed.iter().map(|(k, _)| k.as_str()).collect();
    group_outcomes(put_and_ingest_many(h, ingestor, &objects, &keys).await)
}

/// A group whose readings are new within each member's spans copies them straight into the table,
/// each under its own object's version, even where a stored reading lies between two members'
/// (first probe over each sensor's span in all members, then per member); a member whose span
/// holds a stored reading, a member whose readings interleave with another's, or a member that
/// held too many readings and staged them sends the group to the staged merge — with the same end
/// state.
#[tokio::test]
async fn a_group_copies_new_readings_straight_in_around_stored_ones() {
    let h = Harness::new().await;
    let at = |hh_mm: &str, u: &str, v: f64| format!("2013-01-20T{hh_mm}:00Z;{u};{v}\n");
    let csv = |lines: &[String]| format!("timestamp;sensor_uuid;sensor_value\n{}", lines.concat());
    let one = csv(&[at("08:01", U1, 3.0), at("08:05", U1, 9.0)]);
    assert_done(
        &h.put_and_ingest("timeseries/h/stored.csv", one).await,
        2,
        0,
    );
    // Around the stored 08:01: straight in, all four readings carried to detection by b.
    let a = csv(&[at("08:00", U1, 1.0), at("08:00", U2, 5.0)]);
    let b = csv(&[at("08:03", U1, 4.0), at("08:02", U1, 2.0)]);
    assert_eq!(
        ingest_group(&h, &h.ingestor, &[("a", a), ("b", b)]).await,
        vec![(2, false, 0), (2, false, 4)]
    );
    // d's span holds the stored 08:05: the group is upserted.
    let c = csv(&[at("09:00", U2, 6.0)]);
    let d = csv(&[at("08:04", U1, 7.0), at("08:06", U1, 8.0)]);
    assert_eq!(
        ingest_group(&h, &h.ingestor, &[("c", c), ("d", d)]).await,
        vec![(1, true, 0), (2, true, 0)]
    );
    // e and f interleave at 10:00–10:02: staged, then inserted (nothing is stored there).
    let e = csv(&[at("10:00", U1, 10.0), at("10:02", U1, 12.0)]);
    let f = csv(&[at("10:01", U1, 11.0)]);
    assert_eq!(
        ingest_group(&h, &h.ingestor, &[("e", e), ("f", f)]).await,
        vec![(2, false, 0), (1, false, 3)]
    );
    // g holds more readings than the ingestor holds (one): staged, and h's held ones with it.
    let g = csv(&[at("11:00", U2, 13.0), at("11:01", U2, 14.0)]);
    let h2 = csv(&[at("11:02", U2, 15.0)]);
    let ingestor = h.ingestor.clone().hold_most(1);
    assert_eq!(
        ingest_group(&h, &ingestor, &[("g", g), ("h", h2)]).await,
        vec![(2, false, 0), (1, false, 0)]
    );
    let row = |u: &str, t: &str, v: f64, o: &str| {
        (
            u.to_string(),
            t.to_string(),
            v,
            format!("timeseries/h/{o}.csv"),
        )
    };
    assert_eq!(
        readings_by_object(&h).await,
        vec![
            row(U2, "08:00", 5.0, "a"),
            row(U2, "09:00", 6.0, "c"),
            row(U2, "11:00", 13.0, "g"),
            row(U2, "11:01", 14.0, "g"),
            row(U2, "11:02", 15.0, "h"),
            row(U1, "08:00", 1.0, "a"),
            row(U1, "08:01", 3.0, "stored"),
            row(U1, "08:02", 2.0, "b"),
            row(U1, "08:03", 4.0, "b"),
            row(U1, "08:04", 7.0, "d"),
            row(U1, "08:05", 9.0, "stored"),
            row(U1, "08:06", 8.0, "d"),
            row(U1, "10:00", 10.0, "e"),
            row(U1, "10:01", 11.0, "f"),
            row(U1, "10:02", 12.0, "e"),
        ]
    );
}

/// A key another transaction inserts while a group's readings are copied straight in (invisible
/// to the probe, committed while the `COPY` waits on it) sends the group back to the upsert,
/// where the newer write wins as always.
#[tokio::test]
async fn a_row_written_meanwhile_sends_a_groups_readings_back_to_the_upsert() {
    let h = Harness::new().await;
    let held = h.older_write_held().await;
    let header = "timestamp;sensor_uuid;sensor_value\n";
    let objects = [
        (
            "timeseries/m/a.csv",
            format!("{header}2013-01-20T08:30:00Z;{U2};4\n2013-01-20T08:00:00Z;{U1};1\n"),
        ),
        (
            "timeseries/m/b.csv",
            format!("{header}2013-01-20T09:00:00Z;{U1};2\n"),
        ),
    ];
    for (key, body) in &objects {
        h.env.s3.put(key, body.clone()).await.unwrap();
    }
    let wanted: Vec<(String, Option<String>)> =
        objects.iter().map(|(k, _)| (k.to_string(), None)).collect();
    let ingest = h.ingestor.ingest_many(&wanted);
    let release = async {
        // The group's `COPY` waits on the uncommitted row: then commit it.
        h.until_waiting(1).await;
        held.batch_execute("COMMIT").await.unwrap();
    };
    let (results, ()) = tokio::join!(ingest, release);
    assert_eq!(group_outcomes(results), vec![(2, true, 0), (1, true, 0)]);
    assert_eq!(
        h.readings().await,
        vec![
            reading(U2, "2013-01-20T08:30:00.000000Z", 4.0),
            reading(U1, "2013-01-20T08:00:00.000000Z", 1.0),
            reading(U1, "2013-01-20T09:00:00.000000Z", 2.0),
        ]
    );
}

/// A database error breaks the group's transaction: nothing of it is stored and each object gets
/// an error naming it; the grouper then ingests each alone, where the object the database refuses
/// fails with the reason and the others are done.
#[tokio::test]
async fn a_database_error_fails_the_group_and_alone_each_object_settles() {
    let h = Harness::new().await;
    h.measurements
        .batch_execute("ALTER TABLE measurements ADD CONSTRAINT plausible CHECK (value < 1000000)")
        .await
        .unwrap();
    let header = "timestamp;sensor_uuid;sensor_value\n";
    let objects = [
        (
            "timeseries/good.csv",
            format!("{header}2013-01-20T08:00:00Z;{U1};1\n"),
        ),
        (
            "timeseries/bad.csv",
            format!("{header}2013-01-20T08:00:00Z;{U2};2000000\n"),
        ),
    ];
    let keys = ["timeseries/good.csv", "timeseries/bad.csv"];
    let results = put_and_ingest_many(&h, &h.ingestor, &objects, &keys).await;
    let refused = "measurement database: new row for relation \"measurements\" violates check \
                   constraint \"plausible\" (SQLSTATE 23514)";
    let errors: Vec<String> = results
        .into_iter()
        .map(|r| on_plain_table(&r.unwrap_err().to_string()))
        .collect();
    let grouped = format!("ingested in a group that failed: {refused}");
    assert_eq!(errors, vec![grouped.clone(), grouped]);
    assert_eq!(h.readings().await, vec![]);
    assert_eq!(h.ledger(&h.measurements).await, vec![]);

    let grouper = sensor_pipeline::ingest::Grouper::new(h.ingestor.clone(), 1);
    let size = Some(60);
    let (good, bad) = tokio::join!(
        grouper.ingest(keys[0], None, size, None),
        grouper.ingest(keys[1], None, size, None)
    );
    assert_done(&good.unwrap(), 1, 0);
    let reason = format!("the database refused the rows: {refused}");
    assert_eq!(
        plain(bad.unwrap().disposition),
        Disposition::Failed(reason.clone())
    );
    assert_eq!(
        h.ledger(&h.measurements).await,
        vec![
            (
                "timeseries/bad.csv".into(),
                "failed".into(),
                0,
                0,
                Some(reason)
            ),
            ("timeseries/good.csv".into(), "done".into(), 1, 0, None),
        ]
    );
    assert_eq!(
        h.readings().await,
        vec![reading(U1, "2013-01-20T08:00:00.000000Z", 1.0)]
    );
}
