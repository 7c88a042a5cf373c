//! The detection work queue (`anomaly_work`): one row per sensor and object (or group of small
//! objects ingested together), queued in the object's transaction, claimed per sensor, retried after a growing delay when detection fails;
//! and the history queued by `sensors-worker detect --all`.

use super::*;

/// One queued span.
#[derive(Clone)]
pub(super) struct Work {
    pub(super) id: i64,
    pub(super) sensor: Uuid,
    pub(super) from: DateTime<Utc>,
    pub(super) to: DateTime<Utc>,
    pub(super) key: String,
}

/// The work rows of each sensor as one span (the first start to the last end, the key of the
/// newest row).
pub(super) fn one_span_per_sensor(work: &[Work]) -> Vec<Work> {
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

impl Alerts {
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

    /// Records a failed detection on its work rows (retried after a growing delay) and returns
    /// the error.
    pub(super) async fn failed(
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
}
