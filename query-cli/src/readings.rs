//! `query-cli readings`: one sensor's readings in a closed time range, in time order.
//!
//! Without page flags the whole range is streamed in keyset batches on `(sensor_uuid, ts)` — the
//! measurements table's primary key — so memory stays flat however long the range is, and the
//! first row is printed as soon as the first batch starts arriving. With page flags, page P of size
//! S is `OFFSET (P-1)*S LIMIT S` over the same index, streamed the same way.

use std::io::Write;
use std::pin::pin;

use chrono::{DateTime, Duration, Utc};
use clap::Args;
use futures_util::TryStreamExt;
use postgres_types::{ToSql, Type};
use sensor_pipeline::config::DatabaseSettings;
use sensor_pipeline::time::{instant, DAY_MICROS};
use tokio_postgres::Client;
use uuid::Uuid;

use crate::buckets::{self, Every};
use crate::db::{failed, Databases};
use crate::output::{push_timestamp, push_value, Format};
use crate::{range, Failure};

/// Rows fetched per keyset batch when streaming a whole range.
const BATCH: i64 = 50_000;

#[derive(Debug, Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("sensor").required(true).multiple(false)))]
pub struct ReadingsArgs {
    /// The sensor's name, as in the mapping (exact match).
    #[arg(long, value_name = "NAME", group = "sensor")]
    sensor_name: Option<String>,
    /// The sensor's UUID (any UUID text form); works for sensors not in the mapping too.
    #[arg(long, value_name = "UUID", value_parser = parse_uuid, group = "sensor")]
    sensor_uuid: Option<Uuid>,
    /// First instant of the range (inclusive).
    #[arg(long, value_name = "T", value_parser = range::flag)]
    start_timestamp: DateTime<Utc>,
    /// Last instant of the range (inclusive).
    #[arg(long, value_name = "T", value_parser = range::flag)]
    end_timestamp: DateTime<Utc>,
    /// Page to print, from 1 (needs --page-size).
    #[arg(long, value_name = "P", requires = "page_size", value_parser = page, allow_negative_numbers = true)]
    page_number: Option<u64>,
    /// Readings per page (needs --page-number).
    #[arg(long, value_name = "S", requires = "page_number", value_parser = page, allow_negative_numbers = true)]
    page_size: Option<u64>,
    /// One row per time bucket of this length instead of every reading: `5m`, `1h`, `1d`, `1w`
    /// (units s, m, h, d, w). Each row: bucket_start, readings, mean, min, max, first, last;
    /// empty buckets are left out, and pages count buckets.
    #[arg(long, value_name = "DURATION", value_parser = buckets::every)]
    every: Option<Every>,
    /// With --every: align days and weeks on this zone's midnight (an IANA name such as
    /// Europe/Berlin; a day is 23 to 25 hours across a DST change), and print bucket starts with
    /// its offset. Default: UTC.
    #[arg(long, value_name = "ZONE", requires = "every")]
    timezone: Option<String>,
    /// Output format: an aligned table for people, CSV (`timestamp,sensor_value`), or JSON lines.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

pub fn parse_uuid(s: &str) -> Result<Uuid, String> {
    Uuid::parse_str(s.trim()).map_err(|_| {
        "is not a UUID; accepted: hyphenated, simple, braced or urn form, any case".to_string()
    })
}

pub fn page(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("pages and page sizes start at 1".into()),
        _ if s.trim().parse::<i64>().is_ok_and(|n| n < 0) => {
            Err("pages and page sizes start at 1".into())
        }
        Ok(n) if n <= i64::MAX as u64 => Ok(n),
        _ => Err("is not a whole number of at least 1".into()),
    }
}

pub enum Sensor {
    Name(String),
    Uuid(Uuid),
}

/// A validated request.
pub struct Request {
    sensor: Sensor,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    /// (offset, limit) when a page was asked for.
    page: Option<(i64, i64)>,
    /// Buckets and their zone, with --every.
    every: Option<(Every, String)>,
    format: Format,
}

impl ReadingsArgs {
    pub fn request(self) -> Result<Request, Failure> {
        range::check(self.start_timestamp, self.end_timestamp)?;
        let page = match (self.page_number, self.page_size) {
            (Some(number), Some(size)) => {
                // A page beyond i64 offsets is simply past the end.
                let offset = (number - 1).saturating_mul(size).min(i64::MAX as u64);
                Some((offset as i64, size as i64))
            }
            _ => None, // clap makes each page flag require the other
        };
        let sensor = match (self.sensor_name, self.sensor_uuid) {
            (_, Some(uuid)) => Sensor::Uuid(uuid),
            (Some(name), None) => Sensor::Name(name),
            (None, None) => unreachable!("clap requires one of the sensor flags"),
        };
        Ok(Request {
            sensor,
            start: self.start_timestamp,
            end: self.end_timestamp,
            page,
            every: self
                .every
                .map(|every| (every, self.timezone.unwrap_or_else(|| "UTC".into()))),
            format: self.format,
        })
    }
}

pub async fn run(
    settings: &DatabaseSettings,
    request: &Request,
    out: &mut impl Write,
) -> Result<(), Failure> {
    let dbs = Databases::connect(settings).await?;
    let uuid = resolve(&dbs, &request.sensor).await?;
    if let Some((every, zone)) = &request.every {
        let query = buckets::Query {
            sensor: uuid,
            start: request.start,
            end: request.end,
            every: *every,
            zone,
            page: request.page,
        };
        return print_buckets(&dbs.measurements, &query, request.format, out).await;
    }
    let mut printer = Printer::new(request.format);
    printer.header(out)?;
    let client = &dbs.measurements;
    match request.page {
        Some((offset, limit)) => {
            let (anchor, within, upto) =
                page_bounds(client, uuid, request, (offset, limit)).await?;
            // Sent with its parameters' types: one round trip, no prepare.
            let rows = client
                .query_typed_raw(
                    "SELECT ts, value FROM measurements \
                     WHERE sensor_uuid = $1 AND ts >= $2 AND ts <= $3 \
                     ORDER BY ts LIMIT $4 OFFSET $5",
                    [
                        (&uuid as &(dyn ToSql + Sync), Type::UUID),
                        (&anchor, Type::TIMESTAMPTZ),
                        (&upto, Type::TIMESTAMPTZ),
                        (&limit, Type::INT8),
                        (&within, Type::INT8),
                    ],
                )
                .await
                .map_err(failed("measurement"))?;
            print_rows(rows, &mut printer, out).await?;
        }
        None => {
            let stmt = client
                .prepare(
                    "SELECT ts, value FROM measurements \
                     WHERE sensor_uuid = $1 AND ts > $2 AND ts <= $3 \
                     ORDER BY ts LIMIT $4",
                )
                .await
                .map_err(failed("measurement"))?;
            // Timestamps are stored to the microsecond: `> start - 1µs` is `>= start`.
            let mut after = request.start - Duration::microseconds(1);
            loop {
                let params: [&(dyn ToSql + Sync); 4] = [&uuid, &after, &request.end, &BATCH];
                let rows = client
                    .query_raw(&stmt, params)
                    .await
                    .map_err(failed("measurement"))?;
                let (rows, last) = print_rows(rows, &mut printer, out).await?;
                match last {
                    Some(last) if rows == BATCH => after = last,
                    _ => break,
                }
            }
        }
    }
    Ok(())
}

/// Where page (`offset`, `limit`) lies: an instant to read from, how many rows to skip after it,
/// and an instant the page's rows all lie at or before.
///
/// Skipping a million rows with `OFFSET` takes PostgreSQL ~150 ms. The page index
/// (`measurement_days`: readings per sensor and UTC day, kept by the ingest merge) finds the day
/// in which the page starts by summing small rows, so at most a day of readings is skipped, and
/// the day in which it ends: bounded on both sides, the page's query plans only the chunks of
/// those days on a TimescaleDB hypertable (unbounded, a fresh connection planned every chunk of
/// the range: 67–90 ms at ten years of 7-day chunks). The range's partial first and last days
/// are counted from the readings themselves.
async fn page_bounds(
    client: &Client,
    uuid: Uuid,
    request: &Request,
    (offset, limit): (i64, i64),
) -> Result<(DateTime<Utc>, i64, DateTime<Utc>), Failure> {
    let (start, end) = (request.start, request.end);
    // Whole days inside the range: [first_day, after_days).
    let first_day = instant(ceil_to(start.timestamp_micros(), DAY_MICROS));
    let after_days = instant(floor_to(end.timestamp_micros() + 1, DAY_MICROS));
    if first_day >= after_days {
        return Ok((start, offset, end));
    }
    // The readings before the first whole day, and the whole days: sent together, each with
    // its parameters' types (one round trip, no prepare).
    let head_params: [(&(dyn ToSql + Sync), Type); 3] = [
        (&uuid, Type::UUID),
        (&start, Type::TIMESTAMPTZ),
        (&first_day, Type::TIMESTAMPTZ),
    ];
    let (head, days) = tokio::join!(
        client.query_typed(
            "SELECT count(*) FROM measurements WHERE sensor_uuid = $1 AND ts >= $2 AND ts < $3",
            &head_params,
        ),
        client.query_typed_raw(
            "SELECT day, readings FROM measurement_days \
             WHERE sensor_uuid = $1 AND day >= $2 AND day < $3 ORDER BY day",
            [
                (&uuid as &(dyn ToSql + Sync), Type::UUID),
                (&first_day, Type::TIMESTAMPTZ),
                (&after_days, Type::TIMESTAMPTZ),
            ],
        )
    );
    let head: i64 = head
        .map_err(failed("measurement"))?
        .first()
        .map_or(Ok(0), |row| row.try_get(0))
        .map_err(failed("measurement"))?;
    let days = days.map_err(failed("measurement"))?;
    let before_first_day = first_day - Duration::microseconds(1);
    // The page's first and last row, counted from the first whole day (negative: in the head).
    let (first, last) = (offset - head, offset.saturating_add(limit) - 1 - head);
    let mut anchor = (first < 0).then_some((start, offset));
    if last < 0 {
        return Ok((start, offset, before_first_day));
    }
    // Walk the whole days in order, summing, until the day that holds the page's last row. The
    // stream is dropped there, so only the days up to the page are read.
    let mut before = 0;
    let mut days = pin!(days);
    while let Some(row) = days.try_next().await.map_err(failed("measurement"))? {
        let readings: i64 = row.try_get(1).map_err(failed("measurement"))?;
        let day: DateTime<Utc> = row.try_get(0).map_err(failed("measurement"))?;
        if anchor.is_none() && first < before + readings {
            anchor = Some((day, first - before));
        }
        if last < before + readings {
            let (from, within) = anchor.expect("the first row is at or before the last");
            let day_end = day + Duration::microseconds(DAY_MICROS - 1);
            return Ok((from, within, day_end.min(end)));
        }
        before += readings;
    }
    // The page ends after the last whole day: in the range's partial last day, or past the end.
    let (from, within) = anchor.unwrap_or((after_days, first - before));
    Ok((from, within, end))
}

fn ceil_to(us: i64, step: i64) -> i64 {
    floor_to(us + step - 1, step)
}

fn floor_to(us: i64, step: i64) -> i64 {
    us.div_euclid(step) * step
}

/// Prints a query's rows as they arrive; returns how many and the last timestamp.
async fn print_rows(
    rows: tokio_postgres::RowStream,
    printer: &mut Printer,
    out: &mut impl Write,
) -> Result<(i64, Option<DateTime<Utc>>), Failure> {
    let mut rows = pin!(rows);
    let mut count = 0;
    let mut last = None;
    while let Some(row) = rows.try_next().await.map_err(failed("measurement"))? {
        let ts: DateTime<Utc> = row.try_get(0).map_err(failed("measurement"))?;
        let value: f64 = row.try_get(1).map_err(failed("measurement"))?;
        printer.row(out, ts, value)?;
        count += 1;
        last = Some(ts);
    }
    Ok((count, last))
}

/// The UUID to read: a name must map to exactly one; a UUID must be known to either database.
pub async fn resolve(dbs: &Databases, sensor: &Sensor) -> Result<Uuid, Failure> {
    match sensor {
        Sensor::Name(name) => {
            let rows = dbs
                .mapping
                .query_typed(
                    "SELECT sensor_uuid FROM sensors WHERE sensor_name = $1 ORDER BY sensor_uuid",
                    &[(&name.trim(), Type::TEXT)],
                )
                .await
                .map_err(failed("mapping"))?;
            let uuids: Vec<Uuid> = rows
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()
                .map_err(failed("mapping"))?;
            match uuids.as_slice() {
                [one] => Ok(*one),
                [] => Err(Failure::NotFound(format!(
                    "unknown sensor name {name:?}: no sensor in the mapping has it \
                     (`query-cli sensors` lists them; --sensor-uuid reads unmapped sensors)"
                ))),
                many => Err(Failure::NotFound(format!(
                    "sensor name {name:?} is mapped to {} UUIDs: {}; use --sensor-uuid",
                    many.len(),
                    many.iter()
                        .map(Uuid::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ))),
            }
        }
        Sensor::Uuid(uuid) => {
            let mapped = dbs
                .mapping
                .query_opt("SELECT 1 FROM sensors WHERE sensor_uuid = $1", &[uuid])
                .await
                .map_err(failed("mapping"))?
                .is_some();
            let measured = mapped
                || dbs
                    .measurements
                    .query_opt(
                        "SELECT 1 FROM measurements WHERE sensor_uuid = $1 LIMIT 1",
                        &[uuid],
                    )
                    .await
                    .map_err(failed("measurement"))?
                    .is_some();
            if measured {
                Ok(*uuid)
            } else {
                Err(Failure::NotFound(format!(
                    "unknown sensor UUID {uuid}: neither mapped nor with any reading"
                )))
            }
        }
    }
}

/// Formats readings one line at a time into a reused buffer, for all three formats.
///
/// Hand-written rather than through `csv::Writer` (which `output::write_records` uses for the
/// other commands): a reading's two fields never need quoting, and the rows stream by the
/// million. Measured on the development machine with 5 M rows of the same two fields (a
/// timestamp, a shortest-form number) into memory: 79–93 ns per row here, 103–118 ns through
/// `csv::Writer::write_record` — a quarter more, some 7 % of `readings --format csv` end to end
/// (2.4–3.1 M rows/s, where the goal is to keep up with `psql`'s COPY-out).
struct Printer {
    format: Format,
    line: Vec<u8>,
}

/// Table column widths: the longest RFC 3339 UTC timestamp with microseconds, and a value.
const TS_WIDTH: usize = 27;
const VALUE_WIDTH: usize = 14;

impl Printer {
    fn new(format: Format) -> Self {
        Self {
            format,
            line: Vec::with_capacity(64),
        }
    }

    fn header(&self, out: &mut impl Write) -> std::io::Result<()> {
        match self.format {
            Format::Csv => out.write_all(b"timestamp,sensor_value\n"),
            Format::Table => writeln!(
                out,
                "{:<TS_WIDTH$}  {:>VALUE_WIDTH$}",
                "timestamp", "sensor_value"
            ),
            Format::Json => Ok(()),
        }
    }

    fn row(&mut self, out: &mut impl Write, ts: DateTime<Utc>, value: f64) -> std::io::Result<()> {
        let line = &mut self.line;
        line.clear();
        match self.format {
            Format::Csv => {
                push_timestamp(line, ts);
                line.push(b',');
                push_value(line, value);
            }
            Format::Json => {
                line.extend_from_slice(b"{\"timestamp\":\"");
                push_timestamp(line, ts);
                line.extend_from_slice(b"\",\"sensor_value\":");
                push_value(line, value);
                line.push(b'}');
            }
            Format::Table => {
                push_timestamp(line, ts);
                let pad = TS_WIDTH.saturating_sub(line.len()) + 2;
                line.extend(std::iter::repeat_n(b' ', pad));
                let at = line.len();
                push_value(line, value);
                let width = line.len() - at;
                if width < VALUE_WIDTH {
                    line.splice(at..at, std::iter::repeat_n(b' ', VALUE_WIDTH - width));
                }
            }
        }
        line.push(b'\n');
        out.write_all(line)
    }
}

/// Prints the buckets of `query` as they arrive, one line each, numbers as the readings'
/// (shortest form that reads back the same).
async fn print_buckets(
    client: &Client,
    query: &buckets::Query<'_>,
    format: Format,
    out: &mut impl Write,
) -> Result<(), Failure> {
    const FIELDS: [&str; 7] = [
        "bucket_start",
        "readings",
        "mean",
        "min",
        "max",
        "first",
        "last",
    ];
    /// Table column widths: the start with its offset, then the numbers (a mean often has all
    /// 17 digits).
    const WIDTHS: [usize; 7] = [25, 9, 20, 14, 14, 14, 14];
    let mut rows = buckets::buckets(client, query).await?;
    let mut line = String::with_capacity(160);
    let table = |line: &mut String, cells: &[&str]| {
        for (i, (cell, width)) in cells.iter().zip(WIDTHS).enumerate() {
            match i {
                0 => line.push_str(&format!("{cell:<width$}")),
                _ => line.push_str(&format!("  {cell:>width$}")),
            }
        }
    };
    match format {
        Format::Csv => writeln!(out, "{}", FIELDS.join(","))?,
        Format::Table => {
            table(&mut line, &FIELDS);
            writeln!(out, "{line}")?;
        }
        Format::Json => {}
    }
    let mut text = Vec::with_capacity(160);
    while let Some(b) = rows.next().await? {
        text.clear();
        if b.start.offset().local_minus_utc() == 0 {
            push_timestamp(&mut text, b.start.to_utc());
        } else {
            text.extend(
                b.start
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                    .bytes(),
            );
        }
        let start = text.len();
        let readings = b.readings.to_string();
        // The numbers, each after the one before (their ends in `ends`).
        let mut ends = [0; 5];
        for (i, v) in [b.mean, b.min, b.max, b.first, b.last]
            .into_iter()
            .enumerate()
        {
            push_value(&mut text, v);
            ends[i] = text.len();
        }
        let cell = |i: usize| {
            let from = if i == 0 { start } else { ends[i - 1] };
            std::str::from_utf8(&text[from..ends[i]]).expect("ASCII")
        };
        let stamp = std::str::from_utf8(&text[..start]).expect("ASCII");
        let numbers = [cell(0), cell(1), cell(2), cell(3), cell(4)];
        line.clear();
        match format {
            Format::Csv => {
                line.push_str(stamp);
                line.push(',');
                line.push_str(&readings);
                for n in numbers {
                    line.push(',');
                    line.push_str(n);
                }
            }
            Format::Json => {
                line.push_str("{\"bucket_start\":\"");
                line.push_str(stamp);
                line.push_str("\",\"readings\":");
                line.push_str(&readings);
                for (name, n) in FIELDS[2..].iter().zip(numbers) {
                    line.push_str(",\"");
                    line.push_str(name);
                    line.push_str("\":");
                    line.push_str(n);
                }
                line.push('}');
            }
            Format::Table => {
                let mut cells = vec![stamp, readings.as_str()];
                cells.extend(numbers);
                table(&mut line, &cells);
            }
        }
        line.push('\n');
        out.write_all(line.as_bytes())?;
    }
    Ok(())
}
