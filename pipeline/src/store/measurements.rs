//! Reads of the `measurements` table: one sensor's stored readings in time order for the detector,
//! in keyset batches on `(sensor_uuid, ts)` (the primary key), so memory stays flat however many
//! readings there are, and where to start so that the detector is warmed up. Used by `query-cli`
//! (`anomalies`, `plot`) and by the workers' detection ([`crate::alerts`]). The detector itself
//! ([`crate::anomaly`]) reads nothing: it is fed readings.

use std::pin::pin;

use chrono::{DateTime, Duration, Utc};
use futures_util::TryStreamExt;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Error, GenericClient};
use uuid::Uuid;

use crate::time::Micros;

/// Rows fetched per keyset batch.
const BATCH: i64 = 100_000;

/// Calls `each(microseconds since the epoch, value)` for every reading of `uuid` in `[from, to]`,
/// in time order; returns how many there were.
pub async fn each_reading(
    client: &impl GenericClient,
    uuid: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    mut each: impl FnMut(Micros, f64),
) -> Result<u64, Error> {
    let stmt = client
        .prepare(
            "SELECT ts, value FROM measurements \
             WHERE sensor_uuid = $1 AND ts > $2 AND ts <= $3 ORDER BY ts LIMIT $4",
        )
        .await?;
    // Timestamps are stored to the microsecond: `> from - 1µs` is `>= from`.
    let mut after = from - Duration::microseconds(1);
    let mut total = 0;
    loop {
        let params: [&(dyn ToSql + Sync); 4] = [&uuid, &after, &to, &BATCH];
        let rows = client.query_raw(&stmt, params.iter().copied()).await?;
        let mut rows = pin!(rows);
        let mut count = 0;
        while let Some(row) = rows.try_next().await? {
            let ts: DateTime<Utc> = row.try_get(0)?;
            let value: f64 = row.try_get(1)?;
            each(ts.timestamp_micros(), value);
            after = ts;
            count += 1;
        }
        total += count as u64;
        if count < BATCH {
            return Ok(total);
        }
    }
}

/// The time of the `n`-th reading of `uuid` before `at` (n ≥ 1), or of its first reading when
/// there are fewer; `None` when there is none before `at`.
pub async fn nth_before(
    client: &impl GenericClient,
    uuid: Uuid,
    at: DateTime<Utc>,
    n: usize,
) -> Result<Option<DateTime<Utc>>, Error> {
    let row = client
        .query_opt(
            "SELECT ts FROM measurements WHERE sensor_uuid = $1 AND ts < $2 \
             ORDER BY ts DESC OFFSET $3 LIMIT 1",
            &[&uuid, &at, &(n.saturating_sub(1) as i64)],
        )
        .await?;
    if let Some(row) = row {
        return Ok(Some(row.try_get(0)?));
    }
    client
        .query_opt(
            "SELECT ts FROM measurements WHERE sensor_uuid = $1 AND ts < $2 ORDER BY ts LIMIT 1",
            &[&uuid, &at],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()
}

/// The time of the `n`-th reading of `uuid` after `at` (n ≥ 1), or of its last reading when there
/// are fewer; `at` when there is none after it.
pub async fn nth_after(
    client: &impl GenericClient,
    uuid: Uuid,
    at: DateTime<Utc>,
    n: usize,
) -> Result<DateTime<Utc>, Error> {
    let row = client
        .query_opt(
            "SELECT max(ts) FROM (SELECT ts FROM measurements WHERE sensor_uuid = $1 AND ts > $2 \
             ORDER BY ts LIMIT $3) AS next",
            &[&uuid, &at, &(n as i64)],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<DateTime<Utc>>>(0))
        .unwrap_or(at))
}

/// Where to start reading so that a detector is warmed up at `start`: the earlier of `span`
/// before it and the `readings`-th reading before it (the first reading when there are fewer).
pub async fn warm_up_from(
    client: &impl GenericClient,
    uuid: Uuid,
    start: DateTime<Utc>,
    span: Duration,
    readings: usize,
) -> Result<DateTime<Utc>, Error> {
    let by_count = nth_before(client, uuid, start, readings)
        .await?
        .unwrap_or(start);
    Ok((start - span).min(by_count))
}
