//! Streaming one sensor's readings in time order for the commands that compute over readings
//! (`anomalies`, `plot`): the library's keyset streaming ([`readings`]), with query-cli's errors.

use chrono::{DateTime, Utc};
use sensor_pipeline::store::measurements as readings;
use sensor_pipeline::time::Micros;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::db::failed;
use crate::Failure;

/// Calls `each(microseconds since the epoch, value)` for every reading of `uuid` in `[from, to]`,
/// in time order; returns how many there were.
pub async fn each_reading(
    client: &Client,
    uuid: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    each: impl FnMut(Micros, f64),
) -> Result<u64, Failure> {
    readings::each_reading(client, uuid, from, to, each)
        .await
        .map_err(failed("measurement"))
}

/// The first and last reading time of `uuid` in `[from, to]` (microseconds), if it has any: two
/// probes of the primary key.
pub async fn extent(
    client: &Client,
    uuid: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Option<(Micros, Micros)>, Failure> {
    let row = client
        .query_one(
            "SELECT (SELECT ts FROM measurements WHERE sensor_uuid = $1 AND ts >= $2 AND ts <= $3
                     ORDER BY ts LIMIT 1),
                    (SELECT ts FROM measurements WHERE sensor_uuid = $1 AND ts >= $2 AND ts <= $3
                     ORDER BY ts DESC LIMIT 1)",
            &[&uuid, &from, &to],
        )
        .await
        .map_err(failed("measurement"))?;
    let (first, last): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = (row.get(0), row.get(1));
    Ok(first
        .zip(last)
        .map(|(a, b)| (a.timestamp_micros(), b.timestamp_micros())))
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
