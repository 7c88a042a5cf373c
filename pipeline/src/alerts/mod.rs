//! Anomalies as data arrives: detect over the spans an object wrote, keep the verdicts in the
//! `anomalies` table, publish each change to NATS JetStream.
//!
//! # The flow
//!
//! 1. **Queue.** After the merge of a measurement object ([`crate::store::staging`]), in the
//!    object's own transaction, one `anomaly_work` row per sensor with valid rows in the object:
//!    the sensor and its first and last instant there. So detection is never lost (the work
//!    commits with the rows) and never in the way: it runs after the commit, and its errors cannot
//!    touch the object's outcome. (A version that lost to a newer one queues work that changes
//!    nothing; a version already `done` queues none.)
//! 2. **Detect.** [`Alerts::detect_due`] takes one sensor's queued work at a time, in a transaction
//!    that locks the work rows (`FOR UPDATE SKIP LOCKED`: two workers never take the same row)
//!    and then the sensor (a transaction-level advisory lock: detections of one sensor run one
//!    after the other, whichever worker runs them). For each span it runs the library's
//!    [`Detector`] from a warm-up before the span to a few readings after it, reading the stored
//!    readings (the merged truth, whatever order objects came in), and compares what it finds
//!    whose first reading lies in the *judged range* — from [`LOOKBACK`] readings before the span
//!    to its end — with the stored anomalies of that range: new ones are opened, stored open ones
//!    no longer found are resolved (a newer write removed their reason), resolved ones found again
//!    are reopened, the rest are left as they are (their end, value and score are refreshed).
//!    It also settles the rollup hours within the spans that a replacing merge left inexact
//!    (from the objects' own readings when they provably are all the hour holds, else from the
//!    stored readings). The work rows are deleted in the same transaction. An error rolls it
//!    all back and the work rows are retried later with a growing delay (`not_before`); a
//!    worker killed half-way leaves them for the next one.
//! 3. **Publish.** Every change of state bumps the row's `revision`; rows whose
//!    `published_revision` is behind are the outbox. [`Alerts::publish_due`] publishes them to
//!    `<prefix>.<kind>` with the message id `<sensor>:<kind>:<start µs>:<revision>`, then records
//!    the revision. A publisher killed between the two publishes again with the same id, which
//!    JetStream drops within the stream's duplicate window: one message per change.
//!
//! Re-ingesting, redelivered events and replays queue no work (the ledger makes them no-ops, and
//! an older version changes no row); two workers on overlapping data are serialised per sensor
//! and see the same stored readings, so the table has one row per (sensor, start, kind) and a
//! verdict changes only when the readings do.
//!
//! # Resuming, and bounds
//!
//! Data mostly arrives in time order, and re-reading a warm-up for every object would cost more
//! than ingesting it. So after each detection the sensor's detector is saved as it was after the
//! last reading judged (`anomaly_detectors`, the newest [`SAVED_DETECTORS`]: a few kilobytes each,
//! see [`Detector::to_bytes`]). A span resumes the newest one saved before it (within the
//! detector's memory) and reads only from there; then only the anomalies that detector had not
//! decided yet ([`Detector::provisional`]) and those after its end are judged again: what it
//! decided cannot change by appending. When the object's own readings are all that lies after
//! that detector (it is the newest saved, no other queued work overlaps the span, and the merge
//! stored every one of them: [`crate::readings::Held`]), they are fed to it from memory
//! and only the tail is read. Without one (the first data, late data, corrections) the
//! detection starts from a warm-up before the span — the one `query-cli anomalies` uses
//! ([`WARM_UP_MICROS`] and [`WARM_UP_READINGS`]), capped at [`WARM_UP_MAX_READINGS`] for sensors
//! that read more often than every 23 s; given the objects' readings ([`Alerts::detect_held`]:
//! `ingest` keeps those of re-uploads), it feeds the hours they provably are all of from memory
//! (see [`Link`](crate::store::staging::Link)) and reads back only the rest. Either way, when
//! readings before a saved detector's end changed, the detection reads on to the newest one's
//! end (within the memory), judges all of it, and replaces the detectors it made stale with one
//! saved there.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use thiserror::Error;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::anomaly::{Anomaly, Detector, Kind, WARM_UP_MICROS, WARM_UP_READINGS};
use crate::config::AnomalySettings;
use crate::contract::Dataset;
use crate::queue::{Queue, QueueError};
use crate::readings::Held;
use crate::store::measurements as readings;
use crate::store::rollup::{Hour, HourColumns, SETTLE_HOURS};
use crate::store::{Databases, PgResultExt, StoreError};
use crate::time::{hour_of, instant as time, HOUR_MICROS};

/// Readings before a span whose anomalies are judged again: a new reading can change the local
/// level (two half-windows of 16) and so the verdict on anomalies that far back.
pub const LOOKBACK: usize = 32;
/// Readings after a span that are read too: enough to decide an excursion that starts at its end
/// (spike or level shift) and to end a gap.
pub const TAIL: usize = 64;
/// The most readings read to warm up before a span.
pub const WARM_UP_MAX_READINGS: usize = 20_000;
/// Detectors saved per sensor (the newest): data that arrives a little out of order (objects
/// committed by concurrent ingestions) resumes the one saved before it instead of a warm-up.
pub const SAVED_DETECTORS: usize = 4;
/// Sensors [`Alerts::detect_held`] detects per transaction at most (the work of re-uploads, each
/// sensor's detection some ten statements once its readings are at hand: one transaction per
/// sensor added as many again).
pub const HELD_SENSORS: i64 = 8;
/// Outbox rows published per transaction.
const PUBLISH_BATCH: i64 = 100;
/// Arbitrary constant naming the per-sensor detection lock ("ANOM").
const SENSOR_LOCK: i32 = 0x414e_4f4d;

/// Detection or publication could not be done now; it is retried later.
#[derive(Debug, Error)]
pub enum AlertError {
    #[error("anomaly detection: {0}")]
    Store(#[from] StoreError),
    #[error("publishing anomalies: {0}")]
    Queue(#[from] QueueError),
    /// The table's CHECK admits only the kinds this version knows: another version wrote it.
    #[error("publishing anomalies: a stored anomaly of a kind this version does not know: {0}")]
    UnknownKind(String),
}

/// What one [`Alerts::detect_due`] call did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Detected {
    /// Work rows covered.
    pub spans: usize,
    /// Sensors detected (one transaction each).
    pub sensors: usize,
    /// Anomalies opened (new or reopened) and resolved, by kind.
    pub opened: Vec<Kind>,
    pub resolved: Vec<Kind>,
    /// Time each sensor's detection took.
    pub durations: Vec<Duration>,
    /// Spans detected by resuming the sensor's saved detector (the others read a warm-up).
    pub resumed: usize,
    /// Of those, spans fed from the object's own readings (nothing read back).
    pub fed: usize,
    /// Readings of detections from a warm-up that were fed from the objects' readings instead
    /// of read back ([`Alerts::detect_held`]).
    pub held: u64,
    /// Rollup hours within the spans that were inexact and were settled.
    pub settled: usize,
}

impl Detected {
    /// Adds what another detection step did.
    pub fn absorb(&mut self, d: Detected) {
        self.spans += d.spans;
        self.sensors += d.sensors;
        self.resumed += d.resumed;
        self.fed += d.fed;
        self.held += d.held;
        self.settled += d.settled;
        self.opened.extend(d.opened);
        self.resolved.extend(d.resolved);
        self.durations.extend(d.durations);
    }
}

/// An anomaly as stored and published: SPEC §7's fields plus its state and the object that
/// revealed that state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AnomalyMessage {
    pub sensor_uuid: String,
    pub sensor_name: Option<String>,
    pub kind: Kind,
    pub start: String,
    pub end: String,
    pub value: Option<f64>,
    pub expected: Option<f64>,
    pub score: f64,
    pub state: State,
    pub object_key: String,
}

/// Stored state of an anomaly row; in messages `open` or `resolved`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Open,
    Resolved,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Open => "open",
            State::Resolved => "resolved",
        }
    }
}

/// Anomaly detection over the measurement database, and the outbox.
#[derive(Clone)]
pub struct Alerts {
    dbs: Databases,
    settings: AnomalySettings,
}

/// RFC 3339 UTC, with as many fractional digits as needed (as `query-cli` prints them).
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

impl Alerts {
    pub fn new(dbs: Databases, settings: AnomalySettings) -> Self {
        Self { dbs, settings }
    }

    pub fn settings(&self) -> &AnomalySettings {
        &self.settings
    }

    /// Detects queued work, sensor by sensor, until none is due: only the rows `only` names (and
    /// the other queued rows of their sensors) when given, else every due row. Stops at the first
    /// error, after recording it on the rows it was working on (retried later).
    pub async fn detect_due(&self, only: Option<&[i64]>) -> Result<Detected, AlertError> {
        self.detect_steps(only, &[], 1).await
    }

    /// [`Alerts::detect_due`], with the readings of the objects that queued the work (`fresh`):
    /// where they provably are all an hour holds (see [`Link`](crate::store::staging::Link)),
    /// they are fed from here instead of read back — what makes detecting a re-upload cheap: its
    /// readings replaced stored ones, whose index entries a read walks past until vacuum. A step
    /// takes the work of [`HELD_SENSORS`] sensors at a time, in one transaction.
    pub async fn detect_held(
        &self,
        only: Option<&[i64]>,
        fresh: &[&Held],
    ) -> Result<Detected, AlertError> {
        self.detect_steps(only, fresh, HELD_SENSORS).await
    }

    /// Detects due work, up to `sensors` sensors per step, until none is due.
    async fn detect_steps(
        &self,
        only: Option<&[i64]>,
        fresh: &[&Held],
        sensors: i64,
    ) -> Result<Detected, AlertError> {
        let mut done = Detected::default();
        while self.detect_step(only, fresh, sensors, &mut done).await? {}
        Ok(done)
    }

    /// Detects the due work of one sensor (what [`Alerts::detect_due`] does per step); `None` when
    /// nothing is due.
    pub async fn detect_next(&self, only: Option<&[i64]>) -> Result<Option<Detected>, AlertError> {
        let mut done = Detected::default();
        Ok(self
            .detect_step(only, &[], 1, &mut done)
            .await?
            .then_some(done))
    }

    /// Detects the work rows `ids` (those of one or more objects: one per sensor and object) in
    /// one transaction, the sensors that resume a saved detector together in a handful of
    /// statements (what keeps detection cheap next to ingestion), the others one by one. A
    /// sensor's rows are judged as one span, from the first one's start to the last one's end:
    /// corrections of older data each re-judge everything after them that the detector
    /// remembers, so a backlog of them costs one pass instead of one each. Rows another detection
    /// holds are skipped (it is doing them).
    ///
    /// `fresh`: the objects' own readings ([`Held`], as ingestion returns them); a
    /// sensor with one work row here, whose saved detector is the newest and whose span nothing
    /// else wrote into, is fed from them instead of reading them back.
    pub async fn detect_batch(&self, ids: &[i64], fresh: &[&Held]) -> Result<Detected, AlertError> {
        let db = Dataset::Measurements;
        let t0 = Instant::now();
        let mut client = self.dbs.client(db).await?;
        let tx = self.begin(&mut client).await?;
        let work: Vec<Work> = tx
            .query(
                &st(
                    &tx,
                    "SELECT id, sensor_uuid, span_start, span_end, object_key FROM anomaly_work
                 WHERE id = ANY($1) ORDER BY sensor_uuid, id FOR UPDATE SKIP LOCKED",
                )
                .await
                .db(db)?,
                &[&ids],
            )
            .await
            .db(db)?
            .iter()
            .map(|r| Work {
                id: r.get(0),
                sensor: r.get(1),
                from: r.get(2),
                to: r.get(3),
                key: r.get(4),
            })
            .collect();
        if work.is_empty() {
            return Ok(Detected::default());
        }
        let claimed: Vec<i64> = work.iter().map(|w| w.id).collect();
        let mut changes = Detected::default();
        let result: Result<(), tokio_postgres::Error> = async {
            let mut sensors: Vec<Uuid> = work.iter().map(|w| w.sensor).collect();
            sensors.dedup();
            execute(
                &tx,
                "SELECT count(pg_advisory_xact_lock($1, hashtext(u::text)))
                 FROM (SELECT u FROM unnest($2::uuid[]) AS u ORDER BY u) AS s",
                &[&SENSOR_LOCK, &sensors],
            )
            .await?;
            judge_batch(&tx, &work, fresh, &mut changes).await?;
            changes.settled += settle_hours(&tx, &work, fresh).await?;
            execute(
                &tx,
                "DELETE FROM anomaly_work WHERE id = ANY($1)",
                &[&claimed],
            )
            .await?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => {
                tx.commit().await.db(db)?;
                changes.spans = claimed.len();
                changes.sensors = work
                    .iter()
                    .map(|w| w.sensor)
                    .collect::<std::collections::HashSet<_>>()
                    .len();
                changes.durations.push(t0.elapsed());
                Ok(changes)
            }
            Err(e) => {
                drop(tx);
                Err(self.failed(&mut client, &claimed, e).await)
            }
        }
    }

    /// A transaction on the measurement database that waits at most `ANOMALY_LOCK_TIMEOUT_MS` for
    /// any lock.
    async fn begin<'c>(
        &self,
        client: &'c mut deadpool_postgres::Object,
    ) -> Result<deadpool_postgres::Transaction<'c>, AlertError> {
        let db = Dataset::Measurements;
        let tx = client.transaction().await.db(db)?;
        let timeout = format!(
            "SET LOCAL lock_timeout = {}",
            self.settings.lock_timeout.as_millis().max(1)
        );
        tx.batch_execute(&timeout).await.db(db)?;
        Ok(tx)
    }

    /// Records a failed detection on its work rows (retried after a growing delay) and returns
    /// the error.
    async fn failed(
        &self,
        client: &mut deadpool_postgres::Object,
        ids: &[i64],
        e: tokio_postgres::Error,
    ) -> AlertError {
        let reason = e.to_string();
        // Best effort: the rows are retried in any case (the transaction rolled back).
        let _ = client
            .execute(
                "UPDATE anomaly_work SET attempts = attempts + 1, last_error = $2,
                    not_before = now() + least(power(2, attempts), 60) * interval '1 second'
                 WHERE id = ANY($1)",
                &[&ids, &reason],
            )
            .await;
        AlertError::Store(StoreError::Postgres {
            database: crate::store::database_name(Dataset::Measurements),
            source: e,
        })
    }

    /// One step: the due work of one sensor (or of the sensors of up to `sensors` due rows),
    /// detected as a batch of their work rows; false when none was due.
    async fn detect_step(
        &self,
        only: Option<&[i64]>,
        fresh: &[&Held],
        sensors: i64,
        done: &mut Detected,
    ) -> Result<bool, AlertError> {
        let db = Dataset::Measurements;
        let only: Option<Vec<i64>> = only.map(<[i64]>::to_vec);
        // The sensor of the oldest due row nobody is working on (or of the oldest few), and all
        // its rows.
        let ids: Vec<i64> = self
            .dbs
            .client(db)
            .await?
            .query(
                "SELECT id FROM anomaly_work WHERE sensor_uuid IN (
                     SELECT sensor_uuid FROM anomaly_work
                     WHERE ($1::bigint[] IS NULL OR id = ANY($1)) AND not_before <= now()
                     ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
                 ORDER BY id",
                &[&only, &sensors],
            )
            .await
            .db(db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if ids.is_empty() {
            return Ok(false);
        }
        done.absorb(self.detect_batch(&ids, fresh).await?);
        Ok(true)
    }

    /// Publishes the outbox (changes not yet published), a batch per transaction, until it is
    /// empty; returns how many messages were published.
    pub async fn publish_due(&self, queue: &Queue) -> Result<usize, AlertError> {
        let mut total = 0;
        loop {
            let n = self.publish_batch(queue).await?;
            total += n;
            if n < PUBLISH_BATCH as usize {
                return Ok(total);
            }
        }
    }

    async fn publish_batch(&self, queue: &Queue) -> Result<usize, AlertError> {
        let db = Dataset::Measurements;
        let mut client = self.dbs.client(db).await?;
        let tx = self.begin(&mut client).await?;
        let rows = tx
            .query(
                "SELECT sensor_uuid, kind, start_ts, end_ts, value, expected, score, state,
                        object_key, revision
                 FROM anomalies WHERE published_revision < revision
                 ORDER BY updated_at, sensor_uuid, start_ts, kind
                 LIMIT $1 FOR UPDATE SKIP LOCKED",
                &[&PUBLISH_BATCH],
            )
            .await
            .db(db)?;
        if rows.is_empty() {
            return Ok(0);
        }
        let sensors: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
        let names = self.names(&sensors).await?;
        for row in &rows {
            let sensor: Uuid = row.get(0);
            let kind: Kind = row
                .get::<_, &str>(1)
                .parse()
                .map_err(AlertError::UnknownKind)?;
            let start: DateTime<Utc> = row.get(2);
            let revision: i32 = row.get(9);
            let message = AnomalyMessage {
                sensor_uuid: sensor.to_string(),
                sensor_name: names.get(&sensor).cloned(),
                kind,
                start: rfc3339(start),
                end: rfc3339(row.get(3)),
                value: row.get(4),
                expected: row.get(5),
                score: row.get(6),
                state: match row.get::<_, &str>(7) {
                    "open" => State::Open,
                    _ => State::Resolved,
                },
                object_key: row.get(8),
            };
            let id = format!("{sensor}:{kind}:{}:{revision}", start.timestamp_micros());
            let payload = serde_json::to_vec(&message).expect("serialisable");
            let subject = format!("{}.{kind}", self.settings.subject_prefix);
            queue
                .publish_with_id(subject, Bytes::from(payload), &id)
                .await?;
            tx.execute(
                "UPDATE anomalies SET published_revision = $4
                 WHERE sensor_uuid = $1 AND start_ts = $2 AND kind = $3",
                &[&sensor, &start, &kind.as_str(), &revision],
            )
            .await
            .db(db)?;
        }
        tx.commit().await.db(db)?;
        Ok(rows.len())
    }

    /// Mapped names of `sensors` (from the mapping database).
    async fn names(&self, sensors: &[Uuid]) -> Result<HashMap<Uuid, String>, AlertError> {
        let db = Dataset::Mapping;
        let client = self.dbs.client(db).await?;
        Ok(client
            .query(
                "SELECT sensor_uuid, sensor_name FROM sensors WHERE sensor_uuid = ANY($1)",
                &[&sensors],
            )
            .await
            .db(db)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    /// Queues detection of every sensor's stored readings (from `since`, when given), one work
    /// row per sensor under `key`, unless rows under `key` are still queued (an interrupted run:
    /// those are what is left to do). Returns the rows queued now, or `None` when resuming.
    pub async fn queue_history(
        &self,
        since: Option<DateTime<Utc>>,
        key: &str,
    ) -> Result<Option<u64>, AlertError> {
        if self.queued(Some(key)).await? > 0 {
            return Ok(None);
        }
        let db = Dataset::Measurements;
        let client = self.dbs.client(db).await?;
        let queued = client
            .execute(
                "INSERT INTO anomaly_work (sensor_uuid, span_start, span_end, object_key)
                 SELECT sensor_uuid, greatest(min(day), $1), max(day) + interval '1 day', $2
                 FROM measurement_days
                 WHERE $1::timestamptz IS NULL OR day >= date_trunc('day', $1::timestamptz, 'UTC')
                 GROUP BY sensor_uuid ORDER BY sensor_uuid",
                &[&since, &key],
            )
            .await
            .db(db)?;
        Ok(Some(queued))
    }

    /// Work rows still queued under `key` (all of them when `None`).
    pub async fn queued(&self, key: Option<&str>) -> Result<u64, AlertError> {
        let db = Dataset::Measurements;
        let client = self.dbs.client(db).await?;
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM anomaly_work WHERE $1::text IS NULL OR object_key = $1",
                &[&key],
            )
            .await
            .db(db)?
            .get(0);
        Ok(n as u64)
    }

    /// Marks the unpublished changes that the work queued under `key` revealed as published,
    /// without publishing them (history backfill: old anomalies are not news).
    pub async fn mark_published(&self, key: &str) -> Result<u64, AlertError> {
        let db = Dataset::Measurements;
        let client = self.dbs.client(db).await?;
        Ok(client
            .execute(
                "UPDATE anomalies SET published_revision = revision
                 WHERE published_revision < revision AND object_key = $1",
                &[&key],
            )
            .await
            .db(db)?)
    }
}

/// One queued span.
#[derive(Clone)]
struct Work {
    id: i64,
    sensor: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    key: String,
}

/// The work rows of each sensor as one span (the first start to the last end, the key of the
/// newest row).
fn one_span_per_sensor(work: &[Work]) -> Vec<Work> {
    let mut merged: Vec<Work> = Vec::new();
    // `work` is ordered by sensor, then id.
    for w in work {
        match merged.last_mut() {
            Some(m) if m.sensor == w.sensor => {
                m.from = m.from.min(w.from);
                m.to = m.to.max(w.to);
                if w.id > m.id {
                    m.id = w.id;
                    m.key.clone_from(&w.key);
                }
            }
            _ => merged.push(w.clone()),
        }
    }
    merged
}

/// The readings of `sensor` that the batch's objects hold (`fresh`), in time order, when they are
/// exactly what its work rows (`spans`, first and last instant of each) stored: one held piece
/// per row, spanning it, and no two overlapping (overlapping objects may have overwritten each
/// other's readings; the stored ones are read back then). `None` otherwise.
fn own_readings<'f>(
    fresh: &[&'f Held],
    sensor: Uuid,
    spans: &[(i64, i64)],
) -> Option<Vec<&'f [(i64, f64)]>> {
    let mut pieces: Vec<&[(i64, f64)]> = fresh
        .iter()
        .filter_map(|f| f.readings.get(&sensor).map(Vec::as_slice))
        .collect();
    if pieces.len() != spans.len() || pieces.iter().any(|p| p.is_empty()) {
        return None;
    }
    pieces.sort_by_key(|p| p[0].0);
    let mut spans = spans.to_vec();
    spans.sort_unstable();
    let spanning = pieces
        .iter()
        .zip(&spans)
        .all(|(p, s)| (p[0].0, p[p.len() - 1].0) == *s);
    let apart = pieces
        .windows(2)
        .all(|w| w[0][w[0].len() - 1].0 < w[1][0].0);
    (spanning && apart).then_some(pieces)
}

/// A saved detector: its end (`through`), its state, and the end of the sensor's newest one.
type Saved = (DateTime<Utc>, Vec<u8>, DateTime<Utc>);

/// A sensor of a batch that resumes a saved detector.
struct Resumed<'a> {
    work: &'a Work,
    /// Readings after this are read from the database (the saved detector's end, or the span's
    /// end when the object's own readings were fed).
    after: DateTime<Utc>,
    detector: Detector,
    judged_from: DateTime<Utc>,
    judged_to: DateTime<Utc>,
    decided: (i64, Vec<(Kind, i64)>),
    snapshot: Option<Detector>,
    /// When the judged range goes on past the span: the detector at the span's end, saved too
    /// (later corrections of the data after it resume it instead of a warm-up).
    at_span_end: Option<Detector>,
    found: Vec<Anomaly>,
}

/// [`judge`] for many sensors at once: those with one span here and a saved detector to resume
/// share each statement (saved detectors, readings, stored anomalies, saving); the rest are
/// judged one by one.
async fn judge_batch(
    tx: &Tx<'_>,
    work: &[Work],
    fresh: &[&Held],
    changes: &mut Detected,
) -> Result<(), tokio_postgres::Error> {
    let memory = chrono::Duration::microseconds(WARM_UP_MICROS);
    let ours: Vec<i64> = work.iter().map(|w| w.id).collect();
    let mut spans: HashMap<Uuid, Vec<(i64, i64)>> = HashMap::new();
    for w in work {
        spans
            .entry(w.sensor)
            .or_default()
            .push((w.from.timestamp_micros(), w.to.timestamp_micros()));
    }
    let work = one_span_per_sensor(work);
    let work = &work[..];
    let single: Vec<&Work> = work.iter().collect();
    let sensors: Vec<Uuid> = single.iter().map(|w| w.sensor).collect();
    let froms: Vec<DateTime<Utc>> = single.iter().map(|w| w.from).collect();
    // The newest saved detector before each span, and the newest of each sensor.
    let mut bases: HashMap<Uuid, Saved> = query(
        tx,
        "SELECT DISTINCT ON (d.sensor_uuid) d.sensor_uuid, d.through, d.state,
                    (SELECT max(e.through) FROM anomaly_detectors e
                     WHERE e.sensor_uuid = d.sensor_uuid)
             FROM anomaly_detectors d
             JOIN unnest($1::uuid[], $2::timestamptz[]) AS w(u, f)
               ON d.sensor_uuid = w.u AND d.through < w.f
             ORDER BY d.sensor_uuid, d.through DESC",
        &[&sensors, &froms],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
    .collect();
    let mut resumed = Vec::new();
    let mut alone: Vec<&Work> = Vec::new();
    // Sensors whose span other queued work overlaps (from the saved detectors' ends on): their
    // stored readings may not be this object's alone.
    let crowded: std::collections::HashSet<Uuid> = match fresh {
        [] => Default::default(),
        _ => {
            let afters: Vec<DateTime<Utc>> = single
                .iter()
                .map(|w| bases.get(&w.sensor).map_or(w.from, |b| b.0))
                .collect();
            let uptos: Vec<DateTime<Utc>> = single.iter().map(|w| w.to).collect();
            query(
                tx,
                "SELECT DISTINCT q.sensor_uuid FROM anomaly_work q
                 JOIN unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS c(u, after, upto)
                   ON q.sensor_uuid = c.u AND q.span_end > c.after AND q.span_start <= c.upto
                 WHERE NOT q.id = ANY($4)",
                &[&sensors, &afters, &uptos, &ours],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
        }
    };
    for w in single {
        let plan = bases
            .remove(&w.sensor)
            .filter(|(through, ..)| w.from - *through <= memory)
            .and_then(|(through, bytes, latest)| {
                let detector = Detector::from_bytes(&bytes)?;
                Some((through, detector, latest))
            });
        let Some((through, mut detector, latest)) = plan else {
            alone.push(w);
            continue;
        };
        let undecided = detector.unsettled_since().map_or(through, time);
        let decided = (through.timestamp_micros(), detector.provisional());
        // The objects' own readings are all there is after the saved detector: feed them.
        let own = Some(fresh)
            .filter(|_| latest == through && !crowded.contains(&w.sensor))
            .and_then(|f| own_readings(f, w.sensor, &spans[&w.sensor]));
        let mut found = Vec::new();
        let mut snapshot = None;
        let mut after = through;
        if let Some(own) = own {
            for &(at, value) in own.into_iter().flatten() {
                detector.push(at, value, &mut found);
            }
            snapshot = Some(detector.clone());
            after = w.to;
            changes.fed += 1;
        }
        resumed.push(Resumed {
            work: w,
            after,
            detector,
            judged_from: undecided.min(w.from),
            judged_to: if latest > w.to && latest - w.to <= memory {
                latest
            } else {
                w.to
            },
            decided,
            snapshot,
            at_span_end: None,
            found,
        });
    }
    alone.sort_by_key(|w| w.id);
    for w in alone {
        judge(tx, w.sensor, (w.from, w.to), &w.key, fresh, changes).await?;
    }
    if resumed.is_empty() {
        return Ok(());
    }
    changes.resumed += resumed.len();

    // Every resumed sensor's readings after its detector, and a tail, in one stream.
    let index: HashMap<Uuid, usize> = resumed
        .iter()
        .enumerate()
        .map(|(i, r)| (r.work.sensor, i))
        .collect();
    let us: Vec<Uuid> = resumed.iter().map(|r| r.work.sensor).collect();
    let afters: Vec<DateTime<Utc>> = resumed.iter().map(|r| r.after).collect();
    let uptos: Vec<DateTime<Utc>> = resumed.iter().map(|r| r.judged_to).collect();
    let tail = TAIL as i64;
    let params: [&(dyn ToSql + Sync); 4] = [&us, &afters, &uptos, &tail];
    let rows = tx
        .query_raw(
            &st(
                tx,
                "SELECT w.u, m.ts, m.value
             FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(u, after, upto)
             CROSS JOIN LATERAL (
                 (SELECT ts, value FROM measurements
                  WHERE sensor_uuid = w.u AND ts > w.after AND ts <= w.upto)
                 UNION ALL
                 (SELECT ts, value FROM measurements
                  WHERE sensor_uuid = w.u AND ts > w.upto ORDER BY ts LIMIT $4)
             ) AS m
             ORDER BY w.u, m.ts",
            )
            .await?,
            params.iter().copied(),
        )
        .await?;
    let mut rows = std::pin::pin!(rows);
    while let Some(row) = futures_util::TryStreamExt::try_next(&mut rows).await? {
        let sensor: Uuid = row.try_get(0)?;
        let at = row.try_get::<_, DateTime<Utc>>(1)?.timestamp_micros();
        let value: f64 = row.try_get(2)?;
        let r = &mut resumed[index[&sensor]];
        if at > r.work.to.timestamp_micros() && r.judged_to > r.work.to && r.at_span_end.is_none() {
            r.at_span_end = Some(r.detector.clone());
        }
        if at > r.judged_to.timestamp_micros() && r.snapshot.is_none() {
            r.snapshot = Some(r.detector.clone());
        }
        r.detector.push(at, value, &mut r.found);
    }
    for r in &mut resumed {
        if r.snapshot.is_none() {
            r.snapshot = Some(r.detector.clone());
        }
        r.detector.finish(&mut r.found);
        let (lo, hi) = (
            r.judged_from.timestamp_micros(),
            r.judged_to.timestamp_micros(),
        );
        r.found.retain(|a| a.start >= lo && a.start <= hi);
    }

    // The stored anomalies of every judged range.
    let los: Vec<DateTime<Utc>> = resumed.iter().map(|r| r.judged_from).collect();
    let mut stored: HashMap<Uuid, HashMap<(Kind, i64), Stored>> = HashMap::new();
    for row in query(
        tx,
        "SELECT a.sensor_uuid, a.kind, a.start_ts, a.end_ts, a.value, a.expected, a.score,
                    a.state
             FROM anomalies a
             JOIN unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(u, lo, hi)
               ON a.sensor_uuid = w.u AND a.start_ts >= w.lo AND a.start_ts <= w.hi",
        &[&us, &los, &uptos],
    )
    .await?
    {
        if let Some((k, v)) = stored_row(&row, 1) {
            stored.entry(row.get(0)).or_default().insert(k, v);
        }
    }
    for r in &resumed {
        let s = stored.remove(&r.work.sensor).unwrap_or_default();
        reconcile(
            tx,
            r.work.sensor,
            &r.found,
            s,
            Some(&r.decided),
            &r.work.key,
            changes,
        )
        .await?;
    }

    // Save the detectors, in place of those the spans made stale; keep the newest few.
    let changed: Vec<DateTime<Utc>> = resumed.iter().map(|r| r.work.from).collect();
    execute(
        tx,
        "DELETE FROM anomaly_detectors d USING unnest($1::uuid[], $2::timestamptz[]) AS w(u, f)
         WHERE d.sensor_uuid = w.u AND d.through >= w.f",
        &[&us, &changed],
    )
    .await?;
    let mut saved_us = Vec::new();
    let mut throughs = Vec::new();
    let mut states = Vec::new();
    for r in &resumed {
        let snapshot = r.snapshot.as_ref().expect("set above");
        // (The same detector when no reading lies between the span's end and the range's.)
        let at_span_end = r
            .at_span_end
            .as_ref()
            .filter(|d| d.last_reading() != snapshot.last_reading());
        for detector in [Some(snapshot), at_span_end].into_iter().flatten() {
            if let Some(last) = detector.last_reading() {
                saved_us.push(r.work.sensor);
                throughs.push(time(last));
                states.push(detector.to_bytes());
            }
        }
    }
    execute(
        tx,
        "INSERT INTO anomaly_detectors (sensor_uuid, through, state)
         SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::bytea[])
         ON CONFLICT (sensor_uuid, through) DO UPDATE
             SET state = EXCLUDED.state, updated_at = now()",
        &[&saved_us, &throughs, &states],
    )
    .await?;
    execute(
        tx,
        "DELETE FROM anomaly_detectors d WHERE d.sensor_uuid = ANY($1) AND d.through < (
             SELECT e.through FROM anomaly_detectors e WHERE e.sensor_uuid = d.sensor_uuid
             ORDER BY e.through DESC OFFSET $2 LIMIT 1)",
        &[&us, &(SAVED_DETECTORS as i64 - 1)],
    )
    .await?;
    Ok(())
}

/// One stored anomaly of the judged range.
struct Stored {
    end: DateTime<Utc>,
    value: Option<f64>,
    expected: Option<f64>,
    score: f64,
    state: State,
}

/// Detects over one span of one sensor and brings the stored anomalies of its judged range in
/// line with what was found.
async fn judge(
    tx: &Tx<'_>,
    sensor: Uuid,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    key: &str,
    fresh: &[&Held],
    changes: &mut Detected,
) -> Result<(), tokio_postgres::Error> {
    // The newest saved detector from before the span (to resume), and the newest of all.
    let memory = chrono::Duration::microseconds(WARM_UP_MICROS);
    let base: Option<(DateTime<Utc>, Vec<u8>)> = tx
        .query_opt(
            &st(
                tx,
                "SELECT through, state FROM anomaly_detectors
             WHERE sensor_uuid = $1 AND through < $2 ORDER BY through DESC LIMIT 1",
            )
            .await?,
            &[&sensor, &from],
        )
        .await?
        .map(|r| (r.get(0), r.get(1)));
    let latest: Option<DateTime<Utc>> = tx
        .query_one(
            &st(
                tx,
                "SELECT max(through) FROM anomaly_detectors WHERE sensor_uuid = $1",
            )
            .await?,
            &[&sensor],
        )
        .await?
        .get(0);
    // Readings before a saved detector's end changed: read on to the newest one's end (when it
    // is within the detector's memory), judge all of it and save the detector there afresh.
    let judged_to = match latest {
        Some(t) if t > to && t - to <= memory => t,
        _ => to,
    };
    // Resume when a saved detector ends before the span, not too long before it.
    let resumed = base
        .filter(|(through, _)| from - *through <= memory)
        .and_then(|(through, bytes)| Some((through, Detector::from_bytes(&bytes)?)));
    // Resumed: stored anomalies up to `through` were decided before, except the provisional ones.
    let mut decided_through: Option<(i64, Vec<(Kind, i64)>)> = None;
    let (mut detector, read_from, judged_from) = match resumed {
        Some((through, detector)) => {
            // Nothing before what was undecided when it stopped can change.
            let undecided = detector.unsettled_since().map_or(through, time);
            let read_from = through + chrono::Duration::microseconds(1);
            decided_through = Some((through.timestamp_micros(), detector.provisional()));
            changes.resumed += 1;
            (detector, read_from, undecided.min(from))
        }
        None => match readings::nth_before(&**tx, sensor, from, LOOKBACK).await? {
            // No reading before the span (the sensor's first data, or all of it again): no
            // warm-up to look for.
            None => (Detector::default(), from, from),
            Some(judged_from) => {
                let warm =
                    readings::warm_up_from(&**tx, sensor, judged_from, memory, WARM_UP_READINGS)
                        .await?;
                let cap =
                    readings::nth_before(&**tx, sensor, judged_from, WARM_UP_MAX_READINGS).await?;
                let read_from = cap.map_or(warm, |c| c.max(warm));
                (Detector::default(), read_from, judged_from)
            }
        },
    };
    let read_to = readings::nth_after(&**tx, sensor, judged_to, TAIL).await?;
    let mut found = Vec::new();
    // The state to save: after the last reading judged, before the tail.
    let mut snapshot = None;
    // And when the judged range goes on past the span, the detector at the span's end (later
    // corrections of what follows resume it instead of a warm-up).
    let mut at_span_end = None;
    let last_judged = judged_to.timestamp_micros();
    let span_end = to.timestamp_micros();
    let held = held_hours(tx, sensor, fresh).await?;
    let feed = |at, value| {
        if at > span_end && last_judged > span_end && at_span_end.is_none() {
            at_span_end = Some(detector.clone());
        }
        if at > last_judged && snapshot.is_none() {
            snapshot = Some(detector.clone());
        }
        detector.push(at, value, &mut found)
    };
    changes.held += each_reading_held(tx, sensor, (read_from, read_to), &held, feed).await?;
    let snapshot = snapshot.unwrap_or_else(|| detector.clone());
    detector.finish(&mut found);
    save_state(tx, sensor, &snapshot, at_span_end.as_ref(), from).await?;
    let (lo, hi) = (judged_from.timestamp_micros(), last_judged);
    found.retain(|a| a.start >= lo && a.start <= hi);
    let (judged_from, to) = (judged_from, judged_to);

    let stored: HashMap<(Kind, i64), Stored> = query(
        tx,
        "SELECT kind, start_ts, end_ts, value, expected, score, state FROM anomalies
             WHERE sensor_uuid = $1 AND start_ts >= $2 AND start_ts <= $3",
        &[&sensor, &judged_from, &to],
    )
    .await?
    .iter()
    .filter_map(|r| stored_row(r, 0))
    .collect();
    reconcile(
        tx,
        sensor,
        &found,
        stored,
        decided_through.as_ref(),
        key,
        changes,
    )
    .await
}

/// An hour's start (microseconds since the epoch) and the held readings it holds, in time order
/// (from one object, or several that wrote it one after the other).
type HeldHour<'f> = (i64, Vec<&'f [(i64, f64)]>);

/// The transaction detection runs in.
type Tx<'a> = deadpool_postgres::Transaction<'a>;

/// `sql` prepared on the transaction's connection once and reused (detection runs some twenty
/// statements per sensor: unprepared, each was parsed and planned again and cost a second round
/// trip).
async fn st(tx: &Tx<'_>, sql: &str) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
    tx.prepare_cached(sql).await
}

/// `sql` with `params`, as a statement prepared once per connection ([`st`]).
async fn query(
    tx: &Tx<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    tx.query(&st(tx, sql).await?, params).await
}

/// [`query`] for a statement whose rows are not wanted; returns how many it changed.
async fn execute(
    tx: &Tx<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    tx.execute(&st(tx, sql).await?, params).await
}

/// What the objects of a batch (`fresh`) hold of one sensor in the hours their replacing merges
/// wrote ([`Link`](crate::store::staging::Link)): each hour's readings, in time order, and the
/// links of the merges that wrote it. Empty when none of them replaced readings of the sensor,
/// or when their readings of it overlap (which of two wins a key is for the stored versions to
/// say).
#[derive(Default)]
struct HeldOf<'f> {
    hours: std::collections::BTreeMap<i64, Vec<&'f [(i64, f64)]>>,
    links: HashMap<i64, Vec<(Option<i64>, i64)>>,
}

impl<'f> HeldOf<'f> {
    fn of(sensor: Uuid, fresh: &[&'f Held]) -> Self {
        let mut links: HashMap<i64, Vec<(Option<i64>, i64)>> = HashMap::new();
        let mut pieces: Vec<&[(i64, f64)]> = Vec::new();
        for f in fresh {
            let mut linked = false;
            for l in f.links.iter().filter(|l| l.sensor == sensor) {
                links.entry(l.hour).or_default().push((l.before, l.by));
                linked = true;
            }
            match f.readings.get(&sensor) {
                Some(r) if linked && !r.is_empty() => pieces.push(r),
                _ => {}
            }
        }
        pieces.sort_by_key(|p| p[0].0);
        let apart = pieces
            .windows(2)
            .all(|w| w[0][w[0].len() - 1].0 < w[1][0].0);
        if pieces.is_empty() || !apart {
            return Self::default();
        }
        let mut hours: std::collections::BTreeMap<i64, Vec<&'f [(i64, f64)]>> = Default::default();
        for piece in pieces {
            let mut rest = piece;
            while let Some(&(at, _)) = rest.first() {
                let hour = hour_of(at);
                let n = rest.partition_point(|r| r.0 < hour + HOUR_MICROS);
                hours.entry(hour).or_default().push(&rest[..n]);
                rest = &rest[n..];
            }
        }
        Self { hours, links }
    }

    /// Whether the readings held for `hour` are all it holds, given its rollup row's count and
    /// writer (`xmin`) now: that row was last written by the newest of the merges that wrote
    /// the hour, each of them wrote it right after the one before (so nothing else wrote into
    /// the hour from the first of them on), and they hold as many readings as it counts (so it
    /// holds nothing else).
    fn proves(&self, hour: i64, count: i64, now: i64) -> bool {
        let held: usize = self
            .hours
            .get(&hour)
            .map_or(0, |s| s.iter().map(|p| p.len()).sum());
        let chain = self.links.get(&hour).map_or(&[][..], Vec::as_slice);
        held as i64 == count && chained(chain, now)
    }
}

/// The hours of `sensor` whose stored readings are provably exactly what `fresh` holds
/// ([`HeldOf::proves`], against the rollup now), in time order.
async fn held_hours<'f>(
    tx: &Tx<'_>,
    sensor: Uuid,
    fresh: &[&'f Held],
) -> Result<Vec<HeldHour<'f>>, tokio_postgres::Error> {
    let held = HeldOf::of(sensor, fresh);
    if held.hours.is_empty() {
        return Ok(Vec::new());
    }
    let starts: Vec<DateTime<Utc>> = held.hours.keys().map(|&h| time(h)).collect();
    let rows = query(
        tx,
        "SELECT hour, readings, xmin::text::bigint FROM measurement_hours
             WHERE sensor_uuid = $1 AND hour = ANY($2)",
        &[&sensor, &starts],
    )
    .await?;
    let proven: std::collections::HashSet<i64> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, DateTime<Utc>>(0).timestamp_micros(),
                r.get(1),
                r.get(2),
            )
        })
        .filter(|&(hour, count, now)| held.proves(hour, count, now))
        .map(|(hour, ..)| hour)
        .collect();
    Ok(held
        .hours
        .into_iter()
        .filter(|(h, _)| proven.contains(h))
        .collect())
}

/// Settles the rollup hours within the spans of `work` that are not exact (a replacing merge
/// with detection on leaves those whose bounds it cannot tell: [`crate::store::staging`]): from
/// the readings the objects hold where they provably are all the hour holds ([`HeldOf`]), else
/// from the stored readings. Hours another transaction is writing are skipped (their writer's
/// detection settles them). Returns how many were settled.
async fn settle_hours(
    tx: &Tx<'_>,
    work: &[Work],
    fresh: &[&Held],
) -> Result<usize, tokio_postgres::Error> {
    let sensors: Vec<Uuid> = work.iter().map(|w| w.sensor).collect();
    let firsts: Vec<DateTime<Utc>> = work.iter().map(|w| w.from).collect();
    let lasts: Vec<DateTime<Utc>> = work.iter().map(|w| w.to).collect();
    let rows = query(
        tx,
        "SELECT h.sensor_uuid, h.hour, h.readings, h.xmin::text::bigint
             FROM measurement_hours AS h
             JOIN unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(u, first, last)
                 ON h.sensor_uuid = w.u AND h.hour >= date_trunc('hour', w.first, 'UTC')
                     AND h.hour <= w.last
             WHERE NOT h.exact
             ORDER BY 1, 2
             FOR UPDATE OF h SKIP LOCKED",
        &[&sensors, &firsts, &lasts],
    )
    .await?;
    // (An hour two of the spans share comes twice.)
    let mut hours: Vec<(Uuid, DateTime<Utc>, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    hours.dedup_by_key(|h| (h.0, h.1));
    let mut held: HashMap<Uuid, HeldOf> = HashMap::new();
    let (mut known, mut unknown) = (HourColumns::default(), (vec![], vec![]));
    for &(sensor, at, count, now) in &hours {
        let hour = at.timestamp_micros();
        let of = held
            .entry(sensor)
            .or_insert_with(|| HeldOf::of(sensor, fresh));
        if of.proves(hour, count, now) {
            let readings = of.hours[&hour].iter().flat_map(|p| p.iter().copied());
            if let Some(rolled) = Hour::of_readings(readings) {
                known.push(sensor, hour, &rolled);
            }
        } else {
            unknown.0.push(sensor);
            unknown.1.push(at);
        }
    }
    if !known.sensors.is_empty() {
        tx.execute(SETTLE_HOURS, &known.params()).await?;
    }
    if !unknown.0.is_empty() {
        tx.execute(crate::store::rollup::EXACT_HOURS, &[&unknown.0, &unknown.1])
            .await?;
    }
    Ok(hours.len())
}

/// Whether `links` (before, by) are one chain of writers ending with `now`: following each
/// writer back to the one before it from `now` meets every link.
fn chained(links: &[(Option<i64>, i64)], now: i64) -> bool {
    let mut at = Some(now);
    let mut met = 0;
    while let Some(by) = at {
        let Some(link) = links.iter().find(|l| l.1 == by) else {
            break;
        };
        met += 1;
        if met > links.len() {
            return false;
        }
        at = link.0;
    }
    !links.is_empty() && met == links.len()
}

/// [`readings::each_reading`] over `[from, to]`, the hours in `held` (from [`held_hours`]) fed
/// from memory and only the rest read from the database; returns how many were fed from memory.
async fn each_reading_held(
    tx: &Tx<'_>,
    sensor: Uuid,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    held: &[HeldHour<'_>],
    mut each: impl FnMut(i64, f64),
) -> Result<u64, tokio_postgres::Error> {
    let (lo, hi) = (from.timestamp_micros(), to.timestamp_micros());
    // The first instant not fed yet.
    let mut next = lo;
    let mut fed = 0;
    for (hour, pieces) in held {
        let (start, end) = ((*hour).max(lo), (hour + HOUR_MICROS - 1).min(hi));
        if start > end {
            continue;
        }
        if next < start {
            readings::each_reading(&**tx, sensor, time(next), time(start - 1), &mut each).await?;
        }
        for &(at, value) in pieces.iter().flat_map(|p| p.iter()) {
            if at >= start && at <= end {
                each(at, value);
                fed += 1;
            }
        }
        next = end + 1;
    }
    if next <= hi {
        readings::each_reading(&**tx, sensor, time(next), to, &mut each).await?;
    }
    Ok(fed)
}

/// A stored anomaly from the columns `kind, start_ts, end_ts, value, expected, score, state`
/// starting at column `at`.
fn stored_row(r: &tokio_postgres::Row, at: usize) -> Option<((Kind, i64), Stored)> {
    let kind: Kind = r.get::<_, &str>(at).parse().ok()?;
    let start: DateTime<Utc> = r.get(at + 1);
    let state = if r.get::<_, &str>(at + 6) == "open" {
        State::Open
    } else {
        State::Resolved
    };
    Some((
        (kind, start.timestamp_micros()),
        Stored {
            end: r.get(at + 2),
            value: r.get(at + 3),
            expected: r.get(at + 4),
            score: r.get(at + 5),
            state,
        },
    ))
}

/// Brings the stored anomalies of a judged range (`stored`) in line with what was `found` there:
/// opens, reopens, refreshes, resolves. With `decided_through` (a resumed detector's end and what
/// it left undecided), stored anomalies that start before that end are left alone unless
/// undecided. (One that starts at the end itself — a gap after its last reading, say — was found
/// by readings the detector had not seen: it is judged again.)
async fn reconcile(
    tx: &Tx<'_>,
    sensor: Uuid,
    found: &[Anomaly],
    mut stored: HashMap<(Kind, i64), Stored>,
    decided_through: Option<&(i64, Vec<(Kind, i64)>)>,
    key: &str,
    changes: &mut Detected,
) -> Result<(), tokio_postgres::Error> {
    for a in found {
        let start = time(a.start);
        let end = time(a.end);
        let kind = a.kind.as_str();
        let common: [&(dyn ToSql + Sync); 7] = [
            &sensor,
            &start,
            &kind,
            &end,
            &a.value,
            &a.expected,
            &a.score,
        ];
        match stored.remove(&(a.kind, a.start)) {
            None => {
                execute(
                    tx,
                    "INSERT INTO anomalies (sensor_uuid, start_ts, kind, end_ts, value, expected,
                         score, state, object_key)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 'open', $8)",
                    &[&common[..], &[&key]].concat(),
                )
                .await?;
                changes.opened.push(a.kind);
            }
            Some(s) if s.state == State::Resolved => {
                execute(
                    tx,
                    "UPDATE anomalies SET end_ts = $4, value = $5, expected = $6, score = $7,
                         state = 'open', object_key = $8, revision = revision + 1,
                         updated_at = now()
                     WHERE sensor_uuid = $1 AND start_ts = $2 AND kind = $3",
                    &[&common[..], &[&key]].concat(),
                )
                .await?;
                changes.opened.push(a.kind);
            }
            Some(s) if !same(&s, a, end) => {
                execute(
                    tx,
                    "UPDATE anomalies SET end_ts = $4, value = $5, expected = $6, score = $7,
                         updated_at = now()
                     WHERE sensor_uuid = $1 AND start_ts = $2 AND kind = $3",
                    &common,
                )
                .await?;
            }
            Some(_) => {}
        }
    }
    for ((kind, start), s) in stored {
        if s.state != State::Open {
            continue;
        }
        if let Some((through, provisional)) = decided_through {
            if start < *through && !provisional.contains(&(kind, start)) {
                continue;
            }
        }
        execute(
            tx,
            "UPDATE anomalies SET state = $4, object_key = $5, revision = revision + 1,
                 updated_at = now()
             WHERE sensor_uuid = $1 AND start_ts = $2 AND kind = $3",
            &[
                &sensor,
                &time(start),
                &kind.as_str(),
                &State::Resolved.as_str(),
                &key,
            ],
        )
        .await?;
        changes.resolved.push(kind);
    }
    Ok(())
}

/// Saves the detector after a detection, in place of those it makes stale (saved after `changed_from`,
/// the first reading the detected span changed: their windows may hold values no longer stored),
/// keeping the newest [`SAVED_DETECTORS`] per sensor.
async fn save_state(
    tx: &Tx<'_>,
    sensor: Uuid,
    snapshot: &Detector,
    at_span_end: Option<&Detector>,
    changed_from: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    execute(
        tx,
        "DELETE FROM anomaly_detectors WHERE sensor_uuid = $1 AND through >= $2",
        &[&sensor, &changed_from],
    )
    .await?;
    for detector in [Some(snapshot), at_span_end].into_iter().flatten() {
        let Some(last) = detector.last_reading().map(time) else {
            continue;
        };
        execute(
            tx,
            "INSERT INTO anomaly_detectors (sensor_uuid, through, state) VALUES ($1, $2, $3)
             ON CONFLICT (sensor_uuid, through) DO UPDATE
                 SET state = EXCLUDED.state, updated_at = now()",
            &[&sensor, &last, &detector.to_bytes()],
        )
        .await?;
    }
    execute(
        tx,
        "DELETE FROM anomaly_detectors WHERE sensor_uuid = $1 AND through < (
             SELECT through FROM anomaly_detectors WHERE sensor_uuid = $1
             ORDER BY through DESC OFFSET $2 LIMIT 1)",
        &[&sensor, &(SAVED_DETECTORS as i64 - 1)],
    )
    .await?;
    Ok(())
}

/// Whether a stored open anomaly already says what was found.
fn same(s: &Stored, a: &Anomaly, end: DateTime<Utc>) -> bool {
    s.end == end && s.value == a.value && s.expected == a.expected && s.score == a.score
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What subscribers read (SPEC §7's fields, the state and the object), unchanged by the
    /// kind and state being typed.
    #[test]
    fn messages_name_kinds_and_states_as_before() {
        let message = AnomalyMessage {
            sensor_uuid: "0a5a2b8e-7c0f-4a55-9a39-000000000001".into(),
            sensor_name: Some("boiler".into()),
            kind: Kind::LevelShift,
            start: "2013-01-01T00:05:00Z".into(),
            end: "2013-01-01T01:00:00Z".into(),
            value: Some(31.5),
            expected: None,
            score: 7.25,
            state: State::Resolved,
            object_key: "timeseries/a.csv".into(),
        };
        let text = serde_json::to_string(&message).unwrap();
        assert_eq!(
            text,
            "{\"sensor_uuid\":\"0a5a2b8e-7c0f-4a55-9a39-000000000001\",\"sensor_name\":\"boiler\",\
             \"kind\":\"level_shift\",\"start\":\"2013-01-01T00:05:00Z\",\
             \"end\":\"2013-01-01T01:00:00Z\",\"value\":31.5,\"expected\":null,\"score\":7.25,\
             \"state\":\"resolved\",\"object_key\":\"timeseries/a.csv\"}"
        );
        assert_eq!(
            serde_json::from_str::<AnomalyMessage>(&text).unwrap(),
            message
        );
        for kind in Kind::ALL {
            assert_eq!(
                serde_json::to_string(&kind).unwrap(),
                format!("\"{}\"", kind.as_str())
            );
        }
        assert_eq!(serde_json::to_string(&State::Open).unwrap(), "\"open\"");
    }

    fn fresh(sensor: Uuid, readings: &[i64]) -> Held {
        let mut f = Held::default();
        f.readings
            .insert(sensor, readings.iter().map(|&t| (t, t as f64)).collect());
        f
    }

    #[test]
    fn an_hour_is_held_only_when_its_writers_follow_each_other_up_to_now() {
        // Written by 10, then 11 (after 7), then 12 (after 10): no chain, whichever is last.
        assert!(!chained(&[(Some(7), 10), (Some(10), 12)], 11));
        // 7 wrote it, then 10, then 12: a chain ending now.
        assert!(chained(&[(Some(10), 12), (Some(7), 10)], 12));
        assert!(chained(&[(None, 10)], 10));
        // Someone wrote it after 12, or between 10 and 12 (12 came after 11).
        assert!(!chained(&[(Some(10), 12), (Some(7), 10)], 13));
        assert!(!chained(&[(Some(11), 12), (Some(7), 10)], 12));
        assert!(!chained(&[], 12));
    }

    #[test]
    fn held_readings_are_fed_only_when_they_are_exactly_what_the_work_stored() {
        let (u, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let (a, b, c) = (fresh(u, &[1, 2, 3]), fresh(u, &[5, 6]), fresh(other, &[4]));
        let fed = |held: &[&Held], spans: &[(i64, i64)]| {
            own_readings(held, u, spans).map(|p| p.concat().iter().map(|r| r.0).collect())
        };
        // Two pieces, held in any order, each spanning one work row: one run in time order.
        assert_eq!(
            fed(&[&b, &c, &a], &[(5, 6), (1, 3)]),
            Some(vec![1, 2, 3, 5, 6])
        );
        assert_eq!(fed(&[&a], &[(1, 3)]), Some(vec![1, 2, 3]));
        // A work row without its readings, or readings without their work row.
        assert_eq!(fed(&[&a], &[(1, 3), (5, 6)]), None);
        assert_eq!(fed(&[&a, &b], &[(1, 3)]), None);
        // A piece that does not span its row (another version of the object won).
        assert_eq!(fed(&[&a, &b], &[(1, 3), (5, 7)]), None);
        // Overlapping pieces: one may have overwritten the other's readings.
        let d = fresh(u, &[3, 4]);
        assert_eq!(fed(&[&a, &d], &[(1, 3), (3, 4)]), None);
    }
}
