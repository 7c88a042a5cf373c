//! Readings held in memory written without staging: copied straight into `measurements` when
//! none is stored yet, or replacing exactly the stored readings they beat (a re-upload, a
//! correction) with the rollup corrected for what left.

use super::*;
use crate::time::Micros;

/// [`STORED_IN_SPANS`]'s text.
macro_rules! stored_in_spans {
    () => {
        "
    SELECT EXISTS (
        SELECT FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(u, first, last)
        CROSS JOIN LATERAL (
            SELECT FROM measurements m
            WHERE m.sensor_uuid = w.u AND m.ts >= w.first AND m.ts <= w.last
                AND m.ts >= $4 AND m.ts <= $5
            LIMIT 1
        ) AS stored
    )"
    };
}

/// Whether any reading is stored within one of the spans `$1`–`$3` (sensors, first and last
/// instants; one index probe each). `$4` and `$5`, the earliest first and the latest last
/// instant, bound the probe for the planner too: on a TimescaleDB hypertable it then plans the
/// chunks of the object's time range only (200 sensors over 69 days among ten years of 7-day
/// chunks: 42 ms a call without the bounds).
pub(super) const STORED_IN_SPANS: &str = stored_in_spans!();

/// [`STORED_IN_SPANS`], and whether any reading is stored in the days strictly between the first
/// and the last day of a span (a second index probe per sensor).
pub(super) const STORED_WITHIN: &str = concat!(
    stored_in_spans!(),
    ", EXISTS (
        SELECT FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(u, first, last)
        CROSS JOIN LATERAL (
            SELECT FROM measurement_days d
            WHERE d.sensor_uuid = w.u AND d.day > date_trunc('day', w.first, 'UTC')
                AND d.day < date_trunc('day', w.last, 'UTC')
            LIMIT 1
        ) AS stored
    )"
);

/// The fast path of [`merge_held`]: the held readings, all new, straight into the table.
pub(super) const COPY_NEW: &str =
    "COPY measurements (sensor_uuid, ts, value, version) FROM STDIN (FORMAT binary)";

/// Held readings staged to be upserted, when some are stored already.
pub(super) const COPY_HELD: &str =
    "COPY staging_rows (line, sensor_uuid, ts, value) FROM STDIN (FORMAT binary)";

/// The first step of replacing stored readings with held ones ([`replace_held`]): deletes the
/// stored rows within each sensor's span (`$sensors`, `$firsts`, `$lasts`, sensors in key order)
/// that version `$version` beats, and sends their keys and values back as a binary `COPY`. In key
/// order, as every other ingestion locks rows: the settings of [`KEY_ORDER`] leave the planner a
/// nested loop over the spans with an index scan of each. A `COPY` takes no parameters: the
/// placeholders are replaced by literals ([`replaced_statement`]). Sending the rows as `COPY`
/// data rather than `RETURNING` rows spares the server the result's tuple store and the worker a
/// row object per reading.
pub(super) const REPLACED: &str = concat!(
    "COPY (DELETE FROM measurements AS target
    USING unnest($sensors::uuid[], $firsts::timestamptz[], $lasts::timestamptz[])
        AS w(u, first, last)
    WHERE target.sensor_uuid = w.u AND target.ts >= w.first AND target.ts <= w.last AND ",
    version_beats!("$version::bigint", "target.version"),
    "
    RETURNING target.sensor_uuid, target.ts, target.value) TO STDOUT (FORMAT binary)"
);

/// The plan [`REPLACED`] must have (a hash join would scan the whole table, and a bitmap scan
/// visits rows in the order they lie on disk), for this transaction, until [`ANY_PLAN`].
pub(super) const KEY_ORDER: &str =
    "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off;
    SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";

pub(super) const ANY_PLAN: &str =
    "RESET enable_seqscan; RESET enable_bitmapscan; RESET enable_hashjoin; RESET enable_mergejoin";

/// The rollup row of one hour a replacing merge wrote ([`merge_held`]): the transaction that
/// wrote it last before the merge (`before`; `None` if it had no row) and the merge's own
/// (`by`), as PostgreSQL numbers them (the row's `xmin`). Every write of readings rewrites the
/// rollup rows of the hours it writes, so while the row's `xmin` is still `by`, nothing wrote
/// into the hour since; and a chain of such links from the row's `xmin` back says which merges
/// wrote it one after the other, with nothing in between. When their readings are also as many
/// as the hour holds, they are all it holds: detection takes them from memory
/// ([`crate::alerts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub sensor: uuid::Uuid,
    /// The hour's start, in microseconds since the epoch.
    pub hour: Micros,
    pub before: Option<i64>,
    pub by: i64,
}

/// [`merge`] for a measurement object whose valid readings were held in memory (`held`) instead
/// of staged (its rejected rows are staged): when none of them is stored yet, they are copied
/// straight into the table in key order ([`COPY_NEW`], half the server time of staging them and
/// inserting from the staging table) and the rollup and page index widened by their hours
/// ([`WIDEN_HOURS`]); when some are, the stored readings they overwrite are replaced
/// ([`replace_held`]). Where that cannot be done (a stored reading it would remove is not among
/// them, or one of their keys holds no reading they beat), or if a concurrent ingestion
/// inserted one of their keys meanwhile (the `COPY` then fails with a unique violation), the
/// transaction is rolled back to the savepoint and they are staged and upserted as [`merge`]
/// does.
pub async fn merge_held(
    tx: &deadpool_postgres::Transaction<'_>,
    quarantine: Option<i64>,
    key: &str,
    version: i64,
    held: &BySensor,
    detect: bool,
) -> Result<Merged, tokio_postgres::Error> {
    quarantine_one(tx, quarantine, key, version).await?;
    let mut sensors: Vec<uuid::Uuid> = held
        .iter()
        .filter(|(_, r)| !r.is_empty())
        .map(|(u, _)| *u)
        .collect();
    if sensors.is_empty() {
        return Ok(Merged::default());
    }
    // Key order: the order every ingestion locks rows in.
    sensors.sort_unstable();
    let spans = Spans::of_settled(held);
    let member = Member {
        version,
        key,
        quarantine,
        spans: &spans,
    };
    let within: Vec<SensorSpan> = sensors
        .iter()
        .map(|u| {
            let (first, last) = spans.sensors[u];
            (*u, instant(first), instant(last))
        })
        .collect();
    let queue_statement = match detect {
        true => Some(tx.prepare_cached(QUEUE_DETECTION).await?),
        false => None,
    };
    let stored = tx.prepare_cached(STORED_WITHIN).await?;
    let firsts: Vec<_> = within.iter().map(|s| s.1).collect();
    let lasts: Vec<_> = within.iter().map(|s| s.2).collect();
    let within = [within];
    let earliest = firsts.iter().min().expect("a sensor");
    let latest = lasts.iter().max().expect("a sensor");
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&sensors, &firsts, &lasts, earliest, latest];
    let (works, set, stored) = tokio::join!(
        queue(
            tx,
            queue_statement.as_ref(),
            std::slice::from_ref(&member),
            &within
        ),
        tx.batch_execute(MERGE_WORK_MEM),
        tx.query_one(&stored, &params)
    );
    let mut works = works?;
    set?;
    let stored = stored?;
    let (met_stored, inner_days_stored) = (stored.get::<_, bool>(0), stored.get::<_, bool>(1));
    let written = match met_stored {
        false => copy_new(tx, version, &sensors, held, &spans, inner_days_stored)
            .await
            .map(|()| Some(Vec::new())),
        true => {
            replace_held(
                tx,
                version,
                &sensors,
                (&firsts, &lasts),
                held,
                &spans,
                !detect,
            )
            .await
        }
    };
    match written {
        Ok(Some(links)) => {
            return Ok(Merged {
                changed: held.values().map(|r| r.len() as u64).sum(),
                work: works.pop().unwrap_or_default(),
                met_stored,
                links,
            })
        }
        Ok(None) => tx.batch_execute("ROLLBACK TO SAVEPOINT fresh_rows").await?,
        Err(e) if met_a_stored_key(&e) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT fresh_rows").await?;
        }
        Err(e) => return Err(e),
    }
    copy_held(tx, COPY_HELD, &sensors, held, None).await?;
    let mut merged = upserted(tx, std::slice::from_ref(&member), works).await?;
    Ok(merged.pop().unwrap_or_default())
}

/// Replaces the stored readings the held ones overwrite, when the readings stored within their
/// spans that version `version` beats are exactly their keys (a re-upload or correction of the
/// same readings: the common case): deletes those ([`REPLACED`]), copies the held readings
/// straight into the table ([`COPY_NEW`]), and settles the bounds of the rollup's hours
/// ([`REPLACE_HOURS`], then — with `settle` — [`OUTSIDE_HOURS`] and [`EXACT_HOURS`] for the
/// hours whose bounds it cannot tell; without, those hours are left inexact, their bounds around
/// the readings', for the detection this transaction queues to settle from the readings it
/// holds: `crate::alerts`); the counts and the page index do not change. Returns the [`Link`]s
/// of the hours it wrote (their rollup rows' writers, read and locked by [`HOURS_BEFORE`]); or
/// `None`, having written nothing the caller must keep (it rolls back to the savepoint and
/// upserts), when a reading it deleted is not among the held ones (it must stay) or a held
/// reading deleted none (a new key, or one whose stored reading the version does not beat).
///
/// Why every held key must have been deleted: the delete locks rows in key order, as every
/// writer does, but the `COPY` then goes through the keys a second time. A key it inserts
/// without having deleted it could be one another writer inserted meanwhile and holds while it
/// waits for a row this transaction deleted — a deadlock, in which PostgreSQL may abort the
/// other writer. A key whose stored row this transaction deleted cannot be held by anyone
/// else: a writer of it waits for this transaction. So the `COPY` never waits.
///
/// Measured on PostgreSQL 15 (100,000 readings over 100 sensors overwritten in a 1.2-million-row
/// table): the staging `COPY` and the upsert of [`MERGE_MEASUREMENTS`] cost about 100 and 490 ms
/// of server time; deleting the replaced rows 110 ms and copying the new ones in 200–290 ms. An
/// overwrite cannot be cheaper than writing a new row version and its index entry; the delete
/// and `COPY` do exactly that, with the `COPY`'s batched inserts, and skip the staging table.
///
/// [`EXACT_HOURS`]: super::rollup::EXACT_HOURS
pub(super) async fn replace_held(
    tx: &deadpool_postgres::Transaction<'_>,
    version: i64,
    sensors: &[uuid::Uuid],
    (firsts, lasts): (
        &[chrono::DateTime<chrono::Utc>],
        &[chrono::DateTime<chrono::Utc>],
    ),
    held: &BySensor,
    written: &Spans,
    settle: bool,
) -> Result<Option<Vec<Link>>, tokio_postgres::Error> {
    use futures_util::TryStreamExt;
    use tokio_postgres::binary_copy::BinaryCopyOutStream;
    use tokio_postgres::types::Type;
    let Some(statement) = replaced_statement(version, sensors, firsts, lasts) else {
        return Ok(None);
    };
    let deleted = async {
        let rows = tx.copy_out(statement.as_str()).await?;
        let rows = BinaryCopyOutStream::new(rows, &[Type::UUID, Type::TIMESTAMPTZ, Type::FLOAT8]);
        let mut rows = std::pin::pin!(rows);
        let mut removed = Removed::default();
        while let Some(row) = rows.try_next().await? {
            let at = row
                .get::<chrono::DateTime<chrono::Utc>>(1)
                .timestamp_micros();
            if !removed.add(held, row.get(0), at, row.get(2)) {
                return Ok(None);
            }
        }
        Ok::<_, tokio_postgres::Error>(Some(removed.finish()))
    };
    let (set, removed) = tokio::join!(tx.batch_execute(KEY_ORDER), deleted);
    set?;
    let Some(removed) = removed? else {
        return Ok(None);
    };
    let deleted: i64 = removed.values().map(|h| h.readings).sum();
    let keys: usize = held.values().map(Vec::len).sum();
    if deleted as usize != keys {
        return Ok(None);
    }
    let hours = tx.prepare_cached(REPLACE_HOURS).await?;
    let before = tx.prepare_cached(HOURS_BEFORE).await?;
    tx.batch_execute(ANY_PLAN).await?;
    copy_held(tx, COPY_NEW, sensors, held, Some(version)).await?;
    let hours_written = written.hours.as_ref().expect("the hours of held readings");
    let columns = HourColumns::of(hours_written);
    let before: std::collections::HashMap<(uuid::Uuid, i64), i64> = tx
        .query(&before, &[&columns.sensors, &columns.hours])
        .await?
        .iter()
        .map(|r| {
            let hour: chrono::DateTime<chrono::Utc> = r.get(1);
            ((r.get(0), hour.timestamp_micros()), r.get(2))
        })
        .collect();
    // Every hour written replaced as many readings (the keys are the same).
    let gone: Vec<Hour> = columns
        .sensors
        .iter()
        .zip(&columns.hours)
        .map(|(u, h)| removed[&(*u, h.timestamp_micros())])
        .collect();
    let gone_lows: Vec<f64> = gone.iter().map(|h| h.low).collect();
    let gone_highs: Vec<f64> = gone.iter().map(|h| h.high).collect();
    let gone_totals: Vec<f64> = gone.iter().map(|h| h.total).collect();
    let mut params = columns.params().to_vec();
    params.extend([
        &gone_lows as &(dyn tokio_postgres::types::ToSql + Sync),
        &gone_highs,
        &gone_totals,
    ]);
    let row = tx.query_one(&hours, &params).await?;
    let (inexact, hours): (Vec<uuid::Uuid>, Vec<chrono::DateTime<chrono::Utc>>) =
        (row.get(0), row.get(1));
    let (rolled, at, by): (
        Vec<uuid::Uuid>,
        Vec<chrono::DateTime<chrono::Utc>>,
        Vec<i64>,
    ) = (row.get(2), row.get(3), row.get(4));
    let links = rolled
        .into_iter()
        .zip(at)
        .zip(by)
        .map(|((sensor, hour), by)| {
            let hour = hour.timestamp_micros();
            Link {
                sensor,
                hour,
                before: before.get(&(sensor, hour)).copied(),
                by,
            }
        })
        .collect();
    if inexact.is_empty() || !settle {
        return Ok(Some(links));
    }
    // What the held readings of each inexact hour are.
    let mut within = HourColumns::default();
    for (u, hour) in inexact.iter().zip(&hours) {
        let start = hour.timestamp_micros();
        within.push(*u, start, &hours_written[&(*u, start)]);
    }
    let outside = tx.prepare_cached(OUTSIDE_HOURS).await?;
    let params = within.params();
    let rest = tx.query(&outside, &params).await?;
    recompute_hours(tx, &rest).await?;
    Ok(Some(links))
}

/// [`REPLACED`] with its placeholders replaced by literals: the version's number and the spans
/// as array literals (UUIDs and UTC instants to the microsecond, as this code formats them).
/// `None` for an instant outside the years 1 to 9999, which PostgreSQL does not read in that
/// form (the readings are then upserted: [`merge_held`]).
pub(super) fn replaced_statement(
    version: i64,
    sensors: &[uuid::Uuid],
    firsts: &[chrono::DateTime<chrono::Utc>],
    lasts: &[chrono::DateTime<chrono::Utc>],
) -> Option<String> {
    use chrono::Datelike as _;
    use std::fmt::Write as _;
    if !firsts
        .iter()
        .chain(lasts)
        .all(|t| (1..=9999).contains(&t.year()))
    {
        return None;
    }
    pub(super) fn array<T>(items: &[T], mut each: impl FnMut(&mut String, &T)) -> String {
        let mut s = String::from("'{");
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            each(&mut s, item);
        }
        s.push_str("}'");
        s
    }
    let instants = |at: &[chrono::DateTime<chrono::Utc>]| {
        array(at, |s, t| {
            let _ = write!(s, "{}", t.format("%Y-%m-%dT%H:%M:%S%.6fZ"));
        })
    };
    let statement = REPLACED
        .replace("$version", &version.to_string())
        .replace(
            "$sensors",
            &array(sensors, |s, u| {
                let _ = write!(s, "{u}");
            }),
        )
        .replace("$firsts", &instants(firsts))
        .replace("$lasts", &instants(lasts));
    Some(statement)
}

/// The readings a replacement deleted, per (sensor, hour): how many, their low and high. They
/// arrive in key order, so each is checked against the held readings by walking them, and
/// gathered into its hour until the next hour begins.
#[derive(Default)]
pub(super) struct Removed {
    pub(super) hours: std::collections::HashMap<(uuid::Uuid, i64), Hour>,
    /// The sensor of the last reading, the place after it among the held readings, and its hour.
    pub(super) at: Option<(uuid::Uuid, usize, i64, Hour)>,
}

impl Removed {
    /// Adds a deleted reading; false when it is not one of the held readings.
    pub(super) fn add(
        &mut self,
        held: &BySensor,
        sensor: uuid::Uuid,
        at: Micros,
        value: f64,
    ) -> bool {
        let Some(readings) = held.get(&sensor) else {
            return false;
        };
        let hour = hour_of(at);
        let mut place = match self.at {
            Some((u, place, ..)) if u == sensor => place,
            _ => 0,
        };
        while place < readings.len() && readings[place].0 < at {
            place += 1;
        }
        if readings.get(place).is_none_or(|r| r.0 != at) {
            // Out of order (the next reading is not further on): look it up.
            match readings.binary_search_by_key(&at, |r| r.0) {
                Ok(i) => place = i,
                Err(_) => return false,
            }
        }
        match &mut self.at {
            Some((u, p, h, sum)) if *u == sensor && *h == hour => {
                *p = place + 1;
                sum.add(at, value);
            }
            _ => {
                self.flush();
                self.at = Some((sensor, place + 1, hour, Hour::of(at, value)));
            }
        }
        true
    }

    /// Adds the hour being gathered to the others.
    pub(super) fn flush(&mut self) {
        if let Some((u, _, h, sum)) = self.at.take() {
            self.hours
                .entry((u, h))
                .and_modify(|h| h.absorb(sum))
                .or_insert(sum);
        }
    }

    pub(super) fn finish(mut self) -> std::collections::HashMap<(uuid::Uuid, i64), Hour> {
        self.flush();
        self.hours
    }
}

/// Copies new held readings straight into the table ([`COPY_NEW`]) and widens the rollup and page
/// index by their hours. Where no reading is stored in the days strictly between the first and
/// the last day of any sensor's span (`inner_days_stored` false), the hours of those inner days
/// are copied in as new rows ([`copy_new_hours`]) and only the hours of each span's first and
/// last day — which a neighbouring object of the sensor may share, and may be writing now — are
/// upserted ([`WIDEN_HOURS`]), last: a neighbour's transaction that holds those rows is waited
/// for at the end of this one, not for all of it; else all are upserted.
pub(super) async fn copy_new(
    tx: &deadpool_postgres::Transaction<'_>,
    version: i64,
    sensors: &[uuid::Uuid],
    held: &BySensor,
    spans: &Spans,
    inner_days_stored: bool,
) -> Result<(), tokio_postgres::Error> {
    copy_held(tx, COPY_NEW, sensors, held, Some(version)).await?;
    let hours = spans.hours.as_ref().expect("the hours of held readings");
    let widen = tx.prepare_cached(WIDEN_HOURS).await?;
    if inner_days_stored {
        tx.query_one(&widen, &HourColumns::of(hours).params())
            .await?;
        return Ok(());
    }
    let (mut inner, edges): (Vec<_>, Vec<_>) = hours.iter().partition(|((u, hour), _)| {
        let (first, last) = spans.sensors[u];
        let day = day_of(*hour);
        day > day_of(first) && day < day_of(last)
    });
    inner.sort_unstable_by_key(|(key, _)| **key);
    copy_new_hours(tx, &inner).await?;
    if !edges.is_empty() {
        tx.query_one(&widen, &HourColumns::of(edges).params())
            .await?;
    }
    Ok(())
}

/// Copies the held readings of `sensors`, in that order: with `version`, as rows of the table
/// ([`COPY_NEW`]); without, as staged rows ([`COPY_HELD`]) whose line is the reading's place
/// among its sensor's (one per instant: no two lines of a key to order).
pub(super) async fn copy_held(
    tx: &deadpool_postgres::Transaction<'_>,
    statement: &str,
    sensors: &[uuid::Uuid],
    held: &BySensor,
    version: Option<i64>,
) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in(statement).await?;
    let mut sink = std::pin::pin!(sink);
    let mut enc = CopyEncoder::new();
    for u in sensors {
        for (line, &(us, value)) in held[u].iter().enumerate() {
            enc.row(4);
            if version.is_none() {
                enc.int8(line as i64);
            }
            enc.uuid(u);
            enc.timestamptz(us);
            enc.float8(value);
            if let Some(v) = version {
                enc.int8(v);
            }
            if let Some(chunk) = enc.take_if_full() {
                sink.send(chunk).await?;
            }
        }
    }
    sink.send(enc.finish()).await?;
    sink.as_mut().finish().await?;
    Ok(())
}
