//! Downsampled readings (`readings --every`, `plot --every`): one row per time bucket with its
//! count, mean, lowest, highest, first and last value.
//!
//! Buckets shorter than a day restart at every midnight (UTC, or local with `--timezone`), so
//! their length must divide a day; days and weeks are calendar days (a local day is 23 to 25 hours
//! long across a DST change) counted from Monday 2000-01-03, so `1w` starts on Mondays.
//!
//! Buckets of whole hours are built from the hourly rollup `measurement_hours`, and whole UTC
//! days and weeks from the daily one `measurement_day_values`, which ingestion keeps exact in
//! the same transaction as the readings: a year of one sensor is 8,760 hours instead of 105,000
//! readings, ten years 3,650 days. A rollup row is read finer — a day from its hours, an hour
//! from its readings — where it cannot stand for its span: not marked exact (a correction's
//! detection has not settled it yet), written by a worker older than the rollup's sums, holding
//! readings outside the range, or (an hour) straddling two buckets in a time zone whose midnight
//! is not on a UTC hour. Shorter buckets come from the readings. The mean is the bucket's sum over
//! its count; summed per hour first, it can differ from `avg()` over the rows in the last bits,
//! as any two summation orders do.
//!
//! PostgreSQL sends the parts — rollup rows, and finer parts where a row does not stand — in time
//! order, and they are summed into buckets here as they arrive ([`buckets`]): the few finer
//! parts first, then the rollup rows streamed, in one round trip. Hours that do not stand take a
//! second one for their readings, one statement per run of such hours with the run's span in
//! constants: on a TimescaleDB hypertable only those chunks are planned. (One statement bounded
//! by the window planned every chunk of it, although it ran for a millisecond: `--every 1d` over
//! ten years of 7-day chunks took 120 ms, now 24 ms.) Measured with `bench-query`
//! (10 M readings stored, end to end with the process start): a year of 5-minute readings in
//! hours 16 ms, ten years in days 12 ms (a `GROUP BY` over the raw rows: 119 and 870 ms). Before,
//! the rows came in pages collected whole and ten years were read as 87,600 hours: 24 and 139 ms;
//! a `GROUP BY` over the rollup cost 330 ms (a sort per bucket for its first and last value).

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;

use chrono::{DateTime, FixedOffset, Offset, Utc};
use futures_util::{Stream, TryStreamExt};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Row};
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

/// The statements of one sensor's (`$1`) buckets in the query's range `[$2, $3]`, within the
/// window `[$4, $5]` (in a zone, `$6` the bucket length and `$7` the zone).
///
/// Buckets shorter than an hour are made of readings (all coarse). Buckets of whole hours are
/// made of rollup hours where a row stands for its hour, and of that hour's readings where it
/// does not; whole days in UTC, of daily rollup rows where they stand, and of hours (or
/// readings) where not. A rollup row stands for its span when it is exact, has its sums, holds
/// no reading outside the range (its first and last reading are within it: a row cut by the
/// range's ends may still stand) and, in a zone, lies within one bucket (an hour straddles two
/// only in a zone whose midnight is not on a UTC hour). Windows start on a UTC hour (or day).
fn statements(every: Every, utc: bool) -> (String, Option<Fine>) {
    let z = (!utc).then_some(("$6", "$7"));
    // Whether row `r` of a rollup stands for its span, from `r.{span}` to `{end}`.
    let stands = |r: &str, span: &str, end: &str| {
        let within = match z {
            None => String::new(),
            Some(z) => format!(
                " AND {} = {}",
                bucket_of(every, z, &format!("{r}.{span}")),
                bucket_of(every, z, &format!("({end} - interval '1 microsecond')"))
            ),
        };
        format!(
            "({r}.exact AND {r}.total IS NOT NULL AND {r}.first_at >= $2 AND {r}.last_at <= $3\
             {within}) IS TRUE"
        )
    };
    // A rollup row `r` as a part, with whether it stands (`stands`: SQL).
    let rollup = |r: &str, span: &str, stands: &str| {
        format!(
            "SELECT {r}.{span}, {r}.readings, {r}.total, {r}.low, {r}.high, {r}.first_value, \
             {r}.last_value, {stands}{}",
            zoned(every, z, &format!("{r}.{span}"))
        )
    };
    let readings = format!(
        "SELECT m.ts, 1::bigint, m.value, m.value, m.value, m.value, m.value, true{}",
        zoned(every, z, "m.ts")
    );
    if !every.whole_hours() {
        let coarse = format!(
            "{readings} FROM measurements AS m
             WHERE m.sensor_uuid = $1 AND m.ts >= $4 AND m.ts <= $5 ORDER BY m.ts"
        );
        return (coarse, None);
    }
    // The readings of the hours in the array `$6` (in a zone `$8`) within the range, each hour
    // apart (`OFFSET 0`: joined, the planner scanned all the sensor's readings for what are
    // usually a few). `[$4, $5]` is here the span of those hours: constants, so that on a
    // TimescaleDB hypertable only its chunks are planned (with each hour's bounds alone, every
    // chunk of the table was: 100 ms a query at ten years of 7-day chunks).
    let hour_readings = format!(
        "{readings} FROM unnest(${}::timestamptz[]) AS h(hour) CROSS JOIN LATERAL (
             SELECT ts, value FROM measurements
             WHERE sensor_uuid = $1 AND ts >= greatest(h.hour, $2)
                 AND ts <= least(h.hour + interval '1 hour' - interval '1 microsecond', $3)
                 AND ts >= $4 AND ts <= $5
             OFFSET 0
         ) AS m
         ORDER BY 1",
        if utc { 6 } else { 8 }
    );
    let hour_stands = stands("h", "hour", "h.hour + interval '1 hour'");
    let hours = "measurement_hours AS h WHERE h.sensor_uuid = $1 AND h.hour >= $4 AND h.hour <= $5";
    // The coarse rows are all the rows of the window, those that do not stand skipped here: so
    // PostgreSQL sends them as it walks the index (the `LIMIT`, a window's most, says so; with
    // the condition in SQL it collected them all and sorted them before sending the first).
    if !(utc && every.in_days()) {
        let coarse = format!(
            "{} FROM {hours} ORDER BY h.hour LIMIT {WINDOW}",
            rollup("h", "hour", &hour_stands)
        );
        let rollup = format!(
            "{} FROM {hours} AND NOT {hour_stands} ORDER BY h.hour",
            rollup("h", "hour", "false")
        );
        return (
            coarse,
            Some(Fine {
                rollup,
                readings: hour_readings,
            }),
        );
    }
    // Days are 24 hours from UTC midnight.
    let days =
        "measurement_day_values AS d WHERE d.sensor_uuid = $1 AND d.day >= $4 AND d.day <= $5";
    let day_stands = stands("d", "day", "d.day + interval '24 hours'");
    let coarse = format!(
        "{} FROM {days} ORDER BY d.day LIMIT {WINDOW}",
        rollup("d", "day", &day_stands)
    );
    let rollup = format!(
        "{} FROM (SELECT d.day FROM {days} AND NOT {day_stands}) AS d
         JOIN measurement_hours AS h ON h.sensor_uuid = $1
             AND h.hour >= d.day AND h.hour < d.day + interval '24 hours'
         ORDER BY h.hour",
        rollup("h", "hour", &hour_stands)
    );
    (
        coarse,
        Some(Fine {
            rollup,
            readings: hour_readings,
        }),
    )
}

/// The fine parts of a window, in two steps: the rollup rows finer than the coarse ones that do
/// not stand, each with whether it stands itself (no reading is read); then, for the hours that
/// do not, their readings.
struct Fine {
    rollup: String,
    readings: String,
}

/// Hours whose readings are read by one statement: runs of hours that do not stand, split where
/// a day passes without one. At most this many such statements are sent; past that, one reads
/// all the window's hours that do not stand.
const RUNS: usize = 16;

/// A run's statement parameters: its first and last instant, and its hours.
struct Run {
    span: [DateTime<Utc>; 2],
    hours: Vec<DateTime<Utc>>,
}

/// The runs of `hours` (sorted, µs).
fn runs(hours: &[i64]) -> Vec<&[i64]> {
    let mut runs = Vec::new();
    let mut from = 0;
    for i in 1..=hours.len() {
        if i == hours.len() || hours[i] - hours[i - 1] > DAY {
            runs.push(&hours[from..i]);
            from = i;
        }
    }
    if runs.len() > RUNS {
        return vec![hours];
    }
    runs
}

/// The hours (or days) read at once: the fine parts of a window are held while its coarse ones
/// stream, so this bounds the memory for any range.
const WINDOW: i64 = 20_000;

/// The buckets of `query`, in time order, as they arrive. An unknown zone is a usage error.
///
/// PostgreSQL sends the parts of the buckets in time order ([`statements`]) and consecutive
/// parts of a bucket are summed up here as they arrive: no `GROUP BY` in SQL, whose per-group
/// sorts for the first and last value cost PostgreSQL 25 ms for a year of hours, more than all
/// the rest. In UTC the bucket is computed here from each part's instant; in a zone, by
/// PostgreSQL, which knows the zone's rules.
pub async fn buckets<'c>(client: &'c Client, query: &Query<'_>) -> Result<Buckets<'c>, Failure> {
    let utc = query.zone.eq_ignore_ascii_case("UTC");
    if !utc {
        // Checked before anything is printed (the statement would fail at its first row).
        client
            .query_typed(
                "SELECT timestamptz 'epoch' AT TIME ZONE $1::text",
                &[(&query.zone, Type::TEXT)],
            )
            .await
            .map_err(|e| unknown_zone(e, query.zone))?;
    }
    // The rows of a level start on its span: (span, window) in µs.
    let (span, window) = match (query.every.whole_hours(), utc && query.every.in_days()) {
        (false, _) => (1, i64::MAX),
        (true, false) => (HOUR, WINDOW * HOUR),
        (true, true) => (DAY, WINDOW * DAY),
    };
    let (coarse, fine) = statements(query.every, utc);
    let parts = Parts {
        client,
        coarse,
        fine,
        sensor: query.sensor,
        start: query.start,
        end: query.end,
        zone: (!utc).then(|| (query.every.interval(), query.zone.to_string())),
        window,
        next_window: Some(query.start.timestamp_micros().div_euclid(span) * span),
        stream: None,
        held: None,
        fine_parts: VecDeque::new(),
    };
    let (skip, take) = query.page.unwrap_or((0, i64::MAX));
    Ok(Buckets {
        parts,
        stride: utc.then(|| query.every.micros()),
        open: None,
        ended: false,
        skip: skip.max(0),
        left: take.max(0),
    })
}

/// The buckets of a query ([`buckets`]), read with [`Buckets::next`].
pub struct Buckets<'c> {
    parts: Parts<'c>,
    /// In UTC, the bucket length in µs.
    stride: Option<i64>,
    /// The bucket being summed up.
    open: Option<Bucket>,
    /// Whether the parts have ended.
    ended: bool,
    /// Buckets still to skip, and to pass on (a page).
    skip: i64,
    left: i64,
}

impl Buckets<'_> {
    /// The next bucket, in time order.
    pub async fn next(&mut self) -> Result<Option<Bucket>, Failure> {
        while self.left > 0 {
            let Some(bucket) = self.next_whole().await? else {
                return Ok(None);
            };
            if self.skip > 0 {
                self.skip -= 1;
                continue;
            }
            self.left -= 1;
            return Ok(Some(bucket.finish()));
        }
        Ok(None)
    }

    /// Consecutive parts of a bucket summed up; the parts are not asked for more past their end.
    async fn next_whole(&mut self) -> Result<Option<Bucket>, Failure> {
        if self.ended {
            return Ok(self.open.take());
        }
        while let Some(row) = self.parts.next().await? {
            let part = part(&row, self.stride).map_err(failed("measurement"))?;
            match &mut self.open {
                Some(b) if b.start == part.start => b.absorb(&part),
                _ => {
                    if let Some(done) = self.open.replace(part) {
                        return Ok(Some(done));
                    }
                }
            }
        }
        self.ended = true;
        Ok(self.open.take())
    }

    /// All the (remaining) buckets.
    pub async fn all(mut self) -> Result<Vec<Bucket>, Failure> {
        let mut all = Vec::new();
        while let Some(b) = self.next().await? {
            all.push(b);
        }
        Ok(all)
    }
}

const HOUR: i64 = sensor_pipeline::time::HOUR_MICROS;
const DAY: i64 = sensor_pipeline::time::DAY_MICROS;

/// The parts of the buckets of a query, in time order: window after window, the fine parts
/// (held) merged into the coarse ones (streamed).
struct Parts<'c> {
    client: &'c Client,
    coarse: String,
    fine: Option<Fine>,
    sensor: Uuid,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    /// In a zone: the bucket length as PostgreSQL reads it, and the zone.
    zone: Option<(String, String)>,
    window: i64,
    /// Where the next window starts (µs), until the range is read.
    next_window: Option<i64>,
    /// The window's coarse parts, until they end.
    stream: Option<Coarse<'c>>,
    /// The coarse part read and not yet passed on.
    held: Option<Row>,
    fine_parts: VecDeque<Row>,
}

/// A window's coarse parts: streamed as they arrive, or (when the window's fine parts needed a
/// second round trip, whose answer comes after them) read first and held.
type Coarse<'c> = Pin<Box<dyn Stream<Item = Result<Row, tokio_postgres::Error>> + Send + 'c>>;

/// Whether a part stands for its span (column 7).
fn stands(row: &Row) -> Result<bool, Failure> {
    row.try_get(7).map_err(failed("measurement"))
}

fn instant(row: &Row) -> Result<i64, Failure> {
    Ok(row
        .try_get::<_, DateTime<Utc>>(0)
        .map_err(failed("measurement"))?
        .timestamp_micros())
}

impl Parts<'_> {
    async fn next(&mut self) -> Result<Option<Row>, Failure> {
        loop {
            if self.held.is_none() {
                if let Some(stream) = &mut self.stream {
                    // (rows that do not stand are among the fine parts)
                    loop {
                        match stream.try_next().await.map_err(failed("measurement"))? {
                            Some(row) if !stands(&row)? => continue,
                            Some(row) => self.held = Some(row),
                            None => self.stream = None,
                        }
                        break;
                    }
                }
            }
            let fine_first = match (self.fine_parts.front(), &self.held) {
                (Some(f), Some(c)) => instant(f)? < instant(c)?,
                (Some(_), None) => self.stream.is_none(),
                (None, Some(_)) => false,
                (None, None) => {
                    if self.stream.is_none() && !self.open_window().await? {
                        return Ok(None);
                    }
                    continue;
                }
            };
            return Ok(match fine_first {
                true => self.fine_parts.pop_front(),
                false => self.held.take(),
            });
        }
    }

    /// Sends the next window's statements: reads its fine parts and starts streaming its coarse
    /// ones. False when the range is read.
    async fn open_window(&mut self) -> Result<bool, Failure> {
        let end = self.end.timestamp_micros();
        let Some(from) = self.next_window.filter(|from| *from <= end) else {
            return Ok(false);
        };
        let to = from.saturating_add(self.window - 1).min(end);
        self.next_window = to.checked_add(1);
        let at = |us: i64| DateTime::from_timestamp_micros(us).unwrap_or(DateTime::<Utc>::MAX_UTC);
        let (from, to) = (at(from), at(to));
        let mut params: Vec<(&(dyn postgres_types::ToSql + Sync), Type)> = vec![
            (&self.sensor, Type::UUID),
            (&self.start, Type::TIMESTAMPTZ),
            (&self.end, Type::TIMESTAMPTZ),
            (&from, Type::TIMESTAMPTZ),
            (&to, Type::TIMESTAMPTZ),
        ];
        if let Some((length, zone)) = &self.zone {
            params.extend([(length as _, Type::TEXT), (zone as _, Type::TEXT)]);
        }
        // All in one round trip. The planner cannot tell how many readings the hours that do
        // not stand hold, guesses millions and would compile the query (JIT: 400 ms for what
        // runs in 1).
        let setup = self.client.batch_execute("SET jit = off");
        let fine = async {
            match &self.fine {
                Some(fine) => self.client.query_typed(&fine.rollup, &params).await,
                None => Ok(Vec::new()),
            }
        };
        let coarse = self
            .client
            .query_typed_raw(&self.coarse, params.iter().cloned());
        let (setup, fine, coarse) = tokio::join!(setup, fine, coarse);
        setup.map_err(failed("measurement"))?;
        let mut parts = Vec::new();
        let mut hours = Vec::new();
        for row in fine.map_err(failed("measurement"))? {
            match stands(&row)? {
                true => parts.push(row),
                false => hours.push(instant(&row)?),
            }
        }
        let mut coarse: Coarse<'_> = Box::pin(coarse.map_err(failed("measurement"))?);
        // The readings of the hours that do not stand: a second round trip, only when there
        // are such hours. Its answer comes after the coarse parts, which are read first (a
        // window's most).
        if let Some(fine) = self.fine.as_ref().filter(|_| !hours.is_empty()) {
            let held: Vec<Row> = coarse.try_collect().await.map_err(failed("measurement"))?;
            coarse = Box::pin(futures_util::stream::iter(held.into_iter().map(Ok)));
            let bounds: Vec<Run> = runs(&hours)
                .iter()
                .map(|run| Run {
                    span: [at(run[0]), at(run[run.len() - 1] + HOUR - 1)],
                    hours: run.iter().map(|h| at(*h)).collect(),
                })
                .collect();
            let client = self.client;
            let reads = bounds.iter().map(|run| {
                let mut params = params.clone();
                params[3] = (&run.span[0], Type::TIMESTAMPTZ);
                params[4] = (&run.span[1], Type::TIMESTAMPTZ);
                params.push((&run.hours, Type::TIMESTAMPTZ_ARRAY));
                async move { client.query_typed(&fine.readings, &params).await }
            });
            for rows in futures_util::future::try_join_all(reads)
                .await
                .map_err(failed("measurement"))?
            {
                parts.extend(rows);
            }
            let mut keyed = parts
                .into_iter()
                .map(|row| Ok((instant(&row)?, row)))
                .collect::<Result<Vec<_>, Failure>>()?;
            keyed.sort_by_key(|(at, _)| *at);
            parts = keyed.into_iter().map(|(_, row)| row).collect();
        }
        self.fine_parts = parts.into();
        self.stream = Some(coarse);
        Ok(true)
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
fn part(row: &Row, stride: Option<i64>) -> Result<Bucket, tokio_postgres::Error> {
    let zoned = 8;
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

    #[test]
    fn runs_end_where_a_day_passes_and_many_are_one() {
        let h = |d: i64, hour: i64| d * DAY + hour * HOUR;
        let hours = [
            h(0, 3),
            h(0, 4),
            h(1, 4),
            h(2, 5),
            h(5, 0),
            h(9, 1),
            h(9, 2),
        ];
        assert_eq!(
            runs(&hours),
            vec![&hours[0..3], &hours[3..4], &hours[4..5], &hours[5..7]]
        );
        let far: Vec<i64> = (0..RUNS as i64 + 1).map(|d| h(3 * d, 1)).collect();
        assert_eq!(runs(&far), vec![&far[..]]);
        let sixteen = &far[..RUNS];
        assert_eq!(runs(sixteen).len(), RUNS);
        assert_eq!(runs(&[]), Vec::<&[i64]>::new());
    }
}
