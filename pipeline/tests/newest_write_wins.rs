//! The end state is a function of the object versions ingested, never of the order or the
//! concurrency of processing (SPEC §3): a model test against real PostgreSQL.
//!
//! Each case draws a random set of object versions — a few keys, overlapping readings and names,
//! keys rewritten (also back to earlier content), write times with ties, repeated lines within a
//! file — and ingests them in a random order, several at once through three `Ingestor`s with their
//! own connection pools, some versions twice. The stored rows must equal the model: for every
//! reading and every name, the value of the newest version that holds it (write time, then the
//! greater key, then the greater ETag), and within that file the last line.
//!
//! The versions are handed to [`Ingestor::ingest_object`] as the bytes a GET returned: an object
//! store serves only a key's current version, while this test must also ingest a version after
//! a newer one of the same key (as a worker does whose slow read of the old bytes ends last).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use sensor_pipeline::config::ContractSettings;
use sensor_pipeline::ingest::{Disposition, Ingestor};
use sensor_pipeline::object_store::OpenedObject;
use sensor_pipeline::store::{migrate::migrate, Databases};
use testbed::TestEnv;

const CASES: u64 = 40;
const SENSORS: [&str; 3] = [
    "cd613e30-d8f1-4adf-91b7-584a2265b1f5",
    "1e2feb89-414c-443c-9027-c4d1c386bbc4",
    "6f1c2a44-0d3b-4c55-9f6e-3b8a7d2e9c10",
];
const KEYS: [&str; 5] = [
    "timeseries/a.csv",
    "timeseries/b.csv",
    "timeseries/2013/c.csv",
    "mapping/m.csv",
    "mapping/n.csv",
];
/// 2013-01-20T08:00:00Z.
const FIRST_READING: i64 = 1_358_668_800;
/// 2026-01-01T00:00:00Z: the write times are this plus 0–3 s (ties are common).
const FIRST_WRITE: i64 = 1_767_225_600;

/// SplitMix64: a seed gives the same cases on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

/// One object version: its key, write time, ETag (of its bytes) and bytes.
#[derive(Clone, Debug)]
struct Version {
    key: &'static str,
    written_at: DateTime<Utc>,
    etag: String,
    body: Vec<u8>,
}

/// The lines of a file: (sensor index, reading index or name, value) in file order.
fn measurement_file(rng: &mut Rng) -> String {
    let mut s = String::from("timestamp;sensor_uuid;sensor_value\n");
    for _ in 0..1 + rng.below(8) {
        let sensor = SENSORS[rng.below(SENSORS.len() as u64) as usize];
        let t = DateTime::from_timestamp(FIRST_READING + 60 * rng.below(6) as i64, 0).unwrap();
        let value = rng.below(100);
        s.push_str(&format!(
            "{};{sensor};{value}\n",
            t.format("%Y-%m-%dT%H:%M:%SZ")
        ));
    }
    s
}

fn mapping_file(rng: &mut Rng) -> String {
    let mut s = String::from("sensor_uuid;sensor_name\n");
    for _ in 0..1 + rng.below(4) {
        let sensor = SENSORS[rng.below(SENSORS.len() as u64) as usize];
        s.push_str(&format!("{sensor};name-{}\n", rng.below(100)));
    }
    s
}

fn etag(body: &[u8]) -> String {
    // Any function of the bytes will do: equal bytes, equal ETag (as with S3's MD5).
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut h);
    format!("{:016x}", h.finish())
}

fn versions(rng: &mut Rng) -> Vec<Version> {
    let mut out: Vec<Version> = Vec::new();
    for _ in 0..4 + rng.below(7) {
        let key = KEYS[rng.below(KEYS.len() as u64) as usize];
        let written_at = DateTime::from_timestamp(FIRST_WRITE + rng.below(4) as i64, 0).unwrap();
        // Sometimes back to the content of an earlier version of the same key.
        let earlier: Vec<&Version> = out.iter().filter(|v| v.key == key).collect();
        let body = if !earlier.is_empty() && rng.below(3) == 0 {
            earlier[rng.below(earlier.len() as u64) as usize]
                .body
                .clone()
        } else if key.starts_with("mapping/") {
            mapping_file(rng).into_bytes()
        } else {
            measurement_file(rng).into_bytes()
        };
        let v = Version {
            key,
            written_at,
            etag: etag(&body),
            body,
        };
        // One version per identity (key, ETag, write time).
        if !out
            .iter()
            .any(|o| o.key == v.key && o.etag == v.etag && o.written_at == v.written_at)
        {
            out.push(v);
        }
    }
    out
}

/// The model: newest write wins (write time, then key, then ETag), last line within a file.
/// Returns readings (uuid, unix seconds) -> value and names uuid -> name.
#[allow(clippy::type_complexity)]
fn model(versions: &[Version]) -> (BTreeMap<(String, i64), f64>, BTreeMap<String, String>) {
    let mut ordered: Vec<&Version> = versions.iter().collect();
    ordered.sort_by(|a, b| {
        (a.written_at, a.key.as_bytes(), a.etag.as_bytes()).cmp(&(
            b.written_at,
            b.key.as_bytes(),
            b.etag.as_bytes(),
        ))
    });
    let (mut readings, mut names) = (BTreeMap::new(), BTreeMap::new());
    // Oldest first, each line overwriting: the newest version's last line stays.
    for v in ordered {
        let text = std::str::from_utf8(&v.body).unwrap();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split(';').collect();
            if v.key.starts_with("mapping/") {
                names.insert(f[0].to_string(), f[1].to_string());
            } else {
                let ts = DateTime::parse_from_rfc3339(f[0]).unwrap().timestamp();
                readings.insert((f[1].to_string(), ts), f[2].parse().unwrap());
            }
        }
    }
    (readings, names)
}

fn opened(v: &Version) -> OpenedObject {
    OpenedObject {
        etag: v.etag.clone(),
        written_at: v.written_at,
        size: Some(v.body.len() as i64),
        body: Box::new(std::io::Cursor::new(v.body.clone())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_state_is_the_newest_write_whatever_the_order_and_concurrency() {
    end_state_is_the_newest_write(false).await;
}

/// The same with the versions ingested in groups of one to six (`Ingestor::ingest_objects`), a
/// group that fails (two groups deadlocking on rows) retried alone as the grouper does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_groups_the_end_state_is_the_newest_write_whatever_the_order_and_concurrency() {
    end_state_is_the_newest_write(true).await;
}

async fn end_state_is_the_newest_write(grouped: bool) {
    let env = TestEnv::new().await.unwrap();
    let (mut ingested, mut already_done) = (0, 0);
    let (mut versions_total, mut repeats_total) = (0, 0);
    for seed in 0..CASES {
        let mut rng = Rng(seed);
        let db = testbed::database().await.unwrap();
        let settings = sensor_pipeline::config::DatabaseSettings {
            mapping_url: sensor_pipeline::config::Secret::new(db.clone()),
            measurements_url: sensor_pipeline::config::Secret::new(db.clone()),
            timeouts: Default::default(),
        };
        migrate(&settings).await.unwrap();
        let ingestors: Vec<Ingestor> = (0..3)
            .map(|_| {
                Ingestor::new(
                    env.s3.store().clone(),
                    Databases::connect(&settings, 2).unwrap(),
                    ContractSettings::default(),
                )
            })
            .collect();

        let versions = versions(&mut rng);
        // A random order, with some versions delivered twice.
        let mut work: Vec<Version> = versions.clone();
        for v in &versions {
            if rng.below(4) == 0 {
                work.push(v.clone());
            }
        }
        versions_total += versions.len();
        repeats_total += work.len() - versions.len();
        rng.shuffle(&mut work);
        let queue = Arc::new(Mutex::new(work));
        let mut tasks = Vec::new();
        for (n, ingestor) in ingestors.into_iter().enumerate() {
            let queue = queue.clone();
            let mut sizes = Rng(seed * 7 + n as u64);
            tasks.push(tokio::spawn(async move {
                let mut dispositions = Vec::new();
                loop {
                    let take = if grouped {
                        1 + sizes.below(6) as usize
                    } else {
                        1
                    };
                    let next: Vec<Version> = {
                        let mut queue = queue.lock().unwrap();
                        let from = queue.len().saturating_sub(take);
                        queue.split_off(from)
                    };
                    if next.is_empty() {
                        break;
                    }
                    if !grouped {
                        let v = &next[0];
                        let outcome = ingestor.ingest_object(v.key, opened(v)).await.unwrap();
                        dispositions.push(outcome.disposition);
                        continue;
                    }
                    let objects = next
                        .iter()
                        .map(|v| (v.key.to_string(), opened(v)))
                        .collect();
                    for (v, result) in next.iter().zip(ingestor.ingest_objects(objects).await) {
                        let outcome = match result {
                            Ok(o) => o,
                            Err(sensor_pipeline::ingest::IngestError::Grouped(_)) => {
                                ingestor.ingest_object(v.key, opened(v)).await.unwrap()
                            }
                            Err(e) => panic!("seed {seed}: {e}"),
                        };
                        dispositions.push(outcome.disposition);
                    }
                }
                dispositions
            }));
        }
        for task in tasks {
            for d in task.await.unwrap() {
                match d {
                    Disposition::Done => ingested += 1,
                    Disposition::AlreadyDone => already_done += 1,
                    other => panic!("seed {seed}: unexpected {other:?}"),
                }
            }
        }

        let (want_readings, want_names) = model(&versions);
        let client = testbed::connect(&db).await.unwrap();
        let got_readings: BTreeMap<(String, i64), f64> = client
            .query(
                "SELECT sensor_uuid::text, extract(epoch FROM ts)::bigint, value FROM measurements",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| ((r.get(0), r.get(1)), r.get(2)))
            .collect();
        let got_names: BTreeMap<String, String> = testbed::rows(
            &client,
            "SELECT sensor_uuid::text, sensor_name FROM sensors",
        )
        .await
        .into_iter()
        .collect();
        assert_eq!(got_readings, want_readings, "seed {seed}: {versions:#?}");
        assert_eq!(got_names, want_names, "seed {seed}: {versions:#?}");
        // One `done` ledger entry per version, and the page index counts every stored row.
        let done: i64 = testbed::scalar(
            &client,
            "SELECT count(*) FROM ingest_ledger WHERE status = 'done'",
        )
        .await;
        assert_eq!(done, versions.len() as i64, "seed {seed}");
        let indexed: i64 = testbed::scalar(
            &client,
            "SELECT coalesce(sum(readings), 0)::bigint FROM measurement_days",
        )
        .await;
        assert_eq!(indexed, want_readings.len() as i64, "seed {seed}");
        let drift = testbed::derived_drift(&client).await.unwrap();
        assert_eq!(drift, Vec::<String>::new(), "seed {seed}");
        // The hours a correction could not tell the bounds of are settled by its detection.
        let alerts = sensor_pipeline::alerts::Alerts::new(
            Databases::connect(&settings, 2).unwrap(),
            sensor_pipeline::config::AnomalySettings::from_env(
                &sensor_pipeline::config::Env::from_map(Vec::<(String, String)>::new()),
            )
            .unwrap(),
        );
        alerts.detect_due(None).await.unwrap();
        let drift = testbed::derived_drift(&client).await.unwrap();
        assert_eq!(drift, Vec::<String>::new(), "seed {seed}");
        let inexact = testbed::inexact_hours(&client).await.unwrap();
        assert_eq!(inexact, 0, "seed {seed}");
    }
    // Every version was ingested once; every repeated delivery found it done.
    assert_eq!((ingested, already_done), (versions_total, repeats_total));
}

const U1: &str = SENSORS[0];
const U2: &str = SENSORS[1];

/// Whole seconds since the epoch as a write time.
fn at(secs: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
}

async fn harness() -> (TestEnv, Ingestor, tokio_postgres::Client) {
    let env = TestEnv::new().await.unwrap();
    migrate(&env.database_settings()).await.unwrap();
    let ingestor = Ingestor::new(
        env.s3.store().clone(),
        Databases::connect(&env.database_settings(), 2).unwrap(),
        ContractSettings::default(),
    );
    let db = testbed::connect(&env.mapping_db).await.unwrap();
    (env, ingestor, db)
}

async fn names(db: &tokio_postgres::Client) -> Vec<(String, String)> {
    testbed::rows(
        db,
        "SELECT sensor_uuid::text, sensor_name FROM sensors ORDER BY 1",
    )
    .await
}

#[tokio::test]
async fn an_older_mapping_file_processed_last_does_not_rename_a_sensor_back() {
    let (env, ingestor, db) = harness().await;
    env.s3
        .put(
            "mapping/new.csv",
            format!("sensor_uuid;sensor_name\n{U1};boiler\n"),
        )
        .await
        .unwrap();
    env.s3
        .set_written_at("mapping/new.csv", at(FIRST_WRITE + 60))
        .unwrap();
    env.s3
        .put(
            "mapping/old.csv",
            format!("sensor_uuid;sensor_name\n{U1};old name\n{U2};pump\n"),
        )
        .await
        .unwrap();
    env.s3
        .set_written_at("mapping/old.csv", at(FIRST_WRITE))
        .unwrap();
    for key in ["mapping/new.csv", "mapping/old.csv"] {
        let o = ingestor.ingest(key, None).await.unwrap();
        assert_eq!(o.disposition, Disposition::Done);
    }
    assert_eq!(
        names(&db).await,
        vec![
            (U2.to_string(), "pump".to_string()),
            (U1.to_string(), "boiler".to_string()),
        ]
    );
    // The older content of the newer key, read before it was overwritten and committed last.
    let stale = Version {
        key: "mapping/new.csv",
        written_at: DateTime::from_timestamp(FIRST_WRITE + 30, 0).unwrap(),
        etag: "stale".into(),
        body: format!("sensor_uuid;sensor_name\n{U1};stale\n").into_bytes(),
    };
    let o = ingestor
        .ingest_object(stale.key, opened(&stale))
        .await
        .unwrap();
    assert_eq!(o.disposition, Disposition::Done);
    assert_eq!(names(&db).await[1], (U1.to_string(), "boiler".to_string()));
}

#[tokio::test]
async fn a_key_that_goes_back_to_earlier_content_ends_with_it() {
    let (env, ingestor, db) = harness().await;
    let key = "timeseries/flip.csv";
    let a = format!("timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{U1};1\n");
    let b = format!("timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{U1};2\n");
    for (i, body) in [&a, &b, &a].into_iter().enumerate() {
        env.s3.put(key, body.clone()).await.unwrap();
        env.s3
            .set_written_at(key, at(FIRST_WRITE + i as i64))
            .unwrap();
        let o = ingestor.ingest(key, None).await.unwrap();
        assert_eq!(o.disposition, Disposition::Done, "version {i}");
    }
    let value: f64 = testbed::scalar(&db, "SELECT value FROM measurements").await;
    assert_eq!(value, 1.0);
    let ledger: Vec<(String, i64)> = testbed::rows(
        &db,
        "SELECT status, extract(epoch FROM written_at)::bigint FROM ingest_ledger
         ORDER BY written_at",
    )
    .await;
    assert_eq!(
        ledger,
        vec![
            ("done".to_string(), FIRST_WRITE),
            ("done".to_string(), FIRST_WRITE + 1),
            ("done".to_string(), FIRST_WRITE + 2),
        ]
    );
}

#[tokio::test]
async fn objects_without_an_etag_are_told_apart_by_their_write_time() {
    let (_env, ingestor, db) = harness().await;
    let key = "timeseries/no-etag.csv";
    for (i, value) in [1, 2].into_iter().enumerate() {
        let v = Version {
            key,
            written_at: DateTime::from_timestamp(FIRST_WRITE + i as i64, 0).unwrap(),
            etag: String::new(),
            body: format!(
                "timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{U1};{value}\n"
            )
            .into_bytes(),
        };
        let o = ingestor.ingest_object(key, opened(&v)).await.unwrap();
        assert_eq!(o.disposition, Disposition::Done, "version {i}");
    }
    let value: f64 = testbed::scalar(&db, "SELECT value FROM measurements").await;
    assert_eq!(value, 2.0);
}

#[tokio::test]
async fn upgrade_from_the_previous_schema_keeps_the_data_and_any_new_write_beats_it() {
    use sensor_pipeline::store::migrate::{migrate_to_earlier, EarlierSchema};
    let env = TestEnv::new().await.unwrap();
    let settings = env.database_settings();
    let previous = EarlierSchema {
        ledger: 1,
        mapping: 1,
        measurements: 2,
    };
    migrate_to_earlier(&settings, previous).await.unwrap();
    let db = testbed::connect(&env.mapping_db).await.unwrap();
    // What the previous release stored for one object (two readings, one name).
    db.batch_execute(&format!(
        "INSERT INTO measurements (sensor_uuid, ts, value) VALUES
             ('{U1}', '2013-01-20T08:00:00Z', 1), ('{U1}', '2013-01-21T08:00:00Z', 1);
         INSERT INTO measurement_days (sensor_uuid, day, readings) VALUES
             ('{U1}', '2013-01-20T00:00:00Z', 1), ('{U1}', '2013-01-21T00:00:00Z', 1);
         INSERT INTO sensors (sensor_uuid, sensor_name) VALUES ('{U1}', 'old');
         INSERT INTO ingest_ledger (bucket, object_key, etag, dataset, status, rows_ok, started_at, finished_at)
             VALUES ('code-challenge-data', 'timeseries/old.csv', 'e1', 'measurements', 'done', 2, now(), now());"
    ))
    .await
    .unwrap();

    let reports = migrate(&settings).await.unwrap();
    assert_eq!(
        reports[0].applied,
        vec![
            "ledger/V2__object_versions",
            "ledger/V3__versions_without_lock",
            "mapping/V2__sensor_versions",
            "measurements/V3__measurement_versions",
            "measurements/V4__anomalies",
            "measurements/V5__measurement_hours",
            "measurements/V6__measurement_hour_values",
            "measurements/V7__measurement_day_values",
            "measurements/V8__measurements_without_time_index",
            "measurements/V9__days_written_by_their_writer"
        ]
    );
    let ingestor = Ingestor::new(
        env.s3.store().clone(),
        Databases::connect(&settings, 2).unwrap(),
        ContractSettings::default(),
    );
    // A new write of one of the two readings and of the name; the other reading stays.
    env.s3
        .put(
            "timeseries/new.csv",
            format!(
                "timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{U1};5\n2013-01-22T08:00:00Z;{U1};6\n"
            ),
        )
        .await
        .unwrap();
    env.s3
        .put(
            "mapping/m.csv",
            format!("sensor_uuid;sensor_name\n{U1};new\n"),
        )
        .await
        .unwrap();
    for key in ["timeseries/new.csv", "mapping/m.csv"] {
        let o = ingestor.ingest(key, None).await.unwrap();
        assert_eq!(o.disposition, Disposition::Done);
    }
    let readings: Vec<(String, f64)> = testbed::rows(
        &db,
        "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD'), value FROM measurements ORDER BY ts",
    )
    .await;
    assert_eq!(
        readings,
        vec![
            ("2013-01-20".to_string(), 5.0),
            ("2013-01-21".to_string(), 1.0),
            ("2013-01-22".to_string(), 6.0),
        ]
    );
    assert_eq!(names(&db).await, vec![(U1.to_string(), "new".to_string())]);
    // The page index still counts every stored row.
    let days: Vec<(String, i64)> = testbed::rows(
        &db,
        "SELECT to_char(day AT TIME ZONE 'UTC', 'YYYY-MM-DD'), readings FROM measurement_days
         ORDER BY day",
    )
    .await;
    assert_eq!(
        days,
        vec![
            ("2013-01-20".to_string(), 1),
            ("2013-01-21".to_string(), 1),
            ("2013-01-22".to_string(), 1),
        ]
    );
    // The hourly rollup was filled from the rows stored before (V5) and kept by the merge: the
    // overwritten 2013-01-20 reading's hour holds the new value only.
    let hours: Vec<(String, f64)> = testbed::rows(
        &db,
        "SELECT to_char(hour AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24'), high FROM measurement_hours \
         ORDER BY hour",
    )
    .await;
    assert_eq!(
        hours,
        vec![
            ("2013-01-20 08".to_string(), 5.0),
            ("2013-01-21 08".to_string(), 1.0),
            ("2013-01-22 08".to_string(), 6.0),
        ]
    );
    assert_eq!(
        testbed::derived_drift(&db).await.unwrap(),
        Vec::<String>::new()
    );
    // The earlier ledger entry is kept, without a write time.
    let ledger: Vec<(String, bool)> = testbed::rows(
        &db,
        "SELECT object_key, written_at = '-infinity' FROM ingest_ledger ORDER BY object_key",
    )
    .await;
    assert_eq!(
        ledger,
        vec![
            ("mapping/m.csv".to_string(), false),
            ("timeseries/new.csv".to_string(), false),
            ("timeseries/old.csv".to_string(), true),
        ]
    );
}

/// Registration takes no lock: one version registered twice (or at once from two sessions) gets
/// one number; versions of one second get distinct numbers with that second in the high bits, a
/// number already taken (the counter wrapped around) is skipped, and a registration inside a
/// transaction that rolls back leaves nothing.
#[tokio::test]
async fn versions_of_one_second_get_distinct_numbers_without_a_lock() {
    let (env, _ingestor, db) = harness().await;
    let register = "SELECT sensors_register_version($1, $2, $3, '2026-11-28T10:00:00Z')";
    let number = |key: &'static str, etag: &'static str| {
        let db = &db;
        async move {
            let row = db.query_one(register, &[&"b", &key, &etag]).await.unwrap();
            row.get::<_, i64>(0)
        }
    };
    let second = 1_795_860_000_i64 << 24;
    let a = number("a.csv", "1").await;
    assert_eq!(a >> 24, second >> 24);
    assert_eq!(number("a.csv", "1").await, a);
    let other = testbed::connect(&env.mapping_db).await.unwrap();
    let (b, b_again) = tokio::join!(number("b.csv", "1"), async {
        let row = other
            .query_one(register, &[&"b", &"b.csv", &"1"])
            .await
            .unwrap();
        row.get::<_, i64>(0)
    });
    assert_eq!(b, b_again);
    assert_ne!(a, b);
    assert_eq!(b >> 24, a >> 24);
    // The counter comes round to b's number: it is skipped.
    db.execute(
        "SELECT setval('object_version_counter', $1)",
        &[&(b - second + (1 << 24) - 1)],
    )
    .await
    .unwrap();
    let c = number("c.csv", "1").await;
    assert_eq!(c, b + 1);
    db.batch_execute(
        "BEGIN; SELECT sensors_register_version('b', 'd.csv', '1', '2026-11-28T10:00:00Z'); ROLLBACK",
    )
    .await
    .unwrap();
    let versions: Vec<String> = testbed::column(
        &db,
        "SELECT object_key FROM object_versions ORDER BY object_key",
    )
    .await;
    assert_eq!(versions, vec!["a.csv", "b.csv", "c.csv"]);
}
