//! Streaming one sensor's readings in time order, in keyset batches on `(sensor_uuid, ts)` (the
//! primary key), for the commands that compute over readings (`anomalies`, `plot`): memory stays
//! flat however many readings there are.

use std::pin::pin;

use chrono::{DateTime, Duration, Utc};
use futures_util::TryStreamExt;
use postgres_types::ToSql;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::db::failed;
use crate::Failure;

/// Rows fetched per keyset batch.
const BATCH: i64 = 100_000;

/// Calls `each(microseconds since the epoch, value)` for every reading of `uuid` in `[from, to]`,
/// in time order; returns how many there were.
pub async fn each_reading(
    client: &Client,
    uuid: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    mut each: impl FnMut(i64, f64),
) -> Result<u64, Failure> {
    let stmt = client
        .prepare(
            "SELECT ts, value FROM measurements \
             WHERE sensor_uuid = $1 AND ts > $2 AND ts <= $3 ORDER BY ts LIMIT $4",
        )
        .await
        .map_err(failed("measurement"))?;
    // Timestamps are stored to the microsecond: `> from - 1µs` is `>= from`.
    let mut after = from - Duration::microseconds(1);
    let mut total = 0;
    loop {
        let params: [&(dyn ToSql + Sync); 4] = [&uuid, &after, &to, &BATCH];
        let rows = client
            .query_raw(&stmt, params.iter().copied())
            .await
            .map_err(failed("measurement"))?;
        let mut rows = pin!(rows);
        let mut count = 0;
        while let Some(row) = rows.try_next().await.map_err(failed("measurement"))? {
            let ts: DateTime<Utc> = row.try_get(0).map_err(failed("measurement"))?;
            let value: f64 = row.try_get(1).map_err(failed("measurement"))?;
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

/// Where to start reading so that a detector is warmed up at `start`: the earlier of
/// `span` before it and the `readings`-th reading before it (the first reading when there are
/// fewer).
pub async fn warm_up_from(
    client: &Client,
    uuid: Uuid,
    start: DateTime<Utc>,
    span: Duration,
    readings: usize,
) -> Result<DateTime<Utc>, Failure> {
    let by_span = start - span;
    let row = client
        .query_opt(
            "SELECT ts FROM measurements WHERE sensor_uuid = $1 AND ts < $2 \
             ORDER BY ts DESC OFFSET $3 LIMIT 1",
            &[&uuid, &start, &(readings.saturating_sub(1) as i64)],
        )
        .await
        .map_err(failed("measurement"))?;
    let by_count = match row {
        Some(row) => row.try_get(0).map_err(failed("measurement"))?,
        None => client
            .query_opt(
                "SELECT ts FROM measurements WHERE sensor_uuid = $1 ORDER BY ts LIMIT 1",
                &[&uuid],
            )
            .await
            .map_err(failed("measurement"))?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(failed("measurement"))?
            .unwrap_or(start),
    };
    Ok(by_span.min(by_count))
}

/// The mapped name of a sensor, if it has one.
pub async fn name_of(mapping: &Client, uuid: Uuid) -> Result<Option<String>, Failure> {
    mapping
        .query_opt(
            "SELECT sensor_name FROM sensors WHERE sensor_uuid = $1",
            &[&uuid],
        )
        .await
        .map_err(failed("mapping"))?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(failed("mapping"))
}
