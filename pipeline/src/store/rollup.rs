//! The hourly rollup `measurement_hours`, its one owner: what a row holds ([`Hour`]), how rows
//! travel to and from statements ([`HourColumns`]), and every statement that writes it — widened
//! by new readings, corrected by a replacement, settled exact (by the merge here, and by
//! detection in `crate::alerts`, which holds the readings). The daily rollup
//! `measurement_day_values` follows the hours by the triggers of `measurements/V7`.
//!
//! A row is `exact` when its count, bounds, sum and first and last reading are those of the
//! hour's stored readings; a replacement that may have removed an extreme leaves it inexact,
//! with bounds around the readings', until it is settled. Readers take an inexact hour from
//! its readings.

use crate::time::{day_of, instant, Micros};

/// The rollup's columns past its key and `exact`, in the order of [`HourColumns`].
macro_rules! rollup_columns {
    () => {
        "readings, low, high, total, first_at, first_value, last_at, last_value"
    };
}

/// An hour's rollup row `h` widened by the readings of `EXCLUDED`, all at other instants: the
/// counts and sums add up, the bounds widen, and the first and last reading are the earlier and
/// later of the two (every expression sees the row as it was).
macro_rules! widen_set {
    () => {
        "readings = h.readings + EXCLUDED.readings, low = least(h.low, EXCLUDED.low),
            high = greatest(h.high, EXCLUDED.high), total = h.total + EXCLUDED.total,
            first_at = least(h.first_at, EXCLUDED.first_at),
            first_value = CASE WHEN EXCLUDED.first_at < h.first_at OR h.first_at IS NULL
                THEN EXCLUDED.first_value ELSE h.first_value END,
            last_at = greatest(h.last_at, EXCLUDED.last_at),
            last_value = CASE WHEN EXCLUDED.last_at > h.last_at OR h.last_at IS NULL
                THEN EXCLUDED.last_value ELSE h.last_value END"
    };
}

/// The hours of an [`HourColumns`] from the ten parameters starting at `$n`, as rows of
/// (sensor_uuid, hour, and the rollup's columns).
macro_rules! unnest_hours {
    ($s:literal, $h:literal, $r:literal, $l:literal, $hi:literal, $t:literal, $fa:literal,
     $f:literal, $la:literal, $ls:literal) => {
        concat!(
            "unnest(",
            $s,
            "::uuid[], ",
            $h,
            "::timestamptz[], ",
            $r,
            "::bigint[], ",
            $l,
            "::float8[], ",
            $hi,
            "::float8[], ",
            $t,
            "::float8[], ",
            $fa,
            "::timestamptz[], ",
            $f,
            "::float8[], ",
            $la,
            "::timestamptz[], ",
            $ls,
            "::float8[])
            AS h(sensor_uuid, hour, ",
            rollup_columns!(),
            ")"
        )
    };
}

/// The rollup's columns of the readings `m` (ts, value) `FROM` the given source (`NULL`s but
/// the count when it holds none).
macro_rules! rollup_of {
    ($from:literal) => {
        concat!(
            "SELECT count(*) AS readings, min(m.value) AS low, max(m.value) AS high,
                sum(m.value) AS total, min(m.ts) AS first_at,
                (array_agg(m.value ORDER BY m.ts))[1] AS first_value, max(m.ts) AS last_at,
                (array_agg(m.value ORDER BY m.ts DESC))[1] AS last_value
            FROM ",
            $from
        )
    };
}

/// A statement over the hours of `$1`–`$10` (the [`HourColumns`] as `x`): an `UPDATE` of
/// `measurement_hours AS h` from `x` (the parts given, concatenated) settles what it can, and the
/// hours it did not settle are returned, in key order.
macro_rules! settle_or_return {
    ($($update:tt)*) => {
        concat!(
            "
    WITH x AS (SELECT * FROM ",
            unnest_hours!("$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8", "$9", "$10"),
            "), settled AS (",
            $($update)*,
            "
        RETURNING h.sensor_uuid, h.hour
    )
    SELECT x.sensor_uuid, x.hour FROM x
    WHERE NOT EXISTS (
        SELECT FROM settled s WHERE s.sensor_uuid = x.sensor_uuid AND s.hour = x.hour
    )
    ORDER BY 1, 2"
        )
    };
}

/// What follows the `hours` of new readings (sensor, hour, readings, low, high) in
/// `write::INSERT_MEASUREMENTS` and [`WIDEN_HOURS`]: the rollup widened and the page index
/// counted up, each in (sensor, hour/day) order.
macro_rules! widen_hours {
    () => {
        concat!(
            ", rolled AS (
        INSERT INTO measurement_hours AS h (sensor_uuid, hour, exact, ",
            rollup_columns!(),
            ")
        SELECT sensor_uuid, hour, true, ",
            rollup_columns!(),
            " FROM hours ORDER BY 1, 2
        ON CONFLICT (sensor_uuid, hour) DO UPDATE SET ",
            widen_set!(),
            "
    ), days AS (
        INSERT INTO measurement_days AS d (sensor_uuid, day, readings)
        SELECT sensor_uuid, date_trunc('day', hour, 'UTC'), sum(readings)
        FROM hours GROUP BY 1, 2 ORDER BY 1, 2
        ON CONFLICT (sensor_uuid, day) DO UPDATE SET readings = d.readings + EXCLUDED.readings
    )"
        )
    };
}

/// The rollup rows of new hours, by a binary `COPY` ([`copy_new_hours`]).
const COPY_HOURS: &str = concat!(
    "COPY measurement_hours (sensor_uuid, hour, ",
    rollup_columns!(),
    ") FROM STDIN (FORMAT binary)"
);

/// The page index rows of new days, by a binary `COPY` ([`copy_new_hours`]).
const COPY_DAYS: &str =
    "COPY measurement_days (sensor_uuid, day, readings) FROM STDIN (FORMAT binary)";

/// The daily rollup rows of new days, by a binary `COPY` ([`copy_new_hours`]).
const COPY_DAY_VALUES: &str = concat!(
    "COPY measurement_day_values (sensor_uuid, day, ",
    rollup_columns!(),
    ", exact) FROM STDIN (FORMAT binary)"
);

/// Around the `COPY` of new hours whose days [`copy_new_hours`] writes itself: the daily
/// rollup's trigger leaves those days to it (`measurements/V9`).
const DAYS_WRITTEN: &str = "SET LOCAL sensor_pipeline.days_written = 'on'";
const DAYS_FROM_HOURS: &str = "SET LOCAL sensor_pipeline.days_written = 'off'";

/// Writes the rollup, daily rollup and page index rows of `hours`, in (sensor, hour) order, when
/// no day they fall in holds a stored reading: the work of [`WIDEN_HOURS`] and the daily
/// rollup's trigger by three binary `COPY`s. The days are those hours' alone, so they are
/// computed here and the trigger leaves them to this statement ([`DAYS_WRITTEN`]). A row another
/// transaction wrote meanwhile fails a `COPY` (a unique violation); the caller then rolls back
/// to its savepoint (which also undoes the setting) and upserts instead.
///
/// Why: where a sensor reads every few hours, an object holds about as many hours as readings.
/// `WIDEN_HOURS`' upsert of 100,000 new hours and 14,000 days (200 sensors reading every
/// 12,000 s) took 0.87 s of server time on an empty PostgreSQL 15 table, the `COPY`s 0.25 s
/// and 0.02 s; the daily rollup's trigger took 0.13 s more (0.21 s on TimescaleDB).
pub(super) async fn copy_new_hours(
    tx: &deadpool_postgres::Transaction<'_>,
    sorted: &[(&(uuid::Uuid, Micros), &Hour)],
) -> Result<(), tokio_postgres::Error> {
    use super::copy::copy_rows;
    if sorted.is_empty() {
        return Ok(());
    }
    tx.batch_execute(DAYS_WRITTEN).await?;
    copy_rows(tx, COPY_HOURS, sorted, |enc, ((u, hour), h)| {
        enc.row(10);
        encode_rolled(enc, u, *hour, h);
    })
    .await?;
    tx.batch_execute(DAYS_FROM_HOURS).await?;
    let day = |(u, hour): &(uuid::Uuid, Micros)| (*u, day_of(*hour));
    let days: Vec<(uuid::Uuid, Micros, Hour)> = sorted
        .chunk_by(|a, b| day(a.0) == day(b.0))
        .map(|same| {
            let (u, day) = day(same[0].0);
            let mut all = *same[0].1;
            for (_, h) in &same[1..] {
                all.absorb(**h);
            }
            (u, day, all)
        })
        .collect();
    copy_rows(tx, COPY_DAY_VALUES, &days, |enc, (u, day, d)| {
        enc.row(11);
        encode_rolled(enc, u, *day, d);
        enc.boolean(true);
    })
    .await?;
    copy_rows(tx, COPY_DAYS, &days, |enc, (u, day, d)| {
        enc.row(3);
        enc.uuid(u);
        enc.timestamptz(*day);
        enc.int8(d.readings);
    })
    .await
}

/// The sensor, the hour or day `at`, and the rollup's columns of `h`, as `COPY` fields.
fn encode_rolled(enc: &mut super::copy::CopyEncoder, u: &uuid::Uuid, at: Micros, h: &Hour) {
    enc.uuid(u);
    enc.timestamptz(at);
    enc.int8(h.readings);
    enc.float8(h.low);
    enc.float8(h.high);
    enc.float8(h.total);
    enc.timestamptz(h.first.0);
    enc.float8(h.first.1);
    enc.timestamptz(h.last.0);
    enc.float8(h.last.1);
}

/// The rollup and page index widened by new readings (`$1`–`$5`: sensors, hours, readings,
/// lows, highs), after `write::COPY_NEW`.
pub(super) const WIDEN_HOURS: &str = concat!(
    "WITH hours AS (SELECT * FROM ",
    unnest_hours!("$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8", "$9", "$10"),
    ")",
    widen_hours!(),
    "
    SELECT count(*) FROM hours"
);

/// The rollup after `write::replace_held` (`$1`–`$10`: the [`HourColumns`] of the readings
/// written; `$11`–`$13`: the low, high and total of the readings they replaced — as many: the keys
/// are the same, so the counts, the first and last instants and the page index stay as they are),
/// in (sensor, hour) order. An hour whose readings were all replaced is those written. Another
/// keeps exact bounds when the readings removed were all strictly within them (the extremes are
/// still there): its total is corrected by the difference, and its first and last value are
/// those written where the replaced readings include its first or last instant; else it is
/// returned, for [`OUTSIDE_HOURS`]. (An hour with no rollup row, which only a damaged rollup
/// lacks, gets one marked inexact.)
pub(super) const REPLACE_HOURS: &str = concat!(
    "
    WITH x AS (
        SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::bigint[], $4::float8[],
            $5::float8[], $6::float8[], $7::timestamptz[], $8::float8[], $9::timestamptz[],
            $10::float8[], $11::float8[], $12::float8[], $13::float8[])
            AS x(sensor_uuid, hour, ",
    rollup_columns!(),
    ", removed_low, removed_high, removed_total)
    ), rolled AS (
        INSERT INTO measurement_hours AS h (sensor_uuid, hour, exact, ",
    rollup_columns!(),
    ")
        SELECT sensor_uuid, hour, false, ",
    rollup_columns!(),
    " FROM x ORDER BY 1, 2
        ON CONFLICT (sensor_uuid, hour) DO UPDATE
        SET (low, high, total, first_value, last_value, exact) = (
            SELECT CASE WHEN h.readings = x.readings THEN x.low ELSE least(h.low, x.low) END,
                CASE WHEN h.readings = x.readings THEN x.high ELSE greatest(h.high, x.high) END,
                CASE WHEN h.readings = x.readings THEN x.total
                    ELSE h.total - x.removed_total + x.total END,
                CASE WHEN x.first_at = h.first_at THEN x.first_value ELSE h.first_value END,
                CASE WHEN x.last_at = h.last_at THEN x.last_value ELSE h.last_value END,
                h.readings = x.readings
                    OR (h.exact AND x.removed_low > h.low AND x.removed_high < h.high)
            FROM x WHERE x.sensor_uuid = h.sensor_uuid AND x.hour = h.hour)
        RETURNING h.sensor_uuid, h.hour, h.exact, h.xmin::text::bigint AS by
    )
    SELECT ARRAY(SELECT sensor_uuid FROM rolled WHERE NOT exact ORDER BY 1, hour),
           ARRAY(SELECT hour FROM rolled WHERE NOT exact ORDER BY sensor_uuid, 1),
           ARRAY(SELECT sensor_uuid FROM rolled ORDER BY 1, hour),
           ARRAY(SELECT hour FROM rolled ORDER BY sensor_uuid, 1),
           ARRAY(SELECT by FROM rolled ORDER BY sensor_uuid, hour)"
);
/// The rollup rows of the hours `write::replace_held` writes (`$1` sensors, `$2` hours), locked
/// in key order before [`REPLACE_HOURS`] changes them, with the transaction that wrote each last
/// (see [`Link`]).
///
/// [`Link`]: super::write::Link
pub(super) const HOURS_BEFORE: &str = "
    SELECT h.sensor_uuid, h.hour, h.xmin::text::bigint FROM measurement_hours AS h
    JOIN unnest($1::uuid[], $2::timestamptz[]) AS x(u, hour)
        ON h.sensor_uuid = x.u AND h.hour = x.hour
    ORDER BY 1, 2
    FOR UPDATE OF h";
/// Settles the hours the merge overwrote readings in (`$1`–`$10`: the [`HourColumns`] of the
/// readings it wrote there) where it wrote every reading the hour holds — a re-upload of the
/// same readings: the hour is what it wrote (the rollup row is locked by this transaction's
/// merge, so its count is exact). Returns the other hours, for [`EXACT_HOURS`].
/// (Recomputing a 100,000-reading re-upload's hours from the stored readings cost 142 ms of
/// server time.)
pub(super) const COVERED_HOURS: &str = settle_or_return!(
    "
        UPDATE measurement_hours AS h SET (",
    rollup_columns!(),
    ", exact) = (x.readings, x.low, x.high, x.total, x.first_at, x.first_value, x.last_at,
            x.last_value, true)
        FROM x
        WHERE h.sensor_uuid = x.sensor_uuid AND h.hour = x.hour AND h.readings = x.readings
"
);
/// Settles the hours `write::replace_held` left inexact from the readings outside what it wrote
/// there (`$1`–`$10`: the [`HourColumns`] of the readings written in each): when the hour holds no
/// other reading between the first and last instant written (its count is those outside plus
/// those written), it is the two parts together — an index range scan on either side instead of
/// the whole hour, whose replaced rows are dead entries the scan would visit too. Returns the
/// other hours, for [`EXACT_HOURS`].
pub(super) const OUTSIDE_HOURS: &str = settle_or_return!(
    "
        UPDATE measurement_hours AS h
        SET low = least(o.low, x.low), high = greatest(o.high, x.high),
            total = coalesce(o.total, 0) + x.total,
            first_at = least(o.first_at, x.first_at),
            first_value = CASE WHEN o.first_at < x.first_at THEN o.first_value
                ELSE x.first_value END,
            last_at = greatest(o.last_at, x.last_at),
            last_value = CASE WHEN o.last_at > x.last_at THEN o.last_value ELSE x.last_value END,
            exact = true
        FROM x CROSS JOIN LATERAL (",
    rollup_of!(
        "(
                SELECT m.ts, m.value FROM measurements AS m
                WHERE m.sensor_uuid = x.sensor_uuid AND m.ts >= x.hour AND m.ts < x.first_at
                UNION ALL
                SELECT m.ts, m.value FROM measurements AS m
                WHERE m.sensor_uuid = x.sensor_uuid AND m.ts > x.last_at
                    AND m.ts < x.hour + interval '1 hour'
            ) AS m"
    ),
    ") AS o
        WHERE h.sensor_uuid = x.sensor_uuid AND h.hour = x.hour
            AND h.readings = o.readings + x.readings
"
);
/// Recomputes the hours the merge overwrote readings in (`$1` sensors, `$2` hours; their rows
/// are locked by this transaction's merge, so every write to them before it has committed) from
/// the stored readings, an index range scan per hour (a join let the planner scan the whole
/// table: 350 ms per 100,000-row object at 600,000 stored rows, and growing).
pub(crate) const EXACT_HOURS: &str = concat!(
    "
    UPDATE measurement_hours AS h
    SET (",
    rollup_columns!(),
    ", exact) = (r.readings, r.low, r.high, r.total, r.first_at, r.first_value, r.last_at,
        r.last_value, true)
    FROM unnest($1::uuid[], $2::timestamptz[]) AS x(sensor_uuid, hour)
    CROSS JOIN LATERAL (",
    rollup_of!(
        "measurements AS m
        WHERE m.sensor_uuid = x.sensor_uuid
            AND m.ts >= x.hour AND m.ts < x.hour + interval '1 hour'"
    ),
    ") AS r
    WHERE h.sensor_uuid = x.sensor_uuid AND h.hour = x.hour AND r.readings > 0"
);
/// Sets the hours of `$1`–`$10` (an [`HourColumns`]) to what it says, exact: their readings
/// are known to be all the hour holds.
pub(crate) const SETTLE_HOURS: &str = concat!(
    "
    WITH x AS (SELECT * FROM ",
    unnest_hours!("$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8", "$9", "$10"),
    ")
    UPDATE measurement_hours AS h SET (",
    rollup_columns!(),
    ", exact) = (x.readings, x.low, x.high, x.total, x.first_at, x.first_value, x.last_at,
            x.last_value, true)
    FROM x WHERE h.sensor_uuid = x.sensor_uuid AND h.hour = x.hour"
);

/// The rows of hours (`$1` a sensor, `$2` its hours): hour, readings, and the transaction that
/// wrote the row last (`xmin`), which says whether held readings are all the hour holds.
pub(crate) const HOURS_AND_WRITERS: &str =
    "SELECT hour, readings, xmin::text::bigint FROM measurement_hours
     WHERE sensor_uuid = $1 AND hour = ANY($2)";

/// The inexact hours within spans (`$1` sensors, `$2` first and `$3` last instant of each), locked
/// for settling: sensor, hour, readings, and the transaction that wrote the row last (`xmin`).
/// Hours another transaction is writing are skipped (that writer's detection settles them); an
/// hour two spans share comes twice.
pub(crate) const INEXACT_HOURS_IN_SPANS: &str = "
    SELECT h.sensor_uuid, h.hour, h.readings, h.xmin::text::bigint
    FROM measurement_hours AS h
    JOIN unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(u, first, last)
        ON h.sensor_uuid = w.u AND h.hour >= date_trunc('hour', w.first, 'UTC')
            AND h.hour <= w.last
    WHERE NOT h.exact
    ORDER BY 1, 2
    FOR UPDATE OF h SKIP LOCKED";

/// Settles locked hours exact: those whose readings are `known` to what they say
/// ([`SETTLE_HOURS`]), the `unknown` ones (sensors, hours) from the stored readings
/// ([`EXACT_HOURS`]).
pub(crate) async fn settle(
    client: &impl tokio_postgres::GenericClient,
    known: &HourColumns,
    unknown: (&[uuid::Uuid], &[chrono::DateTime<chrono::Utc>]),
) -> Result<(), tokio_postgres::Error> {
    if !known.sensors.is_empty() {
        client.execute(SETTLE_HOURS, &known.params()).await?;
    }
    if !unknown.0.is_empty() {
        client
            .execute(EXACT_HOURS, &[&unknown.0, &unknown.1])
            .await?;
    }
    Ok(())
}

/// One sensor's readings in one hour, as the rollup keeps them: how many, the lowest and
/// highest value, their sum, and the first and last reading (instant in µs, value).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Hour {
    pub readings: i64,
    pub low: f64,
    pub high: f64,
    pub total: f64,
    pub first: (Micros, f64),
    pub last: (Micros, f64),
}

/// Hours as the rollup statements take them, a column each: sensors, hours, then the
/// [`Hour`]'s readings, low, high, total, first instant and value, last instant and value (the
/// rollup's columns).
#[derive(Default)]
pub(crate) struct HourColumns {
    pub sensors: Vec<uuid::Uuid>,
    pub hours: Vec<chrono::DateTime<chrono::Utc>>,
    readings: Vec<i64>,
    lows: Vec<f64>,
    highs: Vec<f64>,
    totals: Vec<f64>,
    first_ats: Vec<chrono::DateTime<chrono::Utc>>,
    firsts: Vec<f64>,
    last_ats: Vec<chrono::DateTime<chrono::Utc>>,
    lasts: Vec<f64>,
}

impl HourColumns {
    pub(crate) fn push(&mut self, sensor: uuid::Uuid, hour: Micros, h: &Hour) {
        self.sensors.push(sensor);
        self.hours.push(instant(hour));
        self.readings.push(h.readings);
        self.lows.push(h.low);
        self.highs.push(h.high);
        self.totals.push(h.total);
        self.first_ats.push(instant(h.first.0));
        self.firsts.push(h.first.1);
        self.last_ats.push(instant(h.last.0));
        self.lasts.push(h.last.1);
    }

    pub(super) fn of<'a>(
        hours: impl IntoIterator<Item = (&'a (uuid::Uuid, Micros), &'a Hour)>,
    ) -> Self {
        let mut columns = Self::default();
        for ((u, hour), h) in hours {
            columns.push(*u, *hour, h);
        }
        columns
    }

    /// The ten arrays of `row` from column `at` on.
    pub(super) fn from_row(row: &tokio_postgres::Row, at: usize) -> Self {
        Self {
            sensors: row.get(at),
            hours: row.get(at + 1),
            readings: row.get(at + 2),
            lows: row.get(at + 3),
            highs: row.get(at + 4),
            totals: row.get(at + 5),
            first_ats: row.get(at + 6),
            firsts: row.get(at + 7),
            last_ats: row.get(at + 8),
            lasts: row.get(at + 9),
        }
    }

    /// The ten columns, as statement parameters.
    pub(crate) fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 10] {
        [
            &self.sensors,
            &self.hours,
            &self.readings,
            &self.lows,
            &self.highs,
            &self.totals,
            &self.first_ats,
            &self.firsts,
            &self.last_ats,
            &self.lasts,
        ]
    }
}

impl Hour {
    /// The hour of one reading.
    pub(crate) fn of(at: Micros, value: f64) -> Hour {
        Hour {
            readings: 1,
            low: value,
            high: value,
            total: value,
            first: (at, value),
            last: (at, value),
        }
    }

    /// The hour of readings in time order (none: `None`).
    pub(crate) fn of_readings(readings: impl IntoIterator<Item = (Micros, f64)>) -> Option<Hour> {
        let mut readings = readings.into_iter();
        let (at, value) = readings.next()?;
        let mut hour = Hour::of(at, value);
        for (at, value) in readings {
            hour.add(at, value);
        }
        Some(hour)
    }

    /// One more reading.
    pub(super) fn add(&mut self, at: Micros, value: f64) {
        self.absorb(Hour::of(at, value));
    }

    /// Other readings of the same hour (at other instants).
    pub(super) fn absorb(&mut self, other: Hour) {
        self.readings += other.readings;
        self.low = self.low.min(other.low);
        self.high = self.high.max(other.high);
        self.total += other.total;
        if other.first.0 < self.first.0 {
            self.first = other.first;
        }
        if other.last.0 > self.last.0 {
            self.last = other.last;
        }
    }
}

/// Makes exact the hours the merge overwrote readings in, given what it wrote in each
/// (`written`): [`COVERED_HOURS`], then [`EXACT_HOURS`] for the rest.
pub(super) async fn settle_inexact(
    tx: &deadpool_postgres::Transaction<'_>,
    written: &HourColumns,
) -> Result<(), tokio_postgres::Error> {
    if written.sensors.is_empty() {
        return Ok(());
    }
    let covered = tx.prepare_cached(COVERED_HOURS).await?;
    let rest = tx.query(&covered, &written.params()).await?;
    recompute_hours(tx, &rest).await
}

/// [`EXACT_HOURS`] for the hours (rows of sensor and hour) a cheaper settling left.
pub(super) async fn recompute_hours(
    tx: &deadpool_postgres::Transaction<'_>,
    rest: &[tokio_postgres::Row],
) -> Result<(), tokio_postgres::Error> {
    if rest.is_empty() {
        return Ok(());
    }
    let inexact: Vec<uuid::Uuid> = rest.iter().map(|r| r.get(0)).collect();
    let hours: Vec<chrono::DateTime<chrono::Utc>> = rest.iter().map(|r| r.get(1)).collect();
    let exact = tx.prepare_cached(EXACT_HOURS).await?;
    tx.execute(&exact, &[&inexact, &hours]).await?;
    Ok(())
}

pub(crate) use {rollup_columns, unnest_hours, widen_hours, widen_set};
