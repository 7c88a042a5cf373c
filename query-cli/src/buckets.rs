//! Downsampled readings (`readings --every`, `plot --every`): one row per time bucket with its
//! count, mean, lowest, highest, first and last value, computed by PostgreSQL.
//!
//! Buckets shorter than a day restart at every midnight (UTC, or local with `--timezone`), so
//! their length must divide a day; days and weeks are calendar days (a local day is 23 to 25 hours
//! long across a DST change) counted from Monday 2000-01-03, so `1w` starts on Mondays.
//!
//! Buckets of an hour or more are built from the hourly rollup `measurement_hours`, which the
//! ingest merge keeps exact in the same transaction as the readings: a year of one sensor is
//! 8,760 rollup rows instead of 105,000 readings. An hour comes from the readings instead when
//! its rollup row cannot stand for it — not marked exact (a correction's detection has not
//! settled it yet), written by a worker older than the rollup's sums, cut by the range's ends,
//! or straddling two buckets (a time zone whose midnight is not on a UTC hour). Shorter buckets
//! come from the readings. The mean is the bucket's sum over its count; summed per hour first,
//! it can differ from `avg()` over the rows in the last bits, as any two summation orders do.

use std::fmt;

use chrono::{DateTime, FixedOffset, Offset, Utc};
use futures_util::{Stream, TryStreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::db::failed;
use crate::Failure;

/// A bucket length: a whole number of seconds, minutes, hours, days or weeks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Every {
    count: u32,
    unit: Unit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
}

const DAY_SECONDS: u64 = 86_400;

impl Every {
    fn seconds(self) -> u64 {
        let unit = match self.unit {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => DAY_SECONDS,
            Unit::Week => 7 * DAY_SECONDS,
        };
        u64::from(self.count) * unit
    }

    /// Whole calendar days (or weeks).
    fn in_days(self) -> bool {
        matches!(self.unit, Unit::Day | Unit::Week)
    }

    /// As PostgreSQL reads an interval.
    fn interval(self) -> String {
        match self.unit {
            Unit::Day | Unit::Week => format!("{} days", self.seconds() / DAY_SECONDS),
            _ => format!("{} seconds", self.seconds()),
        }
    }

    /// Whether whole rollup hours can make up its buckets (the zone permitting).
    fn whole_hours(self) -> bool {
        self.seconds().is_multiple_of(3_600)
    }
}

impl fmt::Display for Every {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.unit {
            Unit::Second => "s",
            Unit::Minute => "m",
            Unit::Hour => "h",
            Unit::Day => "d",
            Unit::Week => "w",
        };
        write!(f, "{}{unit}", self.count)
    }
}

/// The `--every` flag: `<N><unit>` with unit `s`, `m`, `h`, `d` or `w` (`5m`, `1h`, `1d`, `1w`).
pub fn every(text: &str) -> Result<Every, String> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (count, unit) = text.split_at(digits);
    let unit = match unit {
        "s" => Unit::Second,
        "m" => Unit::Minute,
        "h" => Unit::Hour,
        "d" => Unit::Day,
        "w" => Unit::Week,
        _ => {
            return Err(
                "is not a bucket length; accepted: a whole number and a unit, s, m, h, d or w \
                 (5m, 1h, 1d, 1w)"
                    .into(),
            )
        }
    };
    let count =
        match count.parse::<u32>() {
            Ok(0) => return Err("is not a bucket length: it must be at least 1".into()),
            Ok(n) if n <= 100_000 => n,
            _ => return Err(
                "is not a bucket length; accepted: a whole number from 1 to 100000 and a unit, \
                 s, m, h, d or w (5m, 1h, 1d, 1w)"
                    .into(),
            ),
        };
    let every = Every { count, unit };
    if !every.in_days() && !DAY_SECONDS.is_multiple_of(every.seconds()) {
        return Err(format!(
            "is not a bucket length: buckets shorter than a day restart at midnight, so they \
             must divide a day (e.g. {}), or be whole days",
            match unit {
                Unit::Hour => "1h, 2h, 3h, 4h, 6h, 8h or 12h",
                Unit::Minute => "1m, 5m, 10m, 15m, 20m, 30m",
                _ => "1s, 10s, 30s",
            }
        ));
    }
    Ok(every)
}

/// One bucket's aggregates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// When it starts, and the zone's offset from UTC then (seconds; 0 in UTC).
    pub start: DateTime<FixedOffset>,
    pub readings: i64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub first: f64,
    pub last: f64,
}

/// What to aggregate: one sensor's readings in `[start, end]` (both inclusive), in buckets of
/// `every`, aligned in `zone` (an IANA name; `UTC` by default).
pub struct Query<'a> {
    pub sensor: Uuid,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    pub every: Every,
    pub zone: &'a str,
    /// (offset, limit) in buckets, when a page was asked for.
    pub page: Option<(i64, i64)>,
}

/// The bucket a time `$t` falls in, as SQL over the parameters `$4` (the bucket length as an
/// interval) and `$5` (the zone).
fn bucket_of(every: Every, t: &str) -> String {
    if every.in_days() {
        format!(
            "(date_bin($4::text::interval, {t} AT TIME ZONE $5::text, \
             timestamp '2000-01-03') AT TIME ZONE $5::text)"
        )
    } else {
        format!("date_bin($4::text::interval, {t}, date_trunc('day', {t}, $5::text))")
    }
}

/// The statement: each bucket with its offset from UTC and its aggregates, in time order.
fn statement(every: Every) -> String {
    let bucket_ts = bucket_of(every, "ts");
    // Per part of a bucket (an hour from the rollup, or a reading): count, sum, low, high, and
    // the first and last reading.
    let parts = if every.whole_hours() {
        let bucket_hour = bucket_of(every, "hour");
        let bucket_hour_end = bucket_of(
            every,
            "(hour + interval '1 hour' - interval '1 microsecond')",
        );
        format!(
            "hours AS (
                SELECT hour, readings, low, high, total, first_at, first_value, last_at,
                       last_value,
                       exact AND total IS NOT NULL AND hour >= $2::timestamptz
                           AND hour + interval '1 hour' <= $3::timestamptz + interval '1 microsecond'
                           AND {bucket_hour} = {bucket_hour_end} AS whole
                FROM measurement_hours
                WHERE sensor_uuid = $1 AND hour >= date_trunc('hour', $2::timestamptz, 'UTC') AND hour <= $3::timestamptz
            ), parts AS (
                SELECT {bucket_hour} AS bucket, readings, total, low, high, first_at,
                       first_value, last_at, last_value
                FROM hours WHERE whole
                UNION ALL
                SELECT {bucket_ts}, 1, value, value, value, ts, value, ts, value
                FROM hours CROSS JOIN LATERAL (
                    SELECT ts, value FROM measurements
                    WHERE sensor_uuid = $1 AND ts >= greatest(hour, $2::timestamptz)
                        AND ts < hour + interval '1 hour' AND ts <= $3::timestamptz
                ) AS m
                WHERE NOT whole
            )"
        )
    } else {
        format!(
            "parts AS (
                SELECT {bucket_ts} AS bucket, 1 AS readings, value AS total, value AS low,
                       value AS high, ts AS first_at, value AS first_value, ts AS last_at,
                       value AS last_value
                FROM measurements WHERE sensor_uuid = $1 AND ts >= $2::timestamptz AND ts <= $3::timestamptz
            )"
        )
    };
    format!(
        "WITH {parts}
        SELECT bucket,
               extract(epoch FROM (bucket AT TIME ZONE $5::text) - (bucket AT TIME ZONE 'UTC'))::int,
               sum(readings)::bigint, sum(total) / sum(readings)::float8, min(low), max(high),
               (array_agg(first_value ORDER BY first_at))[1],
               (array_agg(last_value ORDER BY last_at DESC))[1]
        FROM parts GROUP BY bucket ORDER BY bucket
        LIMIT $6 OFFSET $7"
    )
}

/// The buckets of `query`, in time order, as they arrive. An unknown zone is a usage error.
pub async fn buckets<'c>(
    client: &'c Client,
    query: &Query<'_>,
) -> Result<impl Stream<Item = Result<Bucket, Failure>> + 'c, Failure> {
    if query.zone != "UTC" {
        // Checked before anything is printed (the statement would fail at its first row).
        client
            .query_one(
                "SELECT timestamptz 'epoch' AT TIME ZONE $1::text",
                &[&query.zone],
            )
            .await
            .map_err(|e| unknown_zone(e, query.zone))?;
    }
    let (offset, limit) = query.page.unwrap_or((0, i64::MAX));
    let interval = query.every.interval();
    let params: [&(dyn postgres_types::ToSql + Sync); 7] = [
        &query.sensor,
        &query.start,
        &query.end,
        &interval,
        &query.zone,
        &limit,
        &offset,
    ];
    let rows = client
        .query_raw(statement(query.every).as_str(), params)
        .await
        .map_err(failed("measurement"))?;
    Ok(rows
        .map_err(|e| failed("measurement")(e))
        .and_then(|row| async move { bucket(&row).map_err(|e| failed("measurement")(e)) }))
}

fn unknown_zone(e: tokio_postgres::Error, zone: &str) -> Failure {
    match e.code() {
        Some(&SqlState::INVALID_PARAMETER_VALUE) => Failure::Usage(format!(
            "unknown time zone {zone:?}; accepted: an IANA time zone name such as \
             Europe/Berlin or America/New_York, or UTC"
        )),
        _ => failed("measurement")(e),
    }
}

fn bucket(row: &tokio_postgres::Row) -> Result<Bucket, tokio_postgres::Error> {
    let start: DateTime<Utc> = row.try_get(0)?;
    let offset: i32 = row.try_get(1)?;
    let zone = FixedOffset::east_opt(offset).unwrap_or(Utc.fix());
    Ok(Bucket {
        start: start.with_timezone(&zone),
        readings: row.try_get(2)?,
        mean: row.try_get(3)?,
        min: row.try_get(4)?,
        max: row.try_get(5)?,
        first: row.try_get(6)?,
        last: row.try_get(7)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_lengths() {
        assert_eq!(every("5m").unwrap().interval(), "300 seconds");
        assert_eq!(every(" 1h ").unwrap().to_string(), "1h");
        assert_eq!(every("2d").unwrap().interval(), "2 days");
        assert_eq!(every("1w").unwrap().interval(), "7 days");
        assert!(every("1h").unwrap().whole_hours());
        assert!(every("1d").unwrap().whole_hours());
        assert!(!every("30m").unwrap().whole_hours());
        assert_eq!(
            every("7h").unwrap_err(),
            "is not a bucket length: buckets shorter than a day restart at midnight, so they \
             must divide a day (e.g. 1h, 2h, 3h, 4h, 6h, 8h or 12h), or be whole days"
        );
        assert_eq!(
            every("0m").unwrap_err(),
            "is not a bucket length: it must be at least 1"
        );
        for bad in ["", "h", "1", "1y", "-1h", "1.5h", "1 h", "100001d"] {
            assert!(every(bad).is_err(), "{bad:?}");
        }
    }
}
