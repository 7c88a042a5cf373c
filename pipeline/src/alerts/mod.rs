//! Anomalies as data arrives: detect over the spans an object wrote, keep the verdicts in the
//! `anomalies` table, publish each change to NATS JetStream.
//!
//! 1. **Queue.** The object's own transaction ([`crate::store::write`]) queues one `anomaly_work`
//!    row per sensor it wrote: the sensor and its first and last instant there. Detection is
//!    never lost (the work commits with the rows) and never in the way (it runs after the
//!    commit; its errors cannot touch the object's outcome).
//! 2. **Detect.** [`Alerts::detect_due`] claims queued work (`FOR UPDATE SKIP LOCKED`), locks its
//!    sensors (detections of one sensor run one after the other, whichever worker runs them) and
//!    runs the [`Detector`] over the stored readings — the merged truth, whatever order objects
//!    came in — from a warm-up or a saved detector to a few readings after the span. What it
//!    finds in the *judged range* (from [`LOOKBACK`] readings before the span to its end) is
//!    compared with the stored anomalies there: new ones opened, open ones no longer found
//!    resolved, resolved ones found again reopened. It settles the rollup hours a replacing
//!    merge left inexact, and deletes the work rows, in the same transaction; an error rolls
//!    it all back and the rows are retried after a growing delay.
//! 3. **Publish.** Every change of state bumps the row's `revision`; rows whose
//!    `published_revision` is behind are the outbox. [`Alerts::publish_due`] publishes them to
//!    `<prefix>.<kind>` with the message id `<sensor>:<kind>:<start µs>:<revision>`, then records
//!    the revision: a publisher killed between the two publishes again with the same id, which
//!    JetStream drops as a duplicate.
//!
//! Redelivered events and replays queue no work (the ledger makes them no-ops); two workers on
//! overlapping data see the same stored readings one after the other, so a verdict changes only
//! when the readings do.
//!
//! Where: `work` (the queue, its claim's backoff, the history queued by `detect --all`),
//! `judge` (one path for a batch of sensors and for one; resuming saved detectors), `held`
//! (the objects' own readings fed from memory; settling inexact rollup hours through
//! [`crate::store::rollup`]), `verdicts` (stored anomalies brought in line), `saved` (detector
//! states), `outbox` (publishing and the message).

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
use crate::store::rollup::{self, Hour, HourColumns};
use crate::store::{Databases, PgResultExt, StoreError};
use crate::time::{hour_of, instant as time, HOUR_MICROS};

mod held;
mod judge;
mod outbox;
mod saved;
mod verdicts;
mod work;

use held::*;
use judge::*;
use saved::*;
use verdicts::*;
use work::*;

pub use outbox::{rfc3339, AnomalyMessage, State};

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

/// Anomaly detection over the measurement database, and the outbox.
#[derive(Clone)]
pub struct Alerts {
    dbs: Databases,
    settings: AnomalySettings,
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
    /// where they provably are all an hour holds (see [`Link`](crate::store::write::Link)),
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

    /// Detects the work rows `ids` (those of one or more objects: one per sensor and object, or group of objects) in
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
            judge(&tx, &work, fresh, &mut changes).await?;
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
}

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

#[cfg(test)]
mod tests;
