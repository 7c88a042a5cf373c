//! The outbox: every change of an anomaly's state bumps its row's `revision`; rows whose
//! `published_revision` is behind are published to NATS JetStream and then recorded (see the
//! module doc of [`crate::alerts`]), and the message they become.

use super::*;

/// Outbox rows published per transaction.
pub(super) const PUBLISH_BATCH: i64 = 100;

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

/// RFC 3339 UTC, with as many fractional digits as needed (as `query-cli` prints them).
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

impl Alerts {
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
