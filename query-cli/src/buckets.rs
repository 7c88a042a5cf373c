//! Downsampled readings (`readings --every`, `plot --every`): one row per time bucket with its
//! count, mean, lowest, highest, first and last value.
//!
//! Buckets shorter than a day restart at every midnight (UTC, or local with `--timezone`), so
//! their length must divide a day; days and weeks are calendar days (a local day is 23 to 25 hours
//! long across a DST change) counted from Monday 2000-01-03, so `1w` starts on Mondays.
//!
//! Buckets of whole hours are built from the hourly rollup `measurement_hours`, which the
//! ingest merge keeps exact in the same transaction as the readings: a year of one sensor is
//! 8,760 rollup rows instead of 105,000 readings. An hour comes from the readings instead when
//! its rollup row cannot stand for it — not marked exact (a correction's detection has not
//! settled it yet), written by a worker older than the rollup's sums, cut by the range's ends,
//! or straddling two buckets (a time zone whose midnight is not on a UTC hour). Shorter buckets
//! come from the readings. The mean is the bucket's sum over its count; summed per hour first,
//! it can differ from `avg()` over the rows in the last bits, as any two summation orders do.
//!
//! PostgreSQL sends the parts — rollup hours, and readings where an hour is not whole — in time
//! order, a page of hours at a time, and they are summed into buckets here as they arrive
//! ([`buckets`]). Measured with `bench-query` (10 M readings stored): the same aggregates by
//! `GROUP BY` over the rollup took 330 ms (a sort per bucket for its first and last value, and a
//! query the planner compiled); a `GROUP BY` over the raw rows 106 ms for a year of 5-minute
//! readings in hours.

use std::collections::VecDeque;
use std::fmt;

use chrono::{DateTime, FixedOffset, Offset, Utc};
use futures_util::{Stream, StreamExt, TryStreamExt};
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
const HOUR: i64 = sensor_pipeline::time::HOUR_MICROS;

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

    /// The length in microseconds (a calendar day counted as 24 hours).
    pub fn micros(self) -> i64 {
        self.seconds() as i64 * 1_000_000
    }

    /// Whole calendar days (or weeks).
    fn in_days(self) -> bool {
        matches!(self.unit, Unit::Day | Unit::Week)
    }

    /// As PostgreSQL reads an interval.
    pub fn interval(self) -> String {
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

/// The bucket a time `{t}` falls in, in a zone, as SQL over the placeholders `(length, zone)`
/// (the bucket length as an interval, the zone's name): days binned on the local calendar from a
/// Monday, shorter lengths from the local midnight.
fn bucket_of(every: Every, (length, zone): (&str, &str), t: &str) -> String {
    match every.in_days() {
        true => format!(
            "(date_bin({length}::text::interval, {t} AT TIME ZONE {zone}::text, \
             timestamp '2000-01-03') AT TIME ZONE {zone}::text)"
        ),
        false => {
            format!("date_bin({length}::text::interval, {t}, date_trunc('day', {t}, {zone}::text))")
        }
    }
}

/// The zone's offset from UTC at bucket start `b` (SQL), in seconds.
fn offset(zone: &str, b: &str) -> String {
    format!("date_part('epoch', ({b} AT TIME ZONE {zone}::text) - ({b} AT TIME ZONE 'UTC'))")
}

/// The zone's bucket and offset as extra columns over the placeholders `z` (length, zone) of
/// instant `t`, or nothing in UTC.
fn zoned(every: Every, z: Option<(&str, &str)>, t: &str) -> String {
    match z {
        None => String::new(),
        Some(z) => {
            let b = bucket_of(every, z, t);
            format!(", {b}, {}", offset(z.1, &b))
        }
    }
}

/// The readings of one sensor (`$1`) in `[$2, $3]`, in time order, each as a part: instant,
/// count (1), and its value as sum, low, high, first and last; in a zone (`$4` length, `$5`
/// zone), also its bucket and the zone's offset then.
fn readings_statement(every: Every, utc: bool) -> String {
    format!(
        "SELECT ts, 1::bigint, value, value, value, value, value{}
         FROM measurements WHERE sensor_uuid = $1 AND ts >= $2 AND ts <= $3
         ORDER BY ts",
        zoned(every, (!utc).then_some(("$4", "$5")), "ts")
    )
}

/// [`readings_statement`] for several ranges (`$2`, `$3`: their first and last instants, in
/// time order and apart): the hours the rollup does not stand for.
fn hours_readings_statement(every: Every, utc: bool) -> String {
    format!(
        "SELECT m.ts, 1::bigint, m.value, m.value, m.value, m.value, m.value{}
         FROM unnest($2::timestamptz[], $3::timestamptz[]) AS r(a, b)
         CROSS JOIN LATERAL (
             SELECT ts, value FROM measurements
             WHERE sensor_uuid = $1 AND ts >= r.a AND ts <= r.b
         ) AS m
         ORDER BY m.ts",
        zoned(every, (!utc).then_some(("$4", "$5")), "m.ts")
    )
}

/// Rollup hours read at a time: bounds the memory for any range (a page of hours is held while
/// the readings of those it does not stand for are read).
const HOURS_PAGE: i64 = 20_000;

/// A page of the rollup's hours of one sensor (`$1`) from `$2` to `$3`, in time order: hour,
/// count, sum, low, high, first and last value, and whether the row stands for the hour (exact,
/// with its sums; in a zone, `$4` length and `$5` zone, also within one bucket), then in a zone
/// its bucket and the zone's offset then.
fn hours_statement(every: Every, utc: bool) -> String {
    let z = (!utc).then_some(("$4", "$5"));
    // An hour straddles two buckets only in a zone whose midnight is not on a UTC hour.
    let within = match z {
        None => String::new(),
        Some(z) => format!(
            " AND {} = {}",
            bucket_of(every, z, "hour"),
            bucket_of(
                every,
                z,
                "(hour + interval '1 hour' - interval '1 microsecond')"
            )
        ),
    };
    format!(
        "SELECT hour, readings, total, low, high, first_value, last_value,
                exact AND total IS NOT NULL{within}{}
         FROM measurement_hours
         WHERE sensor_uuid = $1 AND hour >= $2 AND hour <= $3
         ORDER BY hour LIMIT {HOURS_PAGE}",
        zoned(every, z, "hour")
    )
}

/// The buckets of `query`, in time order, as they arrive. An unknown zone is a usage error.
///
/// Consecutive parts of a bucket — hours of the rollup where they stand for their hour, readings
/// elsewhere, in time order — are summed up as they arrive: no `GROUP BY` in SQL, whose per-group
/// sorts for the first and last value cost PostgreSQL 25 ms for a year of hours, more than all
/// the rest. In UTC the bucket is computed here from each part's instant; in a zone, by
/// PostgreSQL, which knows the zone's rules.
pub async fn buckets<'c>(
    client: &'c Client,
    query: &Query<'_>,
) -> Result<impl Stream<Item = Result<Bucket, Failure>> + 'c, Failure> {
    let utc = query.zone.eq_ignore_ascii_case("UTC");
    if !utc {
        // Checked before anything is printed (the statement would fail at its first row).
        client
            .query_one(
                "SELECT timestamptz 'epoch' AT TIME ZONE $1::text",
                &[&query.zone],
            )
            .await
            .map_err(|e| unknown_zone(e, query.zone))?;
    }
    let mut parts = Parts {
        client,
        every: query.every,
        zone: (!utc).then(|| (query.every.interval(), query.zone.to_string())),
        sensor: query.sensor,
        start: query.start,
        end: query.end,
        rows: None,
        next_hour: (query.every.whole_hours())
            .then(|| query.start.timestamp_micros().div_euclid(HOUR) * HOUR),
        queue: VecDeque::new(),
    };
    if !query.every.whole_hours() {
        let statement = readings_statement(query.every, utc);
        let mut params: Vec<&(dyn postgres_types::ToSql + Sync)> =
            vec![&query.sensor, &query.start, &query.end];
        let zone = parts.zone.clone();
        if let Some((length, zone)) = &zone {
            params.extend([length as &(dyn postgres_types::ToSql + Sync), zone]);
        }
        let rows = client
            .query_raw(statement.as_str(), params.iter().copied())
            .await
            .map_err(failed("measurement"))?;
        parts.rows = Some(Box::pin(rows));
    }
    let (skip, take) = query.page.unwrap_or((0, i64::MAX));
    // (the parts, until they end; the bucket being summed up)
    let buckets = futures_util::stream::try_unfold(
        (Some(parts), None::<Bucket>),
        move |(parts, mut open)| async move {
            let Some(mut parts) = parts else {
                return Ok(None);
            };
            while let Some(part) = parts.next().await? {
                match &mut open {
                    Some(b) if b.start == part.start => b.absorb(&part),
                    _ => {
                        if let Some(done) = open.replace(part) {
                            return Ok(Some((done, (Some(parts), open))));
                        }
                    }
                }
            }
            // The parts are not asked for more past their end.
            Ok(open.take().map(|done| (done, (None, None))))
        },
    );
    Ok(buckets
        .map_ok(Bucket::finish)
        .skip(skip.max(0) as usize)
        .take(take.max(0) as usize))
}

/// The parts of the buckets of a query, in time order.
struct Parts<'c> {
    client: &'c Client,
    every: Every,
    /// In a zone: the bucket length as PostgreSQL reads it, and the zone.
    zone: Option<(String, String)>,
    sensor: Uuid,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    /// Buckets shorter than an hour: the readings, streamed.
    rows: Option<std::pin::Pin<Box<tokio_postgres::RowStream>>>,
    /// Buckets of whole hours: the next rollup hour to read (µs), until they are all read.
    next_hour: Option<i64>,
    queue: VecDeque<Bucket>,
}

impl Parts<'_> {
    fn stride(&self) -> Option<i64> {
        self.zone.is_none().then(|| self.every.micros())
    }

    async fn next(&mut self) -> Result<Option<Bucket>, Failure> {
        if let Some(rows) = &mut self.rows {
            let Some(row) = rows.try_next().await.map_err(failed("measurement"))? else {
                self.rows = None;
                return Ok(None);
            };
            return part(&row, self.stride(), 7)
                .map(Some)
                .map_err(failed("measurement"));
        }
        while self.queue.is_empty() {
            let Some(from) = self.next_hour else {
                return Ok(None);
            };
            self.read_hours(from).await?;
        }
        Ok(self.queue.pop_front())
    }

    /// Reads a page of rollup hours from `from` on, and the readings of those that do not stand
    /// for their hour, into the queue.
    async fn read_hours(&mut self, from: i64) -> Result<(), Failure> {
        let utc = self.zone.is_none();
        let at = |us: i64| DateTime::from_timestamp_micros(us).unwrap_or(DateTime::<Utc>::MAX_UTC);
        let from = at(from);
        let mut params: Vec<&(dyn postgres_types::ToSql + Sync)> =
            vec![&self.sensor, &from, &self.end];
        if let Some((length, zone)) = &self.zone {
            params.extend([length as &(dyn postgres_types::ToSql + Sync), zone]);
        }
        let hours = self
            .client
            .query(hours_statement(self.every, utc).as_str(), &params)
            .await
            .map_err(failed("measurement"))?;
        self.next_hour = match hours.last() {
            Some(last) if hours.len() as i64 == HOURS_PAGE => {
                Some(last.get::<_, DateTime<Utc>>(0).timestamp_micros() + HOUR)
            }
            _ => None,
        };
        let (start, end) = (self.start.timestamp_micros(), self.end.timestamp_micros());
        // Each hour: whether its row stands for it, else the range of its readings to read.
        let whole: Vec<bool> = hours
            .iter()
            .map(|h| {
                let hour = h.get::<_, DateTime<Utc>>(0).timestamp_micros();
                h.get::<_, bool>(7) && hour >= start && hour + HOUR - 1 <= end
            })
            .collect();
        let (mut firsts, mut lasts) = (Vec::new(), Vec::new());
        for (h, _) in hours.iter().zip(&whole).filter(|(_, w)| !**w) {
            let hour = h.get::<_, DateTime<Utc>>(0).timestamp_micros();
            firsts.push(at(hour.max(start)));
            lasts.push(at((hour + HOUR - 1).min(end)));
        }
        let mut readings = Vec::new();
        if !firsts.is_empty() {
            let mut params: Vec<&(dyn postgres_types::ToSql + Sync)> =
                vec![&self.sensor, &firsts, &lasts];
            if let Some((length, zone)) = &self.zone {
                params.extend([length as &(dyn postgres_types::ToSql + Sync), zone]);
            }
            // The planner cannot tell how many readings the ranges hold, guesses millions and
            // would compile the query (JIT: 400 ms for what runs in 1); sent with it, in one
            // round trip.
            let statement = hours_readings_statement(self.every, utc);
            let (jit_off, rows) = tokio::join!(
                self.client.batch_execute("SET jit = off"),
                self.client.query(statement.as_str(), &params)
            );
            jit_off.map_err(failed("measurement"))?;
            readings = rows.map_err(failed("measurement"))?;
        }
        let stride = self.stride();
        let mut readings = readings.iter().peekable();
        for (h, whole) in hours.iter().zip(whole) {
            if whole {
                self.queue
                    .push_back(part(h, stride, 8).map_err(failed("measurement"))?);
                continue;
            }
            let after = h.get::<_, DateTime<Utc>>(0).timestamp_micros() + HOUR;
            while let Some(r) =
                readings.next_if(|r| r.get::<_, DateTime<Utc>>(0).timestamp_micros() < after)
            {
                self.queue
                    .push_back(part(r, stride, 7).map_err(failed("measurement"))?);
            }
        }
        Ok(())
    }
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

/// One part of a bucket, as a [`Bucket`] whose `mean` holds the sum until [`Bucket::finish`];
/// in UTC (`stride`: the bucket length in µs) its bucket from its instant, else from columns
/// `zoned` (bucket) and `zoned + 1` (offset).
fn part(
    row: &tokio_postgres::Row,
    stride: Option<i64>,
    zoned: usize,
) -> Result<Bucket, tokio_postgres::Error> {
    let start = match stride {
        Some(stride) => {
            let at = row.try_get::<_, DateTime<Utc>>(0)?.timestamp_micros();
            let start = ORIGIN + (at - ORIGIN).div_euclid(stride) * stride;
            DateTime::from_timestamp_micros(start).expect("a stored instant's bucket")
        }
        None => row.try_get(zoned)?,
    };
    let offset: f64 = match stride {
        Some(_) => 0.0,
        None => row.try_get(zoned + 1)?,
    };
    let zone = FixedOffset::east_opt(offset as i32).unwrap_or(Utc.fix());
    Ok(Bucket {
        start: start.with_timezone(&zone),
        readings: row.try_get(1)?,
        mean: row.try_get(2)?,
        min: row.try_get(3)?,
        max: row.try_get(4)?,
        first: row.try_get(5)?,
        last: row.try_get(6)?,
    })
}

/// Where buckets are counted from: Monday 2000-01-03 00:00 UTC, in µs since the epoch.
const ORIGIN: i64 = 946_857_600_000_000;

impl Bucket {
    /// The next part of the same bucket, later in time.
    fn absorb(&mut self, later: &Bucket) {
        self.readings += later.readings;
        self.mean += later.mean;
        self.min = self.min.min(later.min);
        self.max = self.max.max(later.max);
        self.last = later.last;
    }

    /// The mean from the sum.
    fn finish(mut self) -> Bucket {
        self.mean /= self.readings as f64;
        self
    }
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
