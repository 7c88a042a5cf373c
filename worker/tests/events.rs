//! `sensors-worker run`, `backfill` and `dlq` against real NATS JetStream, PostgreSQL and an S3
//! server that publishes MinIO's notifications (SPEC §4, §6).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use testbed::TestEnv;

#[tokio::test]
async fn uploads_drive_ingestion_to_the_sample_end_state_and_metrics_show_it() {
    let p = Pipeline::new().await;
    let mut worker = p.worker("w1", &[]);
    assert_eq!(worker.get("/healthz").await, (200, "ok\n".to_string()));

    p.env.s3.put_tree(Path::new(SAMPLE_DATA)).await.unwrap();
    for key in [
        "mapping/mapping.csv",
        "timeseries/2013/part-0000.csv",
        "timeseries/2013/part-0001.csv",
        "timeseries/2013/rules-sample.csv",
    ] {
        p.settled(key, "done", &[&worker]).await;
    }
    assert_eq!(p.count("SELECT count(*) FROM measurements").await, 203);
    assert_eq!(p.count("SELECT count(*) FROM sensors").await, 5);
    assert_eq!(p.count("SELECT count(*) FROM ingest_quarantine").await, 2);
    // Exactly the expected readings.
    let want = testbed::data::expected_readings(Path::new(&format!(
        "{FIXTURES}/sample-expected/measurements.csv"
    )));
    let got = testbed::data::stored_readings(&p.db).await;
    assert_eq!(got, want, "stored readings differ from sample-expected");

    // Every event acknowledged; nothing dead-lettered.
    wait_for(
        "the consumer to drain",
        Duration::from_secs(10),
        &[&worker],
        || async { p.queue.pending().await.unwrap() == 0 },
    )
    .await;
    assert!(p.dead_letters().await.is_empty());

    let (status, metrics) = worker.get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        metric(&metrics, r#"sensors_objects_total{outcome="done"}"#),
        Some(4.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, r#"sensors_rows_total{outcome="ok"}"#),
        Some(209.0)
    );
    assert_eq!(
        metric(&metrics, r#"sensors_rows_total{outcome="rejected"}"#),
        Some(2.0)
    );
    assert_eq!(
        metric(&metrics, r#"sensors_events_total{kind="object_created"}"#),
        Some(4.0)
    );
    assert_eq!(
        metric(&metrics, "sensors_ingest_duration_seconds_count"),
        Some(4.0)
    );
    assert_eq!(metric(&metrics, "sensors_in_flight"), Some(0.0));
    assert_eq!(worker.get("/readyz").await, (200, "ready\n".to_string()));

    worker.signal("TERM");
    assert_eq!(worker.exit_code(Duration::from_secs(30)).await, Some(0));
}

/// Waits until the worker is in the middle of writing an object (its COPY is running).
/// Holds the worker's transaction open half-way: the test locks `ingest_ledger` against writes,
/// so a worker that has staged every row of an object waits at its ledger entry, uncommitted, for
/// as long as the test wants. Dropping the hold (or `release`) lets it go on.
struct MidObject {
    client: tokio_postgres::Client,
}

impl MidObject {
    /// Takes the lock: before the upload, so that no worker can commit the object first.
    async fn lock(p: &Pipeline) -> Self {
        let client = testbed::connect(&p.env.mapping_db).await.unwrap();
        client
            .batch_execute("BEGIN; LOCK TABLE ingest_ledger IN SHARE MODE")
            .await
            .unwrap();
        Self { client }
    }

    /// Waits until a worker is blocked on the lock, mid-object.
    async fn until_waiting(&self, p: &Pipeline, workers: &[&Worker]) {
        wait_for("a worker to wait mid-object", Duration::from_secs(60), workers, || async {
            p.count(
                "SELECT count(*) FROM pg_locks WHERE relation = 'ingest_ledger'::regclass AND NOT granted",
            )
            .await
                > 0
        })
        .await;
    }

    async fn release(self) {
        self.client.batch_execute("COMMIT").await.unwrap();
    }
}

/// Sum of the values of sensor U1 as stored and as `big_file(rows)` has them.
async fn assert_big_file_stored(p: &Pipeline, rows: usize) {
    assert_eq!(
        p.count("SELECT count(*) FROM measurements").await,
        rows as i64
    );
    let sum: f64 = testbed::scalar(&p.db, "SELECT sum(value) FROM measurements").await;
    let want: f64 = (0..rows).map(|i| (i % 1000) as f64 + 0.5).sum();
    assert_eq!(sum, want);
}

#[tokio::test]
async fn the_same_event_twice_and_to_two_workers_is_ingested_once() {
    let p = Pipeline::new().await;
    p.env.s3.mute(true).unwrap();
    let key = "timeseries/twice.csv";
    p.env.s3.put(key, big_file(20_000)).await.unwrap();
    let sensor_pipeline::object_store::ObjectHead { etag, size, .. } =
        p.env.s3.store().head(key).await.unwrap();
    let payload = sensor_pipeline::events::object_created(
        "s3:ObjectCreated:Put",
        &p.env.s3.bucket,
        key,
        &etag,
        size,
    );
    for _ in 0..4 {
        p.queue.publish_event(payload.clone(), None).await.unwrap();
    }
    let (w1, w2) = (p.worker("w1", &[]), p.worker("w2", &[]));
    wait_drained(&p, &[&w1, &w2]).await;
    assert_eq!(p.status(key).await, Some(("done".to_string(), 20_000, 1)));
    assert_big_file_stored(&p, 20_000).await;
    let mut done = 0.0;
    let mut already = 0.0;
    for w in [&w1, &w2] {
        let (_, m) = w.get("/metrics").await;
        done += metric(&m, r#"sensors_objects_total{outcome="done"}"#).unwrap_or(0.0);
        already += metric(&m, r#"sensors_objects_total{outcome="already_done"}"#).unwrap_or(0.0);
    }
    assert_eq!((done, already), (1.0, 3.0));
}

fn constant_file(rows: usize, value: f64) -> String {
    testbed::data::steady_readings(U1, rows, value)
}

#[tokio::test]
async fn an_older_version_that_commits_last_does_not_overwrite_the_newer_one() {
    let p = Pipeline::new().await;
    let (w1, w2) = (p.worker("w1", &[]), p.worker("w2", &[]));
    let key = "timeseries/2013/live.csv";
    // Version 1: 100,000 readings at 1.0, written a minute ago.
    p.env.s3.mute(true).unwrap();
    p.env
        .s3
        .put(key, constant_file(100_000, 1.0))
        .await
        .unwrap();
    let a_minute_ago = std::time::SystemTime::now() - Duration::from_secs(60);
    p.env.s3.set_written_at(key, a_minute_ago).unwrap();
    let v1 = p.env.s3.store().head(key).await.unwrap();
    // The test holds version 1's ingestion lock: the worker that reads it waits before writing.
    let holder = testbed::connect(&p.env.mapping_db).await.unwrap();
    let lock =
        sensor_pipeline::store::ledger::lock_name(&sensor_pipeline::store::ledger::ObjectVersion {
            bucket: p.env.s3.bucket.clone(),
            key: key.to_string(),
            etag: v1.etag.clone(),
            written_at: v1.written_at,
        });
    holder
        .execute("SELECT pg_advisory_lock(hashtextextended($1, 0))", &[&lock])
        .await
        .unwrap();
    p.env.s3.announce(key).await.unwrap();
    p.env.s3.mute(false).unwrap();
    wait_for(
        "a worker to wait for version 1's lock",
        Duration::from_secs(60),
        &[&w1, &w2],
        || async {
            p.count("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
                .await
                == 1
        },
    )
    .await;
    // Version 2, written now, 1,000 readings at 3.0: ingested and committed while version 1
    // (whose bytes are already being read) waits.
    p.env.s3.put(key, constant_file(1_000, 3.0)).await.unwrap();
    let v2 = p.env.s3.store().head(key).await.unwrap();
    let done = |etag: String| {
        let db = &p.db;
        async move {
            db.query_opt(
                "SELECT rows_ok, attempts FROM ingest_ledger WHERE object_key = $1 AND etag = $2 AND status = 'done'",
                &[&key, &etag],
            )
            .await
            .unwrap()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i32>(1)))
        }
    };
    wait_for(
        "version 2 to be done",
        Duration::from_secs(60),
        &[&w1, &w2],
        || async { done(v2.etag.clone()).await.is_some() },
    )
    .await;
    // Now version 1 goes on and commits last.
    holder
        .execute(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
            &[&lock],
        )
        .await
        .unwrap();
    wait_for(
        "version 1 to be done",
        Duration::from_secs(60),
        &[&w1, &w2],
        || async { done(v1.etag.clone()).await.is_some() },
    )
    .await;
    assert_eq!(done(v1.etag.clone()).await, Some((100_000, 1)));
    assert_eq!(done(v2.etag.clone()).await, Some((1_000, 1)));
    let by_value: Vec<(f64, i64, String)> = testbed::rows(
        &p.db,
        "SELECT value, count(*), max(ts AT TIME ZONE 'UTC')::text FROM measurements
         GROUP BY 1 ORDER BY 1",
    )
    .await;
    assert_eq!(
        by_value,
        vec![
            (1.0, 99_000, "2013-01-02 03:46:39".to_string()),
            (3.0, 1_000, "2013-01-01 00:16:39".to_string()),
        ]
    );
    wait_drained(&p, &[&w1, &w2]).await;
}

#[tokio::test]
async fn poison_events_and_failed_objects_are_dead_lettered_and_a_replay_after_the_fix_ends_done() {
    let p = Pipeline::new().await;
    let worker = p.worker("w1", &[]);
    p.queue
        .publish_event(b"not json at all".to_vec(), None)
        .await
        .unwrap();
    p.queue
        .publish_event(br#"{"hello":"world"}"#.to_vec(), None)
        .await
        .unwrap();
    let key = "timeseries/broken.csv";
    p.env
        .s3
        .put(
            key,
            format!("timestamp;sensor_uuid\n2013-01-01T00:00:00Z;{U1}\n"),
        )
        .await
        .unwrap();
    wait_for(
        "three dead letters",
        Duration::from_secs(30),
        &[&worker],
        || async { p.queue.dead_letters().await.map(|l| l.len()).unwrap_or(0) == 3 },
    )
    .await;
    // Acknowledged, so never redelivered: no retry storm.
    wait_drained(&p, &[&worker]).await;
    assert_eq!(p.status(key).await, Some(("failed".to_string(), 0, 1)));

    // The worker handles events concurrently: the letters' order is the
    // order they were filed in, not the order the events were published in.
    let mut letters = p.dead_letters().await;
    letters.sort_by_key(|l| {
        [
            b"not json at all".as_slice(),
            br#"{"hello":"world"}"#.as_slice(),
        ]
        .iter()
        .position(|payload| *payload == l.payload.as_ref())
        .unwrap_or(2)
    });
    assert_eq!(letters[0].payload.as_ref(), b"not json at all");
    assert!(
        letters[0].reason.starts_with("payload is not JSON: "),
        "{}",
        letters[0].reason
    );
    assert!(letters[0].keys.is_empty());
    assert_eq!(letters[1].payload.as_ref(), br#"{"hello":"world"}"#);
    assert_eq!(
        letters[1].reason,
        "payload is not a MinIO bucket notification: missing field `Records`"
    );
    let reason = format!(
        "{key}: the header lacks required column(s) sensor_value; it has: timestamp, sensor_uuid"
    );
    assert_eq!(letters[2].reason, reason);
    assert_eq!(letters[2].keys, vec![key.to_string()]);
    assert_eq!(letters[2].attempts, 1);
    assert!(sensor_pipeline::events::decode(&letters[2].payload).is_ok());

    let list = p.worker_cli(&["dlq", "list"]).await;
    assert_eq!(list.status.code(), Some(0));
    let text = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(text.ends_with("3 dead letters\n"), "{text}");
    assert!(
        text.contains(&format!("attempts 1  {key}  {reason}")),
        "{text}"
    );

    // Fix the object (without a new event), then replay its dead letter.
    p.env.s3.mute(true).unwrap();
    p.env
        .s3
        .put(
            key,
            format!("timestamp;sensor_uuid;sensor_value\n2013-01-01T00:00:00Z;{U1};1.5\n"),
        )
        .await
        .unwrap();
    let id = letters[2].id.to_string();
    let replay = p.worker_cli(&["dlq", "replay", &id]).await;
    assert_eq!(
        replay.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&replay.stdout),
        "replayed 1 dead letters\n"
    );
    p.settled(key, "done", &[&worker]).await;
    assert_eq!(p.count("SELECT count(*) FROM measurements").await, 1);
    assert_eq!(p.dead_letters().await.len(), 2);
    let missing = p.worker_cli(&["dlq", "replay", &id]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&missing.stderr),
        format!("error: no dead letter with id {id}\n")
    );
}

/// A reason can echo input: cut for the dead letter (a message over NATS's `max_payload` could not
/// be published, and the event would loop until stranded), whole in the ledger.
#[tokio::test]
async fn a_huge_failure_reason_is_bounded_in_the_dead_letter_and_whole_in_the_ledger() {
    use sensor_pipeline::queue::dead_letters::{bounded_reason, MAX_REASON_BYTES};
    let p = Pipeline::new().await;
    let worker = p.worker("w1", &[]);
    let key = "timeseries/huge-header.csv";
    // 200,000 control characters in a column name: escaped (`\u{1}` each), 1.2 MB of reason.
    let header = format!("timestamp;sensor_uuid;{}\n", "\u{1}".repeat(200_000));
    p.env.s3.put(key, header).await.unwrap();
    wait_for(
        "a dead letter",
        Duration::from_secs(30),
        &[&worker],
        || async { p.queue.dead_letters().await.map(|l| l.len()).unwrap_or(0) == 1 },
    )
    .await;
    wait_drained(&p, &[&worker]).await;
    let reason = format!(
        "the header lacks required column(s) sensor_value; it has: timestamp, sensor_uuid, {}",
        "\\u{1}".repeat(200_000)
    );
    let stored: String =
        p.db.query_one(
            "SELECT reason FROM ingest_ledger WHERE object_key = $1 AND status = 'failed'",
            &[&key],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored.len(), reason.len());
    assert_eq!(stored, reason);
    let letters = p.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].attempts, 1);
    assert_eq!(letters[0].keys, vec![key.to_string()]);
    assert_eq!(
        letters[0].reason,
        bounded_reason(&format!("{key}: {reason}"))
    );
    assert!(
        letters[0].reason.len() <= MAX_REASON_BYTES,
        "{}",
        letters[0].reason.len()
    );
}

#[tokio::test]
async fn removals_and_keys_outside_the_prefixes_are_acknowledged_and_ignored() {
    let p = Pipeline::new().await;
    let worker = p.worker("w1", &[]);
    let removed = std::fs::read(format!("{FIXTURES}/minio-events/removed.json")).unwrap();
    p.queue.publish_event(removed, None).await.unwrap();
    p.env.s3.put("notes/readme.txt", "hello").await.unwrap();
    p.settled("notes/readme.txt", "ignored", &[&worker]).await;
    wait_drained(&p, &[&worker]).await;
    assert!(p.dead_letters().await.is_empty());
    assert_eq!(p.count("SELECT count(*) FROM ingest_ledger").await, 1);
    let (_, m) = worker.get("/metrics").await;
    assert_eq!(
        metric(&m, r#"sensors_events_total{kind="not_created"}"#),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"sensors_objects_total{outcome="ignored"}"#),
        Some(1.0)
    );
}

/// A worker started with the wrong `MINIO_BUCKET` drains the shared consumer: every event it takes
/// is dead-lettered with the reason (never acknowledged and dropped), and a replay once the right
/// worker runs stores the data.
#[tokio::test]
async fn a_worker_for_another_bucket_dead_letters_the_events_and_a_replay_stores_them() {
    let p = Pipeline::new().await;
    let wrong = p.worker("wrong", &[("MINIO_BUCKET", "another-bucket")]);
    let key = "timeseries/a.csv";
    p.env.s3.put(key, big_file(10)).await.unwrap();
    wait_for(
        "a dead letter",
        Duration::from_secs(30),
        &[&wrong],
        || async { p.queue.dead_letters().await.map(|l| l.len()).unwrap_or(0) == 1 },
    )
    .await;
    wait_drained(&p, &[&wrong]).await;
    let letters = p.dead_letters().await;
    assert_eq!(
        letters[0].reason,
        format!(
            "{key}: the event is for bucket {:?}, but this worker reads bucket \"another-bucket\" \
             (MINIO_BUCKET); replay it once a worker for that bucket consumes the events",
            p.env.s3.bucket
        )
    );
    assert_eq!(letters[0].keys, vec![key.to_string()]);
    assert_eq!(letters[0].attempts, 1);
    assert_eq!(p.status(key).await, None);
    let (_, m) = wrong.get("/metrics").await;
    assert_eq!(
        metric(&m, r#"sensors_events_total{kind="other_bucket"}"#),
        Some(1.0),
        "{m}"
    );
    drop(wrong);

    let right = p.worker("right", &[]);
    let replay = p
        .worker_cli(&["dlq", "replay", &letters[0].id.to_string()])
        .await;
    assert_eq!(replay.status.code(), Some(0));
    p.settled(key, "done", &[&right]).await;
    assert_eq!(p.count("SELECT count(*) FROM measurements").await, 10);
    assert!(p.dead_letters().await.is_empty());
}

/// An event whose last delivery ends with its worker killed is never delivered again: JetStream's
/// max-deliveries advisory names it, and a worker — here one started after the kill — dead-letters
/// it and removes it from the events stream, so it can be replayed instead of aging out unseen.
#[tokio::test]
async fn a_worker_killed_at_the_last_delivery_leaves_a_dead_letter_not_a_lost_event() {
    let p = Pipeline::with_nats(|e| {
        e.ack_wait = Duration::from_secs(1);
        e.max_deliver = 1;
    })
    .await;
    let mut w1 = p.worker("w1", &[("WORKER_CONCURRENCY", "1")]);
    let key = "timeseries/last.csv";
    let hold = MidObject::lock(&p).await;
    p.env.s3.put(key, big_file(1000)).await.unwrap();
    hold.until_waiting(&p, &[&w1]).await;
    w1.signal("KILL");
    assert_eq!(w1.exit_code(Duration::from_secs(10)).await, None);
    hold.release().await;

    let w2 = p.worker("w2", &[]);
    wait_for("a dead letter", Duration::from_secs(30), &[&w2], || async {
        p.queue.dead_letters().await.map(|l| l.len()).unwrap_or(0) == 1
    })
    .await;
    wait_drained(&p, &[&w2]).await;
    let letters = p.dead_letters().await;
    assert_eq!(
        letters[0].reason,
        "stranded: its last delivery (1 of NATS_MAX_DELIVER 1) ended without an ack (the worker \
         holding it stopped, crashed or could not file it)"
    );
    assert_eq!(letters[0].keys, vec![key.to_string()]);
    assert_eq!(letters[0].attempts, 1);
    assert_eq!(p.status(key).await, None);
    let events = p.env.events.as_ref().unwrap();
    let mut stream = p
        .queue
        .jetstream()
        .get_stream(&events.stream)
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
    let (_, m) = w2.get("/metrics").await;
    assert_eq!(
        metric(&m, r#"sensors_stranded_events_total{path="advisory"}"#),
        Some(1.0),
        "{m}"
    );

    let replay = p
        .worker_cli(&["dlq", "replay", &letters[0].id.to_string()])
        .await;
    assert_eq!(replay.status.code(), Some(0));
    p.settled(key, "done", &[&w2]).await;
    assert_eq!(p.count("SELECT count(*) FROM measurements").await, 1000);
}

/// At its last delivery, a shutdown does not hand the event back (nobody would get it again): it
/// is dead-lettered with the reason.
#[tokio::test]
async fn sigterm_past_the_grace_period_at_the_last_delivery_dead_letters_the_event() {
    let p = Pipeline::with_nats(|e| {
        e.max_deliver = 1;
    })
    .await;
    let mut w1 = p.worker("w1", &[("SHUTDOWN_GRACE_SECS", "0")]);
    let key = "timeseries/last.csv";
    let hold = MidObject::lock(&p).await;
    p.env.s3.put(key, big_file(1000)).await.unwrap();
    hold.until_waiting(&p, &[&w1]).await;
    w1.signal("TERM");
    assert_eq!(w1.exit_code(Duration::from_secs(30)).await, Some(0));
    hold.release().await;
    let letters = p.dead_letters().await;
    assert_eq!(letters.len(), 1, "{}", w1.log());
    assert_eq!(
        letters[0].reason,
        "handed back at shutdown on its last delivery (1 of NATS_MAX_DELIVER 1)"
    );
    assert_eq!(letters[0].keys, vec![key.to_string()]);
    wait_drained(&p, &[]).await;
    assert_eq!(p.status(key).await, None);
}

#[tokio::test]
async fn backfill_enqueues_every_object_once_and_wait_reports_the_outcome() {
    let p = Pipeline::new().await;
    p.env.s3.mute(true).unwrap();
    p.env.s3.put_tree(Path::new(SAMPLE_DATA)).await.unwrap();
    p.env
        .s3
        .put("timeseries/broken.csv", "timestamp;sensor_uuid\n")
        .await
        .unwrap();
    let worker = p.worker("w1", &[]);
    let out = p.worker_cli(&["backfill", "--wait"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout,
        "enqueued 5 objects (0 already enqueued within the duplicate window)\n\
         settled: 4 done, 0 ignored, 1 failed, 0 dead-lettered\n\
         failed: timeseries/broken.csv: the header lacks required column(s) sensor_value; it has: timestamp, sensor_uuid\n"
    );
    assert_eq!(p.count("SELECT count(*) FROM measurements").await, 203);

    // Again, within the duplicate window: nothing is enqueued twice.
    let again = p.worker_cli(&["backfill"]).await;
    assert_eq!(again.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&again.stdout),
        "enqueued 0 objects (5 already enqueued within the duplicate window)\n"
    );
    let mapping = p
        .worker_cli(&["backfill", "--prefix", "mapping/", "--wait"])
        .await;
    assert_eq!(mapping.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&mapping.stdout),
        "enqueued 0 objects (1 already enqueued within the duplicate window)\n\
         settled: 1 done, 0 ignored, 0 failed, 0 dead-lettered\n"
    );
    wait_drained(&p, &[&worker]).await;
    assert_eq!(
        p.count("SELECT max(attempts)::bigint FROM ingest_ledger")
            .await,
        1
    );
}

#[tokio::test]
async fn a_worker_killed_mid_object_is_replaced_without_loss_or_duplicates() {
    let p = Pipeline::new().await;
    let rows = 300_000;
    let mut w1 = p.worker("w1", &[("WORKER_CONCURRENCY", "1")]);
    let hold = MidObject::lock(&p).await;
    p.env
        .s3
        .put("timeseries/big.csv", big_file(rows))
        .await
        .unwrap();
    hold.until_waiting(&p, &[&w1]).await;
    w1.signal("KILL");
    assert_eq!(w1.exit_code(Duration::from_secs(10)).await, None);
    hold.release().await;
    assert_eq!(p.status("timeseries/big.csv").await, None);
    let w2 = p.worker("w2", &[]);
    p.settled("timeseries/big.csv", "done", &[&w2]).await;
    assert_big_file_stored(&p, rows).await;
    assert_eq!(
        p.status("timeseries/big.csv").await,
        Some(("done".to_string(), rows as i64, 1))
    );
}

#[tokio::test]
async fn sigterm_finishes_in_flight_work_and_exits_0() {
    let p = Pipeline::new().await;
    let rows = 200_000;
    let mut w1 = p.worker("w1", &[]);
    let hold = MidObject::lock(&p).await;
    p.env
        .s3
        .put("timeseries/big.csv", big_file(rows))
        .await
        .unwrap();
    hold.until_waiting(&p, &[&w1]).await;
    w1.signal("TERM");
    // The worker stops fetching but finishes the object it holds, once the test lets it.
    hold.release().await;
    assert_eq!(w1.exit_code(Duration::from_secs(60)).await, Some(0));
    assert_eq!(
        p.status("timeseries/big.csv").await,
        Some(("done".to_string(), rows as i64, 1))
    );
    wait_drained(&p, &[]).await;
    assert_big_file_stored(&p, rows).await;
}

#[tokio::test]
async fn sigterm_past_the_grace_period_hands_the_object_back() {
    let p = Pipeline::new().await;
    let rows = 200_000;
    let mut w1 = p.worker("w1", &[("SHUTDOWN_GRACE_SECS", "0")]);
    let hold = MidObject::lock(&p).await;
    p.env
        .s3
        .put("timeseries/big.csv", big_file(rows))
        .await
        .unwrap();
    hold.until_waiting(&p, &[&w1]).await;
    w1.signal("TERM");
    // No grace: the worker hands the object back and exits while it is still held.
    assert_eq!(w1.exit_code(Duration::from_secs(30)).await, Some(0));
    hold.release().await;
    assert_eq!(p.status("timeseries/big.csv").await, None);
    let w2 = p.worker("w2", &[]);
    p.settled("timeseries/big.csv", "done", &[&w2]).await;
    assert_big_file_stored(&p, rows).await;
}

/// A sensor besides U1.
const OTHER_SENSOR: &str = "8f6b2a1e-3c4d-4e5f-9a0b-1c2d3e4f5a6b";

/// The seconds a worker has waited for a dependency to come back: `what` is `fetch` (the
/// consumer, not fetching) or `event` (events held, summed).
async fn waited(w: &Worker, what: &str) -> f64 {
    let (_, m) = w.get("/metrics").await;
    let series = format!(r#"sensors_dependency_wait_seconds_total{{what="{what}"}}"#);
    metric(&m, &series).unwrap_or(0.0)
}

/// A pipeline on `nats` and `db` with a small delivery budget: 1 s ack wait, 3 deliveries
/// (redelivered after 1 s, 2 s).
async fn small_budget(nats: &str, db: String) -> Pipeline {
    let env = TestEnv::with_events_at(nats, db).await.unwrap();
    Pipeline::from_env_with_nats(env, |e| {
        e.ack_wait = Duration::from_secs(1);
        e.max_deliver = 3;
    })
    .await
}

/// The seconds of waiting that outlast the whole delivery budget of [`small_budget`] twice.
const OUTLASTS_THE_BUDGET: f64 = 10.0;

/// PostgreSQL goes away mid-object and stays away longer than the event's whole delivery budget:
/// the worker holds the event (in-progress acks, no nak) and fetches nothing until the database
/// is back — nothing dead-lettered, nothing nak'ed, the end state exact.
#[tokio::test]
async fn a_postgres_outage_longer_than_the_delivery_budget_dead_letters_nothing() {
    let (mut pg, admin) = testbed::owned_postgres().await.unwrap();
    let admin_client = testbed::connect(&admin).await.unwrap();
    admin_client
        .batch_execute("CREATE DATABASE outage")
        .await
        .unwrap();
    let db = format!("{}/outage", admin.rsplit_once('/').unwrap().0);
    let nats = testbed::nats().await.unwrap().url.clone();
    let mut p = small_budget(&nats, db).await;
    let rows = 200_000;
    let w1 = p.worker("w1", &[]);
    // Mid-object (its transaction open), the server goes away; the test's lock goes with it.
    let hold = MidObject::lock(&p).await;
    p.env
        .s3
        .put("timeseries/big.csv", big_file(rows))
        .await
        .unwrap();
    hold.until_waiting(&p, &[&w1]).await;
    pg.stop().await.unwrap();
    // Another upload during the outage: not fetched until the database is back.
    p.env
        .s3
        .put(
            "timeseries/small.csv",
            testbed::data::steady_readings(OTHER_SENSOR, 10, 7.0),
        )
        .await
        .unwrap();
    wait_for(
        "the worker to hold the event",
        Duration::from_secs(30),
        &[&w1],
        || async { w1.log().contains("a dependency is down: holding the event") },
    )
    .await;
    let (status, body) = w1.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("not ready: mapping database: "), "{body}");
    wait_for(
        "the outage to outlast the delivery budget",
        Duration::from_secs(120),
        &[&w1],
        || async { waited(&w1, "event").await >= OUTLASTS_THE_BUDGET },
    )
    .await;
    pg.start().await.unwrap();
    p.db = testbed::connect(&p.env.mapping_db).await.unwrap();
    p.settled("timeseries/big.csv", "done", &[&w1]).await;
    p.settled("timeseries/small.csv", "done", &[&w1]).await;
    wait_drained(&p, &[&w1]).await;
    assert!(p.dead_letters().await.is_empty());
    assert_eq!(
        p.count(&format!(
            "SELECT count(*) FROM measurements WHERE sensor_uuid = '{OTHER_SENSOR}'"
        ))
        .await,
        10
    );
    p.db.batch_execute(&format!(
        "DELETE FROM measurements WHERE sensor_uuid = '{OTHER_SENSOR}'"
    ))
    .await
    .unwrap();
    assert_big_file_stored(&p, rows).await;
    let (_, m) = w1.get("/metrics").await;
    assert_eq!(
        metric(&m, r#"sensors_objects_total{outcome="retried"}"#),
        None,
        "{m}"
    );
    assert_eq!(
        metric(&m, r#"sensors_objects_total{outcome="done"}"#),
        Some(2.0)
    );
}

#[tokio::test]
async fn the_worker_reconnects_after_a_nats_restart() {
    let (mut nats, url) = testbed::owned_nats().await.unwrap();
    let db = testbed::database().await.unwrap();
    let p = Pipeline::from_env(TestEnv::with_events_at(&url, db).await.unwrap()).await;
    let worker = p.worker("w1", &[]);
    p.env
        .s3
        .put("timeseries/a.csv", big_file(10))
        .await
        .unwrap();
    p.settled("timeseries/a.csv", "done", &[&worker]).await;
    nats.stop().await.unwrap();
    nats.start().await.unwrap();
    p.env
        .s3
        .put("timeseries/b.csv", big_file(20))
        .await
        .unwrap();
    p.settled("timeseries/b.csv", "done", &[&worker]).await;
    assert_eq!(p.count("SELECT count(*) FROM measurements").await, 20);
}

#[tokio::test]
async fn in_progress_acks_keep_a_long_object_from_being_redelivered() {
    // An ack wait of 1 s, and an object held mid-way for several ack waits.
    let p = Pipeline::with_nats(|e| {
        e.ack_wait = Duration::from_secs(1);
    })
    .await;
    let rows = 100_000;
    let (w1, w2) = (p.worker("w1", &[]), p.worker("w2", &[]));
    let hold = MidObject::lock(&p).await;
    p.env
        .s3
        .put("timeseries/long.csv", big_file(rows))
        .await
        .unwrap();
    hold.until_waiting(&p, &[&w1, &w2]).await;
    // Without in-progress acks JetStream would hand the event to the other worker after 1 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    hold.release().await;
    p.settled("timeseries/long.csv", "done", &[&w1, &w2]).await;
    wait_drained(&p, &[&w1, &w2]).await;
    let mut outcomes = Vec::new();
    for w in [&w1, &w2] {
        let (_, m) = w.get("/metrics").await;
        outcomes.push((
            metric(&m, r#"sensors_objects_total{outcome="done"}"#).unwrap_or(0.0),
            metric(&m, r#"sensors_objects_total{outcome="already_done"}"#).unwrap_or(0.0),
        ));
    }
    // Delivered once: no worker saw it a second time.
    let done: f64 = outcomes.iter().map(|o| o.0).sum();
    let again: f64 = outcomes.iter().map(|o| o.1).sum();
    assert_eq!(
        (done, again),
        (1.0, 0.0),
        "{outcomes:?}\n{}\n---\n{}",
        w1.log(),
        w2.log()
    );
    assert_big_file_stored(&p, rows).await;
}

/// The object store answers 503 for longer than an event's whole delivery budget: the worker
/// fetches nothing (or holds what it fetched) until it answers again — nothing dead-lettered.
#[tokio::test]
async fn an_object_store_outage_longer_than_the_delivery_budget_dead_letters_nothing() {
    let nats = testbed::nats().await.unwrap().url.clone();
    let db = testbed::database().await.unwrap();
    let p = small_budget(&nats, db).await;
    let worker = p.worker("w1", &[]);
    let key = "timeseries/during-outage.csv";
    p.env.s3.mute(true).unwrap();
    p.env.s3.put(key, big_file(100)).await.unwrap();
    let sensor_pipeline::object_store::ObjectHead { etag, size, .. } =
        p.env.s3.store().head(key).await.unwrap();
    p.env.s3.set_down(true).unwrap();
    let event = sensor_pipeline::events::object_created(
        "s3:ObjectCreated:Put",
        &p.env.s3.bucket,
        key,
        &etag,
        size,
    );
    p.queue.publish_event(event, None).await.unwrap();
    wait_for(
        "the outage to outlast the delivery budget",
        Duration::from_secs(120),
        &[&worker],
        || async { waited(&worker, "fetch").await >= OUTLASTS_THE_BUDGET },
    )
    .await;
    let (status, body) = worker.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("not ready: object store request HeadBucket failed"),
        "{body}"
    );
    assert_eq!(p.status(key).await, None);
    p.env.s3.set_down(false).unwrap();
    p.settled(key, "done", &[&worker]).await;
    assert_big_file_stored(&p, 100).await;
    wait_drained(&p, &[&worker]).await;
    assert!(p.dead_letters().await.is_empty());
    let (_, m) = worker.get("/metrics").await;
    assert_eq!(
        metric(&m, r#"sensors_objects_total{outcome="retried"}"#),
        None,
        "{m}"
    );
}

/// NATS itself goes away mid-object for longer than the delivery budget: the object commits
/// meanwhile, its ack is lost, and after the restart the redelivery finds it done — nothing
/// dead-lettered, nothing ingested twice.
#[tokio::test]
async fn a_nats_outage_longer_than_the_delivery_budget_dead_letters_nothing() {
    let (mut nats, url) = testbed::owned_nats().await.unwrap();
    let db = testbed::database().await.unwrap();
    let p = small_budget(&url, db).await;
    let rows = 100_000;
    let w1 = p.worker("w1", &[]);
    let hold = MidObject::lock(&p).await;
    p.env
        .s3
        .put("timeseries/big.csv", big_file(rows))
        .await
        .unwrap();
    hold.until_waiting(&p, &[&w1]).await;
    nats.stop().await.unwrap();
    hold.release().await;
    p.settled("timeseries/big.csv", "done", &[&w1]).await;
    wait_for(
        "the outage to outlast the delivery budget",
        Duration::from_secs(120),
        &[&w1],
        || async { waited(&w1, "fetch").await >= OUTLASTS_THE_BUDGET },
    )
    .await;
    nats.start().await.unwrap();
    wait_drained(&p, &[&w1]).await;
    assert!(p.dead_letters().await.is_empty());
    assert_big_file_stored(&p, rows).await;
    assert_eq!(
        p.status("timeseries/big.csv").await,
        Some(("done".to_string(), rows as i64, 1))
    );
}

/// An object past a limit is dead-lettered with the limit named, at its first delivery, and the
/// worker stays ready and goes on with the next object.
#[tokio::test]
async fn an_object_past_a_limit_is_dead_lettered_and_the_worker_goes_on() {
    let p = Pipeline::new().await;
    let worker = p.worker("w1", &[("MAX_REJECTED_ROWS", "1")]);
    let key = "timeseries/rejects.csv";
    p.env
        .s3
        .put(
            key,
            format!("timestamp;sensor_uuid;sensor_value\nx;{U1};1\ny;{U1};2\n"),
        )
        .await
        .unwrap();
    p.settled(key, "failed", &[&worker]).await;
    wait_drained(&p, &[&worker]).await;
    let letters = p.dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].reason,
        format!(
            "{key}: more than MAX_REJECTED_ROWS (1) rows were rejected, the last at line 3: \
             timestamp \"y\" is not an ISO 8601 date-time (expected YYYY-MM-DDTHH:MM[:SS[.ffffff]][Z|±HH[:MM]])"
        )
    );
    assert_eq!(letters[0].attempts, 1);
    assert_eq!(worker.get("/readyz").await, (200, "ready\n".to_string()));
    p.env
        .s3
        .put("timeseries/fine.csv", big_file(10))
        .await
        .unwrap();
    p.settled("timeseries/fine.csv", "done", &[&worker]).await;
    assert_eq!(p.count("SELECT count(*) FROM measurements").await, 10);
}

/// `provision --check` prints how the topology differs and exits 1, changing nothing; a worker
/// started with other settings leaves the consumer as it is and works with its limits.
#[tokio::test]
async fn provision_check_prints_the_drift_and_workers_leave_the_consumer_as_it_is() {
    let p = Pipeline::with_nats(|e| {
        e.max_deliver = 2;
    })
    .await;
    let events = p.env.events.clone().unwrap();
    let mut vars = p.vars();
    vars.retain(|(k, _)| k != "NATS_MAX_DELIVER");
    vars.push(("NATS_MAX_DELIVER".into(), "5".into()));
    vars.push(("ANOMALY_DETECTION".into(), "off".into()));
    let out = testbed::run_binary(
        env!("CARGO_BIN_EXE_sensors-worker"),
        &vars,
        &["provision", "--check"],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with(&format!(
            "differs: consumer {} on stream {}: max_deliver is 2, this version provisions 5\n",
            events.consumer, events.stream
        )),
        "{stdout}"
    );
    assert!(stdout.ends_with(": 2 differences\n"), "{stdout}");

    let worker = p.worker("w1", &[("NATS_MAX_DELIVER", "5")]);
    p.env
        .s3
        .put("timeseries/a.csv", big_file(10))
        .await
        .unwrap();
    p.settled("timeseries/a.csv", "done", &[&worker]).await;
    assert!(
        worker.log().contains("working with the consumer's"),
        "{}",
        worker.log()
    );
    let mut consumer = p.queue.consumer().await.unwrap();
    assert_eq!(consumer.info().await.unwrap().config.max_deliver, 2);
}

/// A three-node JetStream cluster with every stream at three replicas and two workers connected
/// to different nodes: the node leading the events stream dies while both workers are mid-object.
/// The streams and the consumer fail over, the clients reconnect to the nodes left, and the end
/// state is exact: nothing dead-lettered, every object ingested once (one ledger attempt each).
#[tokio::test]
async fn the_stream_leader_dying_mid_dataset_loses_nothing_and_ingests_nothing_twice() {
    let (mut nodes, urls) = testbed::owned_nats_cluster().await.unwrap();
    let db = testbed::database().await.unwrap();
    let env = TestEnv::with_events_replicated(&urls[2], db, 3)
        .await
        .unwrap();
    let p = Pipeline::from_env(env).await;
    // Each worker on its own node, and named in PostgreSQL so the test can see both waiting.
    let worker = |name: &str, url: &str| {
        let db = format!("{}?application_name={name}", p.env.mapping_db);
        p.worker(
            name,
            &[
                ("NATS_URL", url),
                ("NATS_STREAM_REPLICAS", "3"),
                ("DATABASE_URL", &db),
                ("TIMESCALE_DATABASE_URL", &db),
            ],
        )
    };
    let (w1, w2) = (worker("w1", &urls[0]), worker("w2", &urls[1]));
    // Both workers will wait mid-object on this lock.
    let lock = testbed::connect(&p.env.mapping_db).await.unwrap();
    lock.batch_execute("BEGIN; LOCK TABLE ingest_ledger IN SHARE MODE")
        .await
        .unwrap();
    // Objects too large to be grouped (over `GROUP_OBJECT_BYTES`): each worker holds at most its
    // concurrency of them not yet ingested, so both take some. (Small objects queued for a group
    // free their place at once: one worker could take them all.)
    let files = 10;
    let rows = 6_000;
    for i in 0..files {
        let sensor = format!("00000000-0000-4000-8000-0000000000{i:02}");
        p.env
            .s3
            .put(
                &format!("timeseries/device-{i:02}.csv"),
                testbed::data::steady_readings(&sensor, rows, i as f64),
            )
            .await
            .unwrap();
    }
    wait_for(
        "both workers to wait mid-object",
        Duration::from_secs(60),
        &[&w1, &w2],
        || async {
            p.count(
                "SELECT count(DISTINCT a.application_name) FROM pg_locks l \
                 JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.relation = 'ingest_ledger'::regclass AND NOT l.granted",
            )
            .await
                >= 2
        },
    )
    .await;
    let events = p.env.events.clone().unwrap();
    let mut stream = p
        .queue
        .jetstream()
        .get_stream(&events.stream)
        .await
        .unwrap();
    let info = stream.info().await.unwrap();
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a stream leader");
    assert_eq!(info.config.num_replicas, 3);
    let index: usize = leader.trim_start_matches('n').parse::<usize>().unwrap() - 1;
    nodes[index].stop().await.unwrap();
    lock.batch_execute("COMMIT").await.unwrap();

    for i in 0..files {
        p.settled(
            &format!("timeseries/device-{i:02}.csv"),
            "done",
            &[&w1, &w2],
        )
        .await;
    }
    wait_drained(&p, &[&w1, &w2]).await;
    assert!(p.dead_letters().await.is_empty());
    assert_eq!(
        p.count("SELECT count(*) FROM measurements").await,
        (files * rows) as i64
    );
    assert_eq!(
        p.count("SELECT count(*) FROM ingest_ledger WHERE status = 'done' AND attempts = 1")
            .await,
        files as i64
    );
    assert_eq!(
        p.count("SELECT count(*) FROM ingest_ledger").await,
        files as i64
    );
}

/// `run` over `verify-full`: events are ingested. With the wrong CA the worker stays up, not
/// ready, saying why in one line — and holds the event instead of dead-lettering it; with the
/// right CA the same event is ingested.
#[tokio::test]
async fn run_over_verified_tls_and_a_wrong_ca_is_not_ready_and_dead_letters_nothing() {
    let pki = testbed::tls::Pki::new().unwrap();
    let (_pg, url) = testbed::owned_postgres_tls(&pki, false).await.unwrap();
    let with_ca = |ca: &Path| format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());
    testbed::connect(&with_ca(&pki.ca))
        .await
        .unwrap()
        .batch_execute("CREATE DATABASE tls")
        .await
        .unwrap();
    let db = with_ca(&pki.ca).replacen("/postgres?", "/tls?", 1);
    let nats = testbed::nats().await.unwrap().url.clone();
    let p = Pipeline::from_env(TestEnv::with_events_at(&nats, db.clone()).await.unwrap()).await;
    let wrong = db.replace(
        &pki.ca.display().to_string(),
        &pki.other_ca.display().to_string(),
    );
    let w1 = p.worker(
        "wrong-ca",
        &[("DATABASE_URL", &wrong), ("TIMESCALE_DATABASE_URL", &wrong)],
    );
    let (status, body) = w1.get("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "not ready: mapping database: no connection available: error performing TLS handshake: \
         invalid peer certificate: UnknownIssuer\n"
    );
    p.env
        .s3
        .put("timeseries/tls.csv", big_file(10))
        .await
        .unwrap();
    drop(w1);
    assert!(p.dead_letters().await.is_empty());
    let w2 = p.worker("right-ca", &[]);
    p.settled("timeseries/tls.csv", "done", &[&w2]).await;
    assert_eq!(p.count("SELECT count(*) FROM measurements").await, 10);
    assert!(p.dead_letters().await.is_empty());
}

/// Over NATS servers that demand each kind of credentials — user and password, a token, an nkey,
/// a creds file of an operator/account/user set, TLS with a client certificate — the worker
/// provisions, ingests and dead-letters. Wrong credentials: the worker stays up, not ready, saying
/// why in one line.
#[tokio::test]
async fn the_worker_works_over_each_kind_of_nats_credentials() {
    use sensor_pipeline::config::{NatsAuth, Secret};
    let pki = testbed::tls::Pki::new().unwrap();
    let path = |p: &Path| p.display().to_string();
    let refused_because = |kind: &str| match kind {
        "TLS with a client certificate" => "nats: IO error",
        _ => "nats: authorization violation",
    };
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let file = files.path().join(name);
        std::fs::write(&file, text).unwrap();
        path(&file)
    };
    let (nkey_user, nkey_stranger) = (
        testbed::nats_auth::NkeyUser::new().unwrap(),
        testbed::nats_auth::NkeyUser::new().unwrap(),
    );
    let nkey_config = write(
        "nkey.conf",
        &testbed::nats_auth::nkey_server_config(&[&nkey_user]),
    );
    let nkey_seed_file = write("worker.nk", &format!("{}\n", nkey_user.seed));
    let (operator, stranger) = (
        testbed::nats_auth::Operator::new("sensors").unwrap(),
        testbed::nats_auth::Operator::new("elsewhere").unwrap(),
    );
    let operator_config = write("operator.conf", &operator.server_config);
    let creds_file = write("worker.creds", &operator.creds);
    // Each case: the server's arguments, the credentials (the harness passes them in variables),
    // more variables for the worker that must get through (the `_FILE` forms), wrong credentials.
    type Case<'a> = (
        &'a str,
        Vec<String>,
        NatsAuth,
        Vec<(&'a str, String)>,
        NatsAuth,
    );
    let cases: Vec<Case> = vec![
        (
            "user and password",
            ["--user", "sensors", "--pass", "s3cret"]
                .map(String::from)
                .to_vec(),
            NatsAuth {
                user: Some("sensors".into()),
                password: Some(Secret::new("s3cret")),
                ..NatsAuth::default()
            },
            vec![],
            NatsAuth {
                user: Some("sensors".into()),
                password: Some(Secret::new("wrong")),
                ..NatsAuth::default()
            },
        ),
        (
            "token",
            ["--auth", "t0ken"].map(String::from).to_vec(),
            NatsAuth {
                token: Some(Secret::new("t0ken")),
                ..NatsAuth::default()
            },
            vec![],
            NatsAuth {
                token: Some(Secret::new("wrong")),
                ..NatsAuth::default()
            },
        ),
        (
            "nkey",
            vec!["-c".into(), nkey_config],
            NatsAuth {
                nkey_seed: Some(Secret::new(nkey_user.seed.clone())),
                ..NatsAuth::default()
            },
            vec![
                ("NATS_NKEY_SEED", String::new()),
                ("NATS_NKEY_SEED_FILE", nkey_seed_file),
            ],
            NatsAuth {
                nkey_seed: Some(Secret::new(nkey_stranger.seed.clone())),
                ..NatsAuth::default()
            },
        ),
        (
            "creds file",
            vec!["-c".into(), operator_config],
            NatsAuth {
                creds: Some(Secret::new(operator.creds.clone())),
                ..NatsAuth::default()
            },
            vec![
                ("NATS_CREDS", String::new()),
                ("NATS_CREDS_FILE", creds_file),
            ],
            NatsAuth {
                creds: Some(Secret::new(stranger.creds.clone())),
                ..NatsAuth::default()
            },
        ),
        (
            "TLS with a client certificate",
            vec![
                "--tls".into(),
                "--tlscert".into(),
                path(&pki.server_cert),
                "--tlskey".into(),
                path(&pki.server_key),
                "--tlsverify".into(),
                "--tlscacert".into(),
                path(&pki.ca),
            ],
            NatsAuth {
                tls_ca: Some(pki.ca.clone()),
                tls_cert: Some(pki.client_cert.clone()),
                tls_key: Some(pki.client_key.clone()),
                ..NatsAuth::default()
            },
            vec![],
            NatsAuth {
                tls_ca: Some(pki.other_ca.clone()),
                ..NatsAuth::default()
            },
        ),
    ];
    for (kind, args, good, good_vars, bad) in cases {
        let (_nats, url) = testbed::owned_nats_with(&args).await.unwrap();
        let db = testbed::database().await.unwrap();
        let env = TestEnv::with_events_as(&url, db, 1, good).await.unwrap();
        let p = Pipeline::from_env(env).await;
        let good_vars: Vec<(&str, &str)> =
            good_vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let worker = p.worker(kind, &good_vars);
        p.env
            .s3
            .put("timeseries/a.csv", big_file(10))
            .await
            .unwrap();
        p.settled("timeseries/a.csv", "done", &[&worker]).await;
        p.queue
            .publish_event(b"not json".to_vec(), None)
            .await
            .unwrap();
        wait_for(kind, Duration::from_secs(30), &[&worker], || async {
            p.queue.dead_letters().await.map(|l| l.len()).unwrap_or(0) == 1
        })
        .await;

        let bad_vars: Vec<(String, String)> = {
            let mut e = p.env.events.clone().unwrap();
            e.auth = bad;
            let env = TestEnv {
                s3: testbed::S3Server::start("unused").await.unwrap(),
                mapping_db: p.env.mapping_db.clone(),
                measurements_db: p.env.measurements_db.clone(),
                events: Some(e),
            };
            env.vars()
                .into_iter()
                .filter(|(k, _)| k.starts_with("NATS_"))
                .collect()
        };
        let extra: Vec<(&str, &str)> = bad_vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let refused = p.worker(&format!("{kind} (wrong)"), &extra);
        wait_for(
            "the reason",
            Duration::from_secs(30),
            &[&refused],
            || async {
                let (status, text) = refused.get("/readyz").await;
                status == 503 && text.starts_with("not ready: NATS is not connected: ")
            },
        )
        .await;
        let (_, body) = refused.get("/readyz").await;
        assert_eq!(
            body,
            format!(
                "not ready: NATS is not connected: {}\n",
                refused_because(kind)
            )
        );
        assert!(refused.child.id().is_some(), "the worker stays up");
    }
}

/// `NATS_URL` lists several servers: with the first one down, the worker connects to the next.
#[tokio::test]
async fn with_several_nats_urls_and_the_first_down_the_worker_uses_the_next() {
    let p = Pipeline::new().await;
    let down = format!("nats://127.0.0.1:{}", testbed::free_port().unwrap());
    let url = format!("{down},{}", p.env.events.as_ref().unwrap().url.expose());
    let worker = p.worker("w1", &[("NATS_URL", &url)]);
    p.env
        .s3
        .put("timeseries/a.csv", big_file(10))
        .await
        .unwrap();
    p.settled("timeseries/a.csv", "done", &[&worker]).await;
    assert_eq!(worker.get("/readyz").await, (200, "ready\n".to_string()));
}

/// The NATS accounts of `nats/accounts.conf` (what docker-compose.yml runs): MinIO's user, in an
/// account of its own, publishes events through the imported service into the workers' account,
/// whose user provisions, consumes and dead-letters; MinIO's user can do nothing else — not
/// publish dead letters, not purge the stream, not read the events.
#[tokio::test]
async fn the_shipped_nats_users_let_minio_only_publish_events() {
    use sensor_pipeline::config::{Env, NatsSettings};
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../nats/accounts.conf"),
        dir.path().join("accounts.conf"),
    )
    .unwrap();
    let conf = dir.path().join("server.conf");
    std::fs::write(&conf, "include \"accounts.conf\"\n").unwrap();
    let (_nats, url) = testbed::owned_nats_with_env(
        &[
            ("NATS_WORKER_PASSWORD", "w0rker"),
            ("NATS_MINIO_PASSWORD", "m1nio"),
        ],
        &["-c".into(), conf.display().to_string()],
    )
    .await
    .unwrap();
    // The production names (the defaults): MinIO's user may publish to `minio.events` only.
    let as_user = |user: &str, password: &str| {
        NatsSettings::from_env(&Env::from_map([
            ("NATS_URL", url.as_str()),
            ("NATS_USER", user),
            ("NATS_PASSWORD", password),
            ("NATS_ACK_WAIT_SECS", "2"),
        ]))
        .unwrap()
    };
    let workers = as_user("sensors-worker", "w0rker");
    let minio = as_user("minio", "m1nio");
    assert_eq!(workers.subject, "minio.events");
    let db = testbed::database().await.unwrap();
    let s3 = testbed::S3Server::start_notifying(
        "code-challenge-data",
        testbed::NotifyTarget {
            nats_url: url.clone(),
            subject: minio.subject.clone(),
            auth: minio.auth.clone(),
        },
    )
    .await
    .unwrap();
    let p = Pipeline::from_env(TestEnv {
        s3,
        mapping_db: db.clone(),
        measurements_db: db,
        events: Some(workers.clone()),
    })
    .await;
    p.queue.provision().await.unwrap();

    // MinIO's notification, published as its user (a JetStream publish: it waits for the ack).
    p.env
        .s3
        .put("timeseries/a.csv", big_file(10))
        .await
        .unwrap();
    assert_eq!(p.queue.pending().await.unwrap(), 1);

    // Everything else MinIO's user tries is refused, each with the server's one line.
    let refusals = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let noted = refusals.clone();
    let intruder = sensor_pipeline::queue::connect_options(&minio.auth)
        .unwrap()
        .event_callback(move |event| {
            let noted = noted.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    // Servers differ in case: 2.9 "Permissions Violation for Publish to …".
                    noted.lock().unwrap().push(e.to_string().to_lowercase());
                }
            }
        })
        .connect(url.as_str())
        .await
        .unwrap();
    intruder
        .publish("sensors.dlq", "forged".into())
        .await
        .unwrap();
    intruder
        .publish("$JS.API.STREAM.PURGE.SENSOR_EVENTS", "".into())
        .await
        .unwrap();
    let _sub = intruder.subscribe("minio.events").await.unwrap();
    intruder.flush().await.unwrap();
    // The server answers in order: once the flush's PONG is back, the refusals have been sent.
    wait_for("the refusals", Duration::from_secs(10), &[], || async {
        refusals.lock().unwrap().len() == 3
    })
    .await;
    assert_eq!(
        *refusals.lock().unwrap(),
        vec![
            "nats: permissions violation for publish to \"sensors.dlq\"".to_string(),
            "nats: permissions violation for publish to \"$js.api.stream.purge.sensor_events\""
                .to_string(),
            "nats: permissions violation for subscription to \"minio.events\"".to_string(),
        ]
    );
    assert_eq!(p.queue.pending().await.unwrap(), 1, "not purged");
    assert!(p.dead_letters().await.is_empty(), "no forged dead letter");

    // The workers' user: consume, ingest, dead-letter.
    let worker = p.worker("w1", &[]);
    p.settled("timeseries/a.csv", "done", &[&worker]).await;
    assert_eq!(p.count("SELECT count(*) FROM measurements").await, 10);
    p.queue
        .publish_event(b"not json".to_vec(), None)
        .await
        .unwrap();
    wait_for(
        "the dead letter",
        Duration::from_secs(30),
        &[&worker],
        || async { p.dead_letters().await.len() == 1 },
    )
    .await;
}
