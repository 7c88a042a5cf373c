//! An object too large to hold whose valid rows streamed straight into `measurements`
//! ([`Staging::stream_in`]; the rollup and page index are widened chunk by chunk there,
//! [`Staging::stream_sorted`]): whether it may, and what follows the stream in its transaction —
//! the quarantine, whether readings are stored beside its own, the detection queued.
//!
//! It may when none of the readings held before the stream began is stored, or repeated
//! ([`may_stream_in`]): a re-upload or correction then stages as before, without a wasted read.
//! A stored or repeated key met later fails the stream with a unique violation; the caller
//! rolls the transaction back and reads the object again to stage it. Rows written so are all
//! new keys: the rollup's hours only widen and stay exact.

use super::replace::STORED_WITHIN;
use super::*;
use crate::time::Micros;

/// Whether the page index counts readings beside the object's within some sensor's span
/// (`$1`–`$3`: sensors, first and last instants; `$4`–`$6`: the object's readings per sensor and
/// UTC day, which the page index counts already): a day in a span that counts more than the
/// object wrote there. One index scan per sensor.
const DAYS_BESIDE: &str = "
    SELECT EXISTS (
        SELECT FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(u, first, last)
        JOIN measurement_days d ON d.sensor_uuid = w.u
            AND d.day >= date_trunc('day', w.first, 'UTC') AND d.day <= w.last
        LEFT JOIN unnest($4::uuid[], $5::timestamptz[], $6::bigint[]) AS o(u, day, readings)
            ON o.u = d.sensor_uuid AND o.day = d.day
        WHERE d.readings <> coalesce(o.readings, 0)
    )";

/// Whether an object whose first readings are `held` (per sensor, in file order) may stream the
/// rest straight into the table: none of them repeats an instant of its sensor, and no reading is
/// stored within their spans ([`STORED_WITHIN`]).
pub async fn may_stream_in(
    tx: &tokio_postgres::Transaction<'_>,
    held: &BySensor,
) -> Result<bool, tokio_postgres::Error> {
    let mut sensors = Vec::with_capacity(held.len());
    let (mut firsts, mut lasts) = (Vec::new(), Vec::new());
    for (u, readings) in held {
        let mut at: Vec<Micros> = readings.iter().map(|r| r.0).collect();
        at.sort_unstable();
        if at.windows(2).any(|w| w[0] == w[1]) {
            return Ok(false);
        }
        let (Some(first), Some(last)) = (at.first(), at.last()) else {
            continue;
        };
        sensors.push(*u);
        firsts.push(instant(*first));
        lasts.push(instant(*last));
    }
    let (Some(earliest), Some(latest)) = (firsts.iter().min(), lasts.iter().max()) else {
        return Ok(true);
    };
    let row = tx
        .query_one(
            STORED_WITHIN,
            &[&sensors, &firsts, &lasts, earliest, latest],
        )
        .await?;
    Ok(!row.get::<_, bool>(0))
}

/// After the valid rows of object version number `version` streamed straight into the table
/// (the rollup and page index widened a chunk at a time): moves its staged rejected rows into
/// quarantine under ledger entry `quarantine` and, with `detect`, queues detection of its
/// `spans`. `met_stored` is whether the page index counts readings beside the object's on a day
/// of a span (`days`: the object's readings per sensor and day; `None`, too many to count: taken
/// to be so). Then stored readings may interleave with the object's, and detection reads on to
/// the newest.
pub async fn merge_streamed(
    tx: &deadpool_postgres::Transaction<'_>,
    quarantine: Option<i64>,
    key: &str,
    version: i64,
    spans: &Spans,
    days: Option<Vec<(uuid::Uuid, Micros, i64)>>,
    detect: bool,
) -> Result<Merged, tokio_postgres::Error> {
    quarantine_one(tx, quarantine, key, version).await?;
    let mut within: Vec<SensorSpan> = spans
        .sensors
        .iter()
        .map(|(u, s)| (*u, instant(s.0), instant(s.1)))
        .collect();
    if within.is_empty() {
        return Ok(Merged::default());
    }
    within.sort_unstable_by_key(|s| s.0);
    let member = Member {
        version,
        key,
        quarantine,
        spans,
    };
    let queue_statement = match detect {
        true => Some(tx.prepare_cached(QUEUE_DETECTION).await?),
        false => None,
    };
    let met_stored = match days {
        None => true,
        Some(days) => {
            let sensors: Vec<uuid::Uuid> = within.iter().map(|s| s.0).collect();
            let firsts: Vec<_> = within.iter().map(|s| s.1).collect();
            let lasts: Vec<_> = within.iter().map(|s| s.2).collect();
            let day_sensors: Vec<uuid::Uuid> = days.iter().map(|d| d.0).collect();
            let day_starts: Vec<_> = days.iter().map(|d| instant(d.1)).collect();
            let day_readings: Vec<i64> = days.iter().map(|d| d.2).collect();
            let beside = tx.prepare_cached(DAYS_BESIDE).await?;
            tx.query_one(
                &beside,
                &[
                    &sensors,
                    &firsts,
                    &lasts,
                    &day_sensors,
                    &day_starts,
                    &day_readings,
                ],
            )
            .await?
            .get(0)
        }
    };
    let mut works = queue(
        tx,
        queue_statement.as_ref(),
        std::slice::from_ref(&member),
        &[within],
    )
    .await?;
    Ok(Merged {
        changed: spans.rows(),
        work: works.pop().unwrap_or_default(),
        met_stored,
        links: Vec::new(),
    })
}
