//! Anomaly alerts end to end (issue: event-driven anomaly alerts): real worker processes, NATS
//! JetStream, PostgreSQL and the notifying S3 server. An upload with a spike opens it (one row,
//! one message), a newer write without it resolves it, duplicates and two workers change nothing,
//! and neither a killed detection nor a locked table loses an anomaly or holds up ingestion.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::*;
use sensor_pipeline::alerts::{rfc3339, AnomalyMessage};
use sensor_pipeline::anomaly::{self, Anomaly};

const T0: i64 = 1_356_998_400; // 2013-01-01T00:00:00Z
const READINGS: usize = 3_000;
const SPIKE_AT: usize = 2_500;

/// `READINGS` one-minute readings of sensor U1 around 20 with a fixed ripple, and a spike of +30
/// at `SPIKE_AT` when `spike`.
fn series(spike: bool) -> Vec<(i64, f64)> {
    (0..READINGS)
        .map(|i| {
            let ripple = ((i * 7919) % 101) as f64 / 400.0;
            let bump = if spike && i == SPIKE_AT { 30.0 } else { 0.0 };
            ((T0 + 60 * i as i64) * 1_000_000, 20.0 + ripple + bump)
        })
        .collect()
}

fn csv(readings: &[(i64, f64)]) -> String {
    let mut s = String::from("timestamp;sensor_uuid;sensor_value\n");
    for (at, value) in readings {
        let t = DateTime::<Utc>::from_timestamp_micros(*at).unwrap();
        s.push_str(&format!("{};{U1};{value}\n", rfc3339(t)));
    }
    s
}

/// What the detector finds in the whole series: what the table must hold.
fn expected(readings: &[(i64, f64)]) -> Vec<(String, String, String)> {
    let mut found: Vec<Anomaly> = anomaly::detect(readings.iter().copied(), 1.0);
    found.sort_by_key(|a| (a.start, a.kind));
    found
        .iter()
        .map(|a| {
            (
                a.kind.as_str().to_string(),
                rfc3339(DateTime::from_timestamp_micros(a.start).unwrap()),
                rfc3339(DateTime::from_timestamp_micros(a.end).unwrap()),
            )
        })
        .collect()
}

fn spike_start() -> String {
    rfc3339(DateTime::from_timestamp(T0 + 60 * SPIKE_AT as i64, 0).unwrap())
}

/// Unique names for this test's anomaly stream and subjects.
struct Alerting {
    stream: String,
    prefix: String,
}

impl Alerting {
    fn new() -> Self {
        let id = testbed::unique_name("a");
        Self {
            stream: id.to_uppercase(),
            prefix: format!("{id}.anomalies"),
        }
    }

    fn vars<'a>(&'a self, lock_timeout_ms: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("ANOMALY_STREAM", self.stream.as_str()),
            ("ANOMALY_SUBJECT_PREFIX", self.prefix.as_str()),
            ("ANOMALY_LOCK_TIMEOUT_MS", lock_timeout_ms),
        ]
    }

    /// Every message in the anomaly stream, with its subject (empty before the stream exists).
    async fn messages(&self, p: &Pipeline) -> Vec<(String, AnomalyMessage)> {
        let js = p.queue.jetstream();
        let Ok(mut stream) = js.get_stream(&self.stream).await else {
            return Vec::new();
        };
        let last = stream.info().await.unwrap().state.last_sequence;
        let mut out = Vec::new();
        for seq in 1..=last {
            let m = stream.get_raw_message(seq).await.unwrap();
            out.push((
                m.subject.to_string(),
                serde_json::from_slice(&m.payload).unwrap(),
            ));
        }
        out
    }
}

/// The stored anomalies: (kind, start, end) of those in `state`, in time order.
async fn stored(p: &Pipeline, state: &str) -> Vec<(String, String, String)> {
    p.db.query(
        "SELECT kind, start_ts, end_ts FROM anomalies WHERE state = $1 ORDER BY start_ts, kind",
        &[&state],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| {
        (
            r.get(0),
            rfc3339(r.get::<_, DateTime<Utc>>(1)),
            rfc3339(r.get::<_, DateTime<Utc>>(2)),
        )
    })
    .collect()
}

/// Rows still to publish, and rows at all.
async fn unpublished(p: &Pipeline) -> (i64, i64) {
    let r =
        p.db.query_one(
            "SELECT count(*) FILTER (WHERE published_revision < revision), count(*) FROM anomalies",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// Waits until detection has stored `want` open anomalies and published every change.
async fn settle(p: &Pipeline, a: &Alerting, want_open: usize, messages: usize, w: &[&Worker]) {
    wait_for(
        "anomalies detected and published",
        Duration::from_secs(60),
        w,
        || async {
            stored(p, "open").await.len() == want_open
                && unpublished(p).await.0 == 0
                && a.messages(p).await.len() == messages
        },
    )
    .await;
}

/// The open messages, as (kind, start, end), in time order; asserts each names U1 and `key`.
fn opened(
    messages: &[(String, AnomalyMessage)],
    a: &Alerting,
    key: &str,
) -> Vec<(String, String, String)> {
    let mut out: Vec<_> = messages
        .iter()
        .map(|(subject, m)| {
            assert_eq!(subject, &format!("{}.{}", a.prefix, m.kind));
            assert_eq!((m.state.as_str(), m.sensor_uuid.as_str()), ("open", U1));
            assert_eq!(m.object_key, key);
            (m.kind.to_string(), m.start.clone(), m.end.clone())
        })
        .collect();
    out.sort_by(|x, y| (&x.1, &x.0).cmp(&(&y.1, &y.0)));
    out
}

#[tokio::test]
async fn a_spike_opens_one_alert_and_a_newer_write_without_it_resolves_it() {
    let p = Pipeline::new().await;
    let a = Alerting::new();
    let w = p.worker("w1", &a.vars("5000"));
    let with_spike = series(true);
    let want = expected(&with_spike);
    assert!(
        want.contains(&("spike".into(), spike_start(), spike_start())),
        "the detector must find the spike: {want:?}"
    );

    let key = "timeseries/a-readings.csv";
    p.env.s3.put(key, csv(&with_spike)).await.unwrap();
    settle(&p, &a, want.len(), want.len(), &[&w]).await;
    assert_eq!(stored(&p, "open").await, want);
    let messages = a.messages(&p).await;
    assert_eq!(opened(&messages, &a, key), want);
    let spike = messages
        .iter()
        .map(|(_, m)| m)
        .find(|m| m.kind == anomaly::Kind::Spike)
        .unwrap();
    assert_eq!(spike.value, Some(with_spike[SPIKE_AT].1));
    assert_eq!(spike.sensor_name, None);

    // A newer object (a later key wins a same-second tie) corrects the spike's reading.
    let fix = "timeseries/b-correction.csv";
    let corrected = series(false);
    p.env
        .s3
        .put(fix, csv(&corrected[SPIKE_AT..=SPIKE_AT]))
        .await
        .unwrap();
    wait_for(
        "the spike to be resolved",
        Duration::from_secs(60),
        &[&w],
        || async {
            stored(&p, "resolved").await.len() == 1
                && unpublished(&p).await.0 == 0
                && a.messages(&p).await.len() == want.len() + 1
        },
    )
    .await;
    assert_eq!(
        stored(&p, "resolved").await,
        vec![("spike".to_string(), spike_start(), spike_start())]
    );
    let messages = a.messages(&p).await;
    let (subject, last) = messages.last().unwrap();
    assert_eq!(subject, &format!("{}.spike", a.prefix));
    assert_eq!(
        (
            last.state.as_str(),
            last.start.as_str(),
            last.object_key.as_str()
        ),
        ("resolved", spike_start().as_str(), fix)
    );
    let row =
        p.db.query_one(
            "SELECT state, revision, published_revision, object_key FROM anomalies \
             WHERE kind = 'spike'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, i32>(2),
            row.get::<_, String>(3)
        ),
        ("resolved".to_string(), 2, 2, fix.to_string())
    );

    let (_, metrics) = w.get("/metrics").await;
    let opened_total: f64 = ["spike", "level_shift", "stuck", "gap"]
        .iter()
        .filter_map(|k| {
            metric(
                &metrics,
                &format!("sensors_anomalies_total{{kind=\"{k}\"}}"),
            )
        })
        .sum();
    assert_eq!(opened_total, want.len() as f64, "{metrics}");
    assert_eq!(
        metric(
            &metrics,
            r#"sensors_anomalies_resolved_total{kind="spike"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&metrics, "sensors_anomaly_detection_duration_seconds_count"),
        Some(2.0)
    );
}

#[tokio::test]
async fn the_same_event_four_times_to_two_workers_opens_each_anomaly_once() {
    let p = Pipeline::new().await;
    let a = Alerting::new();
    p.env.s3.mute(true).unwrap();
    let key = "timeseries/twice.csv";
    let readings = series(true);
    let want = expected(&readings);
    p.env.s3.put(key, csv(&readings)).await.unwrap();
    for _ in 0..4 {
        p.env.s3.announce(key).await.unwrap();
    }
    let (w1, w2) = (
        p.worker("w1", &a.vars("5000")),
        p.worker("w2", &a.vars("5000")),
    );
    wait_drained(&p, &[&w1, &w2]).await;
    settle(&p, &a, want.len(), want.len(), &[&w1, &w2]).await;
    assert_eq!(stored(&p, "open").await, want);
    assert_eq!(unpublished(&p).await, (0, want.len() as i64));
    assert_eq!(opened(&a.messages(&p).await, &a, key), want);
    // Nothing more comes: the work queue is empty and every change is published.
    let queued: i64 = testbed::scalar(&p.db, "SELECT count(*) FROM anomaly_work").await;
    assert_eq!(queued, 0);
}

/// Holds `LOCK TABLE anomalies` in a transaction of its own until released.
struct TableLock(tokio_postgres::Client);

impl TableLock {
    async fn take(p: &Pipeline) -> Self {
        let c = testbed::connect(&p.env.mapping_db).await.unwrap();
        c.batch_execute("BEGIN; LOCK TABLE anomalies IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        Self(c)
    }

    async fn waiters(p: &Pipeline) -> i64 {
        p.db.query_one(
            "SELECT count(*) FROM pg_locks WHERE relation = 'anomalies'::regclass AND NOT granted",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    }

    async fn release(self) {
        self.0.batch_execute("ROLLBACK").await.unwrap();
    }
}

#[tokio::test]
async fn a_detection_killed_after_the_commit_is_done_by_the_next_worker_and_published_once() {
    let p = Pipeline::new().await;
    let a = Alerting::new();
    let readings = series(true);
    let want = expected(&readings);
    let lock = TableLock::take(&p).await;
    // A lock wait longer than the test: the first worker's detection hangs on the lock.
    let mut w1 = p.worker("w1", &a.vars("600000"));
    let key = "timeseries/killed.csv";
    p.env.s3.put(key, csv(&readings)).await.unwrap();
    p.settled(key, "done", &[&w1]).await;
    wait_drained(&p, &[&w1]).await;
    wait_for(
        "detection to wait for the lock",
        Duration::from_secs(60),
        &[&w1],
        || async { TableLock::waiters(&p).await > 0 },
    )
    .await;
    w1.child.kill().await.unwrap(); // SIGKILL
    lock.release().await;

    let w2 = p.worker("w2", &a.vars("5000"));
    settle(&p, &a, want.len(), want.len(), &[&w2]).await;
    assert_eq!(stored(&p, "open").await, want);
    assert_eq!(opened(&a.messages(&p).await, &a, key), want);
    assert_eq!(
        p.status(key).await,
        Some(("done".to_string(), READINGS as i64, 1))
    );
}

#[tokio::test]
async fn a_locked_anomalies_table_delays_detection_not_ingestion() {
    let p = Pipeline::new().await;
    let a = Alerting::new();
    let readings = series(true);
    let want = expected(&readings);
    let lock = TableLock::take(&p).await;
    let w = p.worker("w1", &a.vars("100"));
    let key = "timeseries/locked.csv";
    p.env.s3.put(key, csv(&readings)).await.unwrap();
    // The rows commit and the event is acknowledged while detection cannot get the table.
    p.settled(key, "done", &[&w]).await;
    wait_drained(&p, &[&w]).await;
    wait_for(
        "a detection error",
        Duration::from_secs(60),
        &[&w],
        || async {
            w.log().lines().any(|l| {
                l.contains("anomaly detection failed; it is retried later")
                    && l.contains("db error: ERROR: canceling statement due to lock timeout")
            })
        },
    )
    .await;
    let (_, m) = w.get("/metrics").await;
    let detect_errors = metric(
        &m,
        r#"sensors_anomaly_detection_errors_total{stage="detect"}"#,
    );
    assert!(detect_errors >= Some(1.0), "{m}");
    let readings_stored: i64 = testbed::scalar(&p.db, "SELECT count(*) FROM measurements").await;
    assert_eq!(readings_stored, READINGS as i64);
    let queued: i64 = testbed::scalar(&p.db, "SELECT count(*) FROM anomaly_work").await;
    assert_eq!(queued, 1);

    lock.release().await;
    settle(&p, &a, want.len(), want.len(), &[&w]).await;
    assert_eq!(stored(&p, "open").await, want);
    assert_eq!(opened(&a.messages(&p).await, &a, key), want);
}

async fn cli(p: &Pipeline, extra: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut vars = p.vars();
    vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let out = testbed::run_binary(env!("CARGO_BIN_EXE_sensors-worker"), &vars, args).await;
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `detect --all --since T` that finds nothing new, saying `queued` on stderr.
async fn detect_all(p: &Pipeline, since: &str, queued: &str) {
    let (code, out, err) = cli(p, &[], &["detect", "--all", "--since", since]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, queued);
    assert_eq!(out, "1 sensors detected: 0 anomalies opened, 0 resolved\n");
}

#[tokio::test]
async fn detect_all_fills_the_table_from_stored_history_and_resumes() {
    let p = Pipeline::new().await;
    let readings = series(true);
    let want = expected(&readings);
    p.env.s3.mute(true).unwrap();
    p.env
        .s3
        .put("timeseries/history.csv", csv(&readings))
        .await
        .unwrap();
    // Ingested with detection off: nothing is queued, nothing detected.
    let (code, out, err) = cli(&p, &[("ANOMALY_DETECTION", "off")], &["ingest", "--all"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("anomalies:"), "{out}");
    assert_eq!(p.count("SELECT count(*) FROM anomaly_work").await, 0);
    let (code, _, err) = cli(&p, &[("ANOMALY_DETECTION", "maybe")], &["ingest", "--all"]).await;
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "error: invalid value for ANOMALY_DETECTION: \"maybe\" is neither on nor off\n"
    );

    let (code, out, err) = cli(&p, &[], &["detect", "--all"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(err, "queued detection of 1 sensors\n");
    assert_eq!(
        out,
        format!(
            "1 sensors detected: {} anomalies opened, 0 resolved\n",
            want.len()
        )
    );
    assert_eq!(stored(&p, "open").await, want);
    // History is not news: recorded as published, nothing sent.
    assert_eq!(unpublished(&p).await, (0, want.len() as i64));
    assert_eq!(p.count("SELECT count(*) FROM anomaly_work").await, 0);

    // An interrupted run left work behind: the next run resumes it instead of queueing again.
    p.db.batch_execute(&format!(
        "INSERT INTO anomaly_work (sensor_uuid, span_start, span_end, object_key)
         VALUES ('{U1}', '2013-01-02T00:00:00Z', '2013-01-03T00:00:00Z', '(sensors-worker detect --all)')"
    ))
    .await
    .unwrap();
    detect_all(&p, "2013-01-02T00:00:00Z", "resuming an interrupted run\n").await;
    assert_eq!(stored(&p, "open").await, want);

    // With --since, only that part of the history is judged again: nothing changes.
    detect_all(
        &p,
        "2013-01-02T12:00:00Z",
        "queued detection of 1 sensors\n",
    )
    .await;
    assert_eq!(stored(&p, "open").await, want);

    // Ingested with detection on, `ingest` detects what it wrote and says so: this object
    // rewrites stored readings, so its detection waits for the last object of the run (a
    // re-upload of many objects reads the data after them once). (A later key wins a
    // same-second tie: this object is the newer write.)
    p.env
        .s3
        .put("timeseries/later.csv", csv(&series(false)))
        .await
        .unwrap();
    let (code, out, err) = cli(&p, &[], &["ingest", "--all"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("anomalies: 0 opened\n"), "{out}");
    assert_eq!(
        p.count("SELECT count(*) FROM anomalies WHERE kind = 'spike' AND state = 'resolved'")
            .await,
        1
    );
    assert_eq!(p.count("SELECT count(*) FROM anomaly_work").await, 0);
}
