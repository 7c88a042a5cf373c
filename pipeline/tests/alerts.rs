//! Detection as data arrives ([`sensor_pipeline::alerts`]) against real PostgreSQL and S3: a
//! series that arrives object by object — in time order (the saved detector is resumed) or in
//! any order (late data starts over from a warm-up) — leaves the anomalies table holding exactly
//! what the detector finds over the whole series.

use chrono::{DateTime, Utc};
use sensor_pipeline::alerts::Alerts;
use sensor_pipeline::anomaly::{self, Anomaly};
use sensor_pipeline::config::{AnomalySettings, ContractSettings, Env};
use sensor_pipeline::ingest::Ingestor;
use sensor_pipeline::store::{migrate::migrate, Databases};
use testbed::data::rfc3339_micros as time;
use testbed::TestEnv;

const SENSOR: &str = "5e500000-0000-4000-8000-00000000a1e7";
/// A second sensor in the same objects: the series scaled, so one batch holds two sensors.
const OTHER: &str = "5e500000-0000-4000-8000-00000000a1e8";
const T0: i64 = 1_356_998_400; // 2013-01-01T00:00:00Z
const READINGS: usize = 12_000;
const PIECES: usize = 8;

/// Minute readings with a daily cycle, a ripple, spikes, a level shift, a stuck stretch, a gap.
fn series() -> Vec<(i64, f64)> {
    (0..READINGS)
        .filter(|i| !(10_500..10_900).contains(i))
        .map(|i| {
            let day = (i % 1440) as f64 / 1440.0 * std::f64::consts::TAU;
            let mut v = 50.0 + 10.0 * day.sin() + ((i * 7919) % 101) as f64 / 100.0;
            if i % 1_900 == 1_500 {
                v += 30.0;
            }
            if i >= 7_000 {
                v += 8.0;
            }
            if (9_000..9_150).contains(&i) {
                v = 12.5;
            }
            ((T0 + 60 * i as i64) * 1_000_000, v)
        })
        .collect()
}

fn scaled(readings: &[(i64, f64)]) -> Vec<(i64, f64)> {
    readings
        .iter()
        .map(|&(at, v)| (at, 3.0 * v - 7.0))
        .collect()
}

fn csv(readings: &[(i64, f64)]) -> String {
    let mut s = String::from("timestamp;sensor_uuid;sensor_value\n");
    for ((at, v), (_, w)) in readings.iter().zip(scaled(readings)) {
        s.push_str(&format!(
            "{};{SENSOR};{v}\n{};{OTHER};{w}\n",
            time(*at),
            time(*at)
        ));
    }
    s
}

type Open = Vec<(String, String, String, String)>;

/// What the detector finds over each sensor's whole series, as the table lists it.
fn whole() -> Open {
    let mut out = Vec::new();
    for (sensor, series) in [(SENSOR, series()), (OTHER, scaled(&series()))] {
        let found: Vec<Anomaly> = anomaly::detect(series, 1.0);
        out.extend(found.iter().map(|a| {
            (
                sensor.to_string(),
                a.kind.as_str().to_string(),
                time(a.start),
                time(a.end),
            )
        }));
    }
    out.sort_by(|a, b| (&a.0, &a.2, &a.1).cmp(&(&b.0, &b.2, &b.1)));
    out
}

/// The open anomalies, as the table lists them.
async fn open_anomalies(env: &TestEnv) -> Open {
    let db = testbed::connect(&env.mapping_db).await.unwrap();
    let rows = db
        .query(
            "SELECT sensor_uuid::text, kind, start_ts, end_ts FROM anomalies
             WHERE state = 'open' ORDER BY sensor_uuid, start_ts, kind",
            &[],
        )
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let t = |i| time(r.get::<_, DateTime<Utc>>(i).timestamp_micros());
            (r.get(0), r.get(1), t(2), t(3))
        })
        .collect()
}

/// A fresh environment, migrated, with an ingestor and detection on it.
async fn setup() -> (TestEnv, Ingestor, Alerts) {
    let env = TestEnv::new().await.unwrap();
    migrate(&env.database_settings()).await.unwrap();
    let dbs = Databases::connect(&env.database_settings(), 2).unwrap();
    let ingestor = Ingestor::new(
        env.s3.store().clone(),
        dbs.clone(),
        ContractSettings::default(),
    );
    let settings =
        AnomalySettings::from_env(&Env::from_map(Vec::<(String, String)>::new())).unwrap();
    (env, ingestor, Alerts::new(dbs, settings))
}

/// Ingests the pieces in `order`, detecting after each; returns the open anomalies, how many
/// detections resumed a saved detector and how many of those were fed the object's own readings.
async fn arrive(order: &[usize]) -> (Open, usize, usize) {
    arrive_in_batches(order, 1).await
}

/// [`arrive`], detecting after every `batch` pieces, their work in one batch as the worker's
/// loop does when objects commit faster than it detects.
async fn arrive_in_batches(order: &[usize], batch: usize) -> (Open, usize, usize) {
    let (env, ingestor, alerts) = setup().await;
    let s = series();
    let size = s.len().div_ceil(PIECES);
    let (mut resumed, mut fed) = (0, 0);
    for pieces in order.chunks(batch) {
        let mut outcomes = Vec::new();
        for &piece in pieces {
            let key = format!("timeseries/piece-{piece}.csv");
            let part = &s[piece * size..((piece + 1) * size).min(s.len())];
            env.s3.put(&key, csv(part)).await.unwrap();
            let outcome = ingestor.ingest(&key, None).await.unwrap();
            assert_eq!(outcome.anomaly_work.len(), 2);
            outcomes.push(outcome);
        }
        let work: Vec<i64> = outcomes
            .iter()
            .flat_map(|o| o.anomaly_work.iter().copied())
            .collect();
        let fresh: Vec<_> = outcomes.iter().filter_map(|o| o.fresh.as_deref()).collect();
        assert_eq!(fresh.len(), pieces.len());
        let done = alerts.detect_batch(&work, &fresh).await.unwrap();
        assert_eq!((done.spans, done.sensors), (2 * pieces.len(), 2));
        fed += done.fed;
        resumed += done.resumed;
    }
    let open = open_anomalies(&env).await;
    (open, resumed, fed)
}

#[tokio::test]
async fn pieces_in_time_order_end_where_the_whole_series_does() {
    let want = whole();
    assert!(want.len() >= 12, "{want:?}");
    let order: Vec<usize> = (0..PIECES).collect();
    // Every piece but the first resumes (for both sensors) the detector the one before saved,
    // fed from the object's own readings.
    assert_eq!(
        arrive(&order).await,
        (want, 2 * (PIECES - 1), 2 * (PIECES - 1))
    );
}

#[tokio::test]
async fn pieces_detected_several_at_a_time_end_where_the_whole_series_does() {
    let want = whole();
    // In time order, three at a time: the first three start from a warm-up; every later batch
    // resumes (for both sensors) the detector the one before saved, fed from the objects' own
    // readings, one piece after the other.
    let order: Vec<usize> = (0..PIECES).collect();
    assert_eq!(arrive_in_batches(&order, 3).await, (want.clone(), 4, 4));
    // Out of order, two at a time: 2 and 3, then 6 and 7, come after everything detected before
    // them and are fed; 5 and 4 come before what was detected (6 and 7), so the stored readings
    // are read back from the end of 3 on. The same end.
    let order = [0, 1, 2, 3, 6, 7, 5, 4];
    assert_eq!(arrive_in_batches(&order, 2).await, (want, 6, 4));
}

#[tokio::test]
async fn pieces_in_any_order_end_where_the_whole_series_does() {
    let want = whole();
    // Piece 7 comes after everything detected before it: it resumes and is fed its own readings.
    // 3 and 0 start from a warm-up; 0 judges on to the end of 3 and saves the detector at its
    // own end too, so 1 resumes that one, and so on: six pieces of two sensors resume.
    assert_eq!(arrive(&[3, 0, 1, 7, 2, 5, 4, 6]).await, (want, 12, 2));
}

/// The series cut into `pieces` small objects, ingested a group at a time (`groups`: the pieces
/// of each, one `ingest_many` call) and each group's work detected as the worker does, with the
/// readings its outcomes carry; returns the open anomalies, how many detections resumed a saved
/// detector and how many of those were fed from memory.
async fn arrive_in_groups(pieces: usize, groups: &[Vec<usize>]) -> (Open, usize, usize) {
    let (env, ingestor, alerts) = setup().await;
    let s = series();
    let size = s.len().div_ceil(pieces);
    let (mut resumed, mut fed) = (0, 0);
    for group in groups {
        let (mut wanted, mut readings) = (Vec::new(), 0);
        for &piece in group {
            let key = format!("timeseries/small-{piece:02}.csv");
            let part = &s[piece * size..((piece + 1) * size).min(s.len())];
            env.s3.put(&key, csv(part)).await.unwrap();
            wanted.push((key, None));
            readings += 2 * part.len();
        }
        let outcomes: Vec<_> = ingestor
            .ingest_many(&wanted)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        // One work row per sensor for the whole group, and every member's readings with it.
        let work: Vec<i64> = outcomes
            .iter()
            .flat_map(|o| o.anomaly_work.iter().copied())
            .collect();
        assert_eq!(work.len(), 2);
        let fresh: Vec<_> = outcomes.iter().filter_map(|o| o.fresh.as_deref()).collect();
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].len(), readings);
        let done = alerts.detect_batch(&work, &fresh).await.unwrap();
        assert_eq!((done.spans, done.sensors), (2, 2));
        fed += done.fed;
        resumed += done.resumed;
    }
    (open_anomalies(&env).await, resumed, fed)
}

#[tokio::test]
async fn small_objects_ingested_in_groups_end_where_the_whole_series_does() {
    let want = whole();
    // 24 pieces of 500 readings, six to a group, in time order: every group after the first
    // resumes (for both sensors) the detector the one before saved, fed its members' readings.
    let groups: Vec<Vec<usize>> = (0..4).map(|g| (6 * g..6 * g + 6).collect()).collect();
    assert_eq!(arrive_in_groups(24, &groups).await, (want.clone(), 6, 6));
    // Groups whose pieces interleave: the second's span holds the third's pieces, not yet
    // stored; the third's come before what the second's detection judged, so its readings are
    // read back from a warm-up. The same end.
    let groups = vec![
        (0..6).collect(),
        vec![6, 8, 10, 12],
        vec![7, 9, 11, 13],
        (14..24).collect(),
    ];
    assert_eq!(arrive_in_groups(24, &groups).await, (want, 6, 4));
}

/// `secs` from now: when an object is written later than the others.
fn later(secs: u64) -> std::time::SystemTime {
    std::time::SystemTime::now() + std::time::Duration::from_secs(secs)
}

/// The readings of the pieces as the correction writes them: every value moved up by 0.25 and
/// a spike of its own in the middle (so the verdicts differ from the originals').
fn corrected() -> Vec<(i64, f64)> {
    series()
        .into_iter()
        .enumerate()
        .map(|(i, (at, v))| (at, if i == 5_000 { v + 45.0 } else { v + 0.25 }))
        .collect()
}

fn csv_of(sensor: &str, readings: &[(i64, f64)]) -> String {
    let mut s = String::from("timestamp;sensor_uuid;sensor_value\n");
    for (at, v) in readings {
        s.push_str(&format!("{};{sensor};{v}\n", time(*at)));
    }
    s
}

/// The series of [`SENSOR`] ingested in pieces and detected, then a newer version of it in
/// pieces cut elsewhere (so several of them write one hour), and detection of those with their
/// readings at hand ([`Alerts::detect_held`]); `meddle` runs between the two (another writer).
/// Returns the open anomalies of the sensor and how many readings were fed from memory.
async fn correct(meddle: impl AsyncFnOnce(&TestEnv, &Ingestor)) -> (Open, u64) {
    correct_part(0..series().len(), meddle).await
}

/// [`correct`] of the readings `part` (by their place in the series) only.
async fn correct_part(
    part: std::ops::Range<usize>,
    meddle: impl AsyncFnOnce(&TestEnv, &Ingestor),
) -> (Open, u64) {
    let (env, ingestor, alerts) = setup().await;
    let s = series();
    for (n, part) in s.chunks(s.len().div_ceil(PIECES)).enumerate() {
        let key = format!("timeseries/piece-{n}.csv");
        env.s3.put(&key, csv_of(SENSOR, part)).await.unwrap();
        let o = ingestor.ingest(&key, None).await.unwrap();
        let fresh: Vec<_> = o.fresh.as_deref().into_iter().collect();
        alerts.detect_batch(&o.anomaly_work, &fresh).await.unwrap();
    }
    let c = &corrected()[part];
    let mut outcomes = Vec::new();
    for (n, part) in c.chunks(c.len().div_ceil(PIECES - 1)).enumerate() {
        let key = format!("timeseries/correction-{n}.csv");
        env.s3.put(&key, csv_of(SENSOR, part)).await.unwrap();
        env.s3.set_written_at(&key, later(60)).unwrap();
        let o = ingestor.ingest(&key, None).await.unwrap();
        assert!(o.met_stored && o.fresh.as_ref().is_some_and(|f| !f.links.is_empty()));
        outcomes.push(o);
    }
    meddle(&env, &ingestor).await;
    let ids: Vec<i64> = outcomes
        .iter()
        .flat_map(|o| o.anomaly_work.iter().copied())
        .collect();
    let fresh: Vec<_> = outcomes.iter().filter_map(|o| o.fresh.as_deref()).collect();
    let done = alerts.detect_held(Some(&ids), &fresh).await.unwrap();
    // The hours the correction left inexact are settled: the rollup is exact again.
    let measurements = testbed::connect(&env.measurements_db).await.unwrap();
    let drift = testbed::derived_drift(&measurements).await.unwrap();
    assert_eq!(drift, Vec::<String>::new());
    let inexact = testbed::inexact_hours(&measurements).await.unwrap();
    assert_eq!(inexact, 0);
    let open = open_anomalies(&env).await;
    (open, done.held)
}

/// What the detector finds over `readings` of [`SENSOR`], as the table lists it.
fn found(readings: Vec<(i64, f64)>) -> Open {
    anomaly::detect(readings, 1.0)
        .iter()
        .map(|a| {
            (
                SENSOR.to_string(),
                a.kind.as_str().to_string(),
                time(a.start),
                time(a.end),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_correction_is_detected_from_its_own_readings_with_the_verdicts_of_reading_them_back() {
    let want = found(corrected());
    assert!(
        want.iter().any(|a| a.2 == time(corrected()[5_000].0)),
        "{want:?}"
    );
    // Nothing else wrote the hours the correction did: every reading comes from memory.
    assert_eq!(
        correct(async |_: &TestEnv, _: &Ingestor| {}).await,
        (want, corrected().len() as u64)
    );
}

#[tokio::test]
async fn an_hour_another_writer_wrote_after_a_correction_is_read_back() {
    // After the correction, a newer object writes one reading far off in the hour of reading
    // 2,000: that hour is read back (its 60 readings), and the detector sees the new value.
    let mut want = corrected();
    want[2_000].1 = 190.0;
    let at = want[2_000].0;
    let expected = found(want.clone());
    assert!(expected.iter().any(|a| a.2 == time(at)), "{expected:?}");
    let meddle = async |env: &TestEnv, ingestor: &Ingestor| {
        let key = "timeseries/later.csv";
        env.s3
            .put(key, csv_of(SENSOR, &[(at, 190.0)]))
            .await
            .unwrap();
        env.s3.set_written_at(key, later(120)).unwrap();
        ingestor.ingest(key, None).await.unwrap();
    };
    assert_eq!(
        correct(meddle).await,
        (expected, corrected().len() as u64 - 60)
    );
}

#[tokio::test]
async fn hours_a_correction_wrote_only_part_of_are_read_back() {
    // Readings 1,010 to 8,990 corrected: the hours of the first and the last hold older readings
    // too, and are read back; the hours in between come from memory.
    let (from, to) = (1_010, 8_990);
    let c = corrected();
    let mut want = series();
    want[from..to].copy_from_slice(&c[from..to]);
    let hour = |i: usize| c[i].0.div_euclid(3_600_000_000);
    let held = (from..to)
        .filter(|&i| hour(i) != hour(from) && hour(i) != hour(to - 1))
        .count();
    // Both edges are mid-hour (minute 50): 10 and 50 readings of the edge hours are corrected.
    assert_eq!(held, to - from - 60);
    assert_eq!(
        correct_part(from..to, async |_: &TestEnv, _: &Ingestor| {}).await,
        (found(want), held as u64)
    );
}
