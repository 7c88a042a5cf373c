//! Streaming one sensor's readings in time order, in keyset batches on `(sensor_uuid, ts)` (the
//! primary key), for the commands that compute over readings (`anomalies`, `plot`): memory stays
//! flat however many readings there are.

use std::pin::pin;

use chrono::{DateTime, Duration, Utc};
use futures_util::TryStreamExt;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::db::failed;
use crate::Failure;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Calls `each(microseconds since the epoch, value)` for every reading of `uuid` in `[from, to]`,
/// in time order; returns how many there were.
///
/// The readings come as one `COPY (SELECT …) TO STDOUT (FORMAT binary)` read off the primary
/// key, decoded here (a tuple is a count, then a length and 8 big-endian bytes per field):
/// `bench-anomalies` measured `plot` of 10 M readings at 7.6 s through row-by-row `query_raw`
/// (the row protocol and its per-row decoding) and at the figure in the module's commit message
/// with this.
pub async fn each_reading(
    client: &Client,
    uuid: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    mut each: impl FnMut(i64, f64),
) -> Result<u64, Failure> {
    // COPY takes no parameters: the values are formatted in (a UUID and two instants, all ours).
    let query = format!(
        "COPY (SELECT ts, value FROM measurements WHERE sensor_uuid = '{uuid}' \
         AND ts >= '{}' AND ts <= '{}' ORDER BY ts) TO STDOUT (FORMAT binary)",
        from.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        to.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    );
    let stream = client
        .copy_out(query.as_str())
        .await
        .map_err(failed("measurement"))?;
    let mut stream = pin!(stream);
    let mut decoder = Decoder::default();
    while let Some(chunk) = stream.try_next().await.map_err(failed("measurement"))? {
        decoder
            .feed(&chunk, &mut each)
            .map_err(|e| Failure::Infrastructure(format!("measurement database: {e}")))?;
    }
    Ok(decoder.rows)
}

/// Decodes PostgreSQL's binary COPY of `(timestamptz, float8)` tuples, across chunk boundaries.
#[derive(Default)]
struct Decoder {
    pending: Vec<u8>,
    header_done: bool,
    rows: u64,
}

/// Signature (11 bytes), flags (4), header extension length (4).
const HEADER: usize = 19;
/// Field count (2), then per field a length (4) and 8 bytes.
const TUPLE: usize = 2 + 2 * (4 + 8);

impl Decoder {
    fn feed(&mut self, chunk: &[u8], each: &mut impl FnMut(i64, f64)) -> Result<(), String> {
        self.pending.extend_from_slice(chunk);
        let mut at = 0;
        let buf = &self.pending;
        if !self.header_done {
            if buf.len() < HEADER {
                return Ok(());
            }
            if &buf[..11] != b"PGCOPY\n\xff\r\n\0" {
                return Err("unexpected COPY format".into());
            }
            let extension = u32::from_be_bytes(buf[15..19].try_into().expect("4 bytes")) as usize;
            if buf.len() < HEADER + extension {
                return Ok(());
            }
            at = HEADER + extension;
            self.header_done = true;
        }
        let be8 = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
        while buf.len() - at >= 2 {
            let fields = i16::from_be_bytes([buf[at], buf[at + 1]]);
            if fields == -1 {
                at = buf.len();
                break;
            }
            if buf.len() - at < TUPLE {
                break;
            }
            let t = &buf[at..at + TUPLE];
            if fields != 2 || t[2..6] != [0, 0, 0, 8] || t[14..18] != [0, 0, 0, 8] {
                return Err("unexpected COPY tuple".into());
            }
            let ts = be8(&t[6..14]) as i64 + PG_EPOCH_MICROS;
            let value = f64::from_bits(be8(&t[18..26]));
            each(ts, value);
            self.rows += 1;
            at += TUPLE;
        }
        self.pending.drain(..at);
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuples_split_anywhere_decode_the_same() {
        let mut copy = b"PGCOPY\n\xff\r\n\0".to_vec();
        copy.extend([0, 0, 0, 0, 0, 0, 0, 0]);
        for (ts, v) in [(0i64, 1.5f64), (86_400_000_000, -2.25)] {
            copy.extend(2i16.to_be_bytes());
            copy.extend(8i32.to_be_bytes());
            copy.extend(ts.to_be_bytes());
            copy.extend(8i32.to_be_bytes());
            copy.extend(v.to_bits().to_be_bytes());
        }
        copy.extend((-1i16).to_be_bytes());
        for split in 0..copy.len() {
            let mut d = Decoder::default();
            let mut got = Vec::new();
            d.feed(&copy[..split], &mut |t, v| got.push((t, v)))
                .unwrap();
            d.feed(&copy[split..], &mut |t, v| got.push((t, v)))
                .unwrap();
            assert_eq!(
                got,
                [
                    (PG_EPOCH_MICROS, 1.5),
                    (PG_EPOCH_MICROS + 86_400_000_000, -2.25)
                ]
            );
            assert_eq!(d.rows, 2);
        }
    }
}
