//! `query-cli anomalies`: runs the library's detector ([`sensor_pipeline::anomaly`]) over stored
//! readings, sensor by sensor.
//!
//! The detector reads from well before `--start-timestamp` (its whole memory: the earlier of
//! [`WARM_UP_MICROS`] and [`WARM_UP_READINGS`] readings before the start), so what is reported
//! for a window does not depend on where the window begins; anomalies are those whose first
//! reading lies in `[start, end]`.

use std::io::{IsTerminal, Write};

use chrono::{DateTime, Duration, Utc};
use clap::Args;
use sensor_pipeline::anomaly::{Anomaly, Detector, Kind, WARM_UP_MICROS, WARM_UP_READINGS};
use sensor_pipeline::config::DatabaseSettings;
use sensor_pipeline::store::measurements;
use sensor_pipeline::time::{instant as time, Micros};
use uuid::Uuid;

use crate::db::{failed, Databases};
use crate::output::{render, timestamp, Column, Format, Record};
use crate::readings::{page, parse_uuid, resolve, Sensor};
use crate::{range, series, Failure};

#[derive(Debug, Args)]
#[group(skip)]
#[command(group(clap::ArgGroup::new("sensor").required(true).multiple(false)))]
pub struct AnomaliesArgs {
    /// The sensor's name, as in the mapping (exact match).
    #[arg(long, value_name = "NAME", group = "sensor")]
    sensor_name: Option<String>,
    /// The sensor's UUID (any UUID text form); works for sensors not in the mapping too.
    #[arg(long, value_name = "UUID", value_parser = parse_uuid, group = "sensor")]
    sensor_uuid: Option<Uuid>,
    /// Every sensor with readings, one after the other (progress on stderr when it is a terminal).
    #[arg(long, group = "sensor")]
    all: bool,
    /// First instant of the range (inclusive).
    #[arg(long, value_name = "T", value_parser = range::flag)]
    start_timestamp: DateTime<Utc>,
    /// Last instant of the range (inclusive).
    #[arg(long, value_name = "T", value_parser = range::flag)]
    end_timestamp: DateTime<Utc>,
    /// Only these kinds (repeatable): spike, level_shift, stuck, gap.
    #[arg(long = "kind", value_name = "K", value_parser = parse_kind)]
    kinds: Vec<Kind>,
    /// Divides every threshold: 2 reports deviations half as large as the default does, 0.5
    /// only those twice as large. The default, 1, needs no tuning.
    #[arg(long, value_name = "S", value_parser = sensitivity)]
    sensitivity: Option<f64>,
    /// Read the anomalies the workers found as data arrived (the `anomalies` table: open ones)
    /// instead of running the detector over the readings.
    #[arg(long, conflicts_with = "sensitivity")]
    stored: bool,
    /// With --stored: page to print, from 1 (needs --page-size).
    #[arg(long, value_name = "P", requires_all = ["page_size", "stored"], value_parser = page, allow_negative_numbers = true)]
    page_number: Option<u64>,
    /// With --stored: anomalies per page (needs --page-number).
    #[arg(long, value_name = "S", requires_all = ["page_number", "stored"], value_parser = page, allow_negative_numbers = true)]
    page_size: Option<u64>,
    /// Output format: an aligned table for people, CSV, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    s.trim().parse()
}

fn sensitivity(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err("is not a number above 0 (1 is the default; 2 reports more, 0.5 less)".into()),
    }
}

/// One line of `query-cli anomalies` (SPEC §7 field names).
#[derive(Debug, serde::Serialize)]
pub struct AnomalyRecord {
    pub sensor_uuid: String,
    pub sensor_name: Option<String>,
    pub kind: &'static str,
    pub start: String,
    pub end: String,
    pub value: Option<f64>,
    pub expected: Option<f64>,
    pub score: f64,
}

impl Record for AnomalyRecord {
    const FIELDS: &'static [&'static str] = &[
        "sensor_uuid",
        "sensor_name",
        "kind",
        "start",
        "end",
        "value",
        "expected",
        "score",
    ];
    const TABLE: &'static [Column<Self>] = &[
        Column::left("sensor", |r| {
            r.sensor_name
                .clone()
                .unwrap_or_else(|| r.sensor_uuid.clone())
        }),
        Column::left("kind", |r| r.kind.to_string()),
        Column::left("start", |r| r.start.clone()),
        Column::left("end", |r| r.end.clone()),
        Column::right("value", |r| number(r.value)),
        Column::right("expected", |r| number(r.expected)),
        Column::right("score", |r| format!("{:.1}", r.score)),
    ];
}

/// A value or expectation in the table: six decimals, `-` for none.
fn number(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.6}"))
}

impl AnomalyRecord {
    fn new(uuid: Uuid, name: Option<String>, a: &Anomaly) -> Self {
        Self {
            sensor_uuid: uuid.to_string(),
            sensor_name: name,
            kind: a.kind.as_str(),
            start: timestamp(time(a.start)),
            end: timestamp(time(a.end)),
            value: a.value,
            expected: a.expected,
            score: (a.score * 1000.0).round() / 1000.0,
        }
    }
}

/// The anomalies of one sensor whose first reading lies in `[start, end]`, in time order;
/// `in_window` sees every reading of `[start, end]` on the way (what `plot` draws).
pub async fn detect(
    dbs: &Databases,
    uuid: Uuid,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    sensitivity: f64,
    mut in_window: impl FnMut(Micros, f64),
) -> Result<Vec<Anomaly>, Failure> {
    let client = &dbs.measurements;
    let memory = Duration::microseconds(WARM_UP_MICROS);
    let from = measurements::warm_up_from(&**client, uuid, start, memory, WARM_UP_READINGS)
        .await
        .map_err(failed("measurement"))?;
    let mut detector = Detector::new(sensitivity);
    let mut found = Vec::new();
    let (first, last) = (start.timestamp_micros(), end.timestamp_micros());
    series::each_reading(client, uuid, from, end, |at, value| {
        detector.push(at, value, &mut found);
        if at >= first {
            in_window(at, value);
        }
    })
    .await?;
    detector.finish(&mut found);
    let (start, end) = (first, last);
    found.retain(|a| a.start >= start && a.start <= end);
    found.sort_by(|a, b| a.start.cmp(&b.start).then(a.kind.cmp(&b.kind)));
    Ok(found)
}

/// The open anomalies the workers stored for `uuid` with a first reading in `[start, end]`, in
/// time order — when they are the verdicts on every reading up to `end`: no detection of the
/// sensor is queued and its newest saved detector has judged its last reading up to `end`.
/// `None` otherwise (detection off, behind, or never run for these readings): then only running
/// the detector says what is there.
pub async fn stored_if_current(
    dbs: &Databases,
    uuid: Uuid,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<Option<Vec<Anomaly>>, Failure> {
    let client = &dbs.measurements;
    let current: bool = client
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM anomaly_work WHERE sensor_uuid = $1)
                AND (SELECT max(through) FROM anomaly_detectors WHERE sensor_uuid = $1)
                    >= (SELECT max(ts) FROM measurements WHERE sensor_uuid = $1 AND ts <= $2)",
            &[&uuid, &end],
        )
        .await
        .map_err(failed("measurement"))?
        .get::<_, Option<bool>>(0)
        .unwrap_or(false);
    if !current {
        return Ok(None);
    }
    let rows = client
        .query(
            "SELECT kind, start_ts, end_ts, value, expected, score FROM anomalies
             WHERE sensor_uuid = $1 AND start_ts >= $2 AND start_ts <= $3 AND state = 'open'
             ORDER BY start_ts, kind",
            &[&uuid, &start, &end],
        )
        .await
        .map_err(failed("measurement"))?;
    let mut found = Vec::with_capacity(rows.len());
    for row in rows {
        found.push(stored_anomaly(&row, 0)?);
    }
    found.sort_by(|a, b| a.start.cmp(&b.start).then(a.kind.cmp(&b.kind)));
    Ok(Some(found))
}

/// An anomaly from the columns `kind, start_ts, end_ts, value, expected, score` from `at` on.
fn stored_anomaly(row: &tokio_postgres::Row, at: usize) -> Result<Anomaly, Failure> {
    Ok(Anomaly {
        kind: row
            .get::<_, &str>(at)
            .parse()
            .map_err(Failure::Infrastructure)?,
        start: row.get::<_, DateTime<Utc>>(at + 1).timestamp_micros(),
        end: row.get::<_, DateTime<Utc>>(at + 2).timestamp_micros(),
        value: row.get(at + 3),
        expected: row.get(at + 4),
        score: row.get(at + 5),
    })
}

pub async fn run(
    settings: &DatabaseSettings,
    args: AnomaliesArgs,
    out: &mut impl Write,
) -> Result<(), Failure> {
    range::check(args.start_timestamp, args.end_timestamp)?;
    let dbs = Databases::connect(settings).await?;
    if args.stored {
        let only = match (args.sensor_name.clone(), args.sensor_uuid) {
            (_, Some(uuid)) => Some(resolve(&dbs, &Sensor::Uuid(uuid)).await?),
            (Some(name), None) => Some(resolve(&dbs, &Sensor::Name(name)).await?),
            (None, None) => None,
        };
        let records = stored(&dbs, only, &args).await?;
        render(out, args.format, &records)?;
        return Ok(());
    }
    let sensors: Vec<(Uuid, Option<String>)> = if args.all {
        every_sensor(&dbs).await?
    } else {
        let sensor = match (args.sensor_name, args.sensor_uuid) {
            (_, Some(uuid)) => Sensor::Uuid(uuid),
            (Some(name), None) => Sensor::Name(name),
            (None, None) => unreachable!("clap requires one of the sensor flags"),
        };
        let uuid = resolve(&dbs, &sensor).await?;
        vec![(uuid, series::name_of(&dbs.mapping, uuid).await?)]
    };
    let progress = args.all && std::io::stderr().is_terminal();
    let mut records = Vec::new();
    for (i, (uuid, name)) in sensors.iter().enumerate() {
        if progress {
            let label = name.clone().unwrap_or_else(|| uuid.to_string());
            eprint!("\r\x1b[2K[{}/{}] {label}", i + 1, sensors.len());
        }
        let found = detect(
            &dbs,
            *uuid,
            args.start_timestamp,
            args.end_timestamp,
            args.sensitivity.unwrap_or(1.0),
            |_, _| {},
        )
        .await?;
        records.extend(
            found
                .iter()
                .filter(|a| args.kinds.is_empty() || args.kinds.contains(&a.kind))
                .map(|a| AnomalyRecord::new(*uuid, name.clone(), a)),
        );
    }
    if progress {
        eprintln!(
            "\r\x1b[2K{} sensors, {} anomalies",
            sensors.len(),
            records.len()
        );
    }
    render(out, args.format, &records)?;
    Ok(())
}

/// The open anomalies the workers stored (`--stored`): one sensor's, or every sensor's in time
/// order; a page of them when asked.
async fn stored(
    dbs: &Databases,
    only: Option<Uuid>,
    args: &AnomaliesArgs,
) -> Result<Vec<AnomalyRecord>, Failure> {
    let kinds: Vec<&str> = args.kinds.iter().map(|k| k.as_str()).collect();
    let (offset, limit) = match (args.page_number, args.page_size) {
        (Some(n), Some(size)) => (
            i64::try_from((n - 1).saturating_mul(size)).unwrap_or(i64::MAX),
            i64::try_from(size).unwrap_or(i64::MAX),
        ),
        _ => (0, i64::MAX),
    };
    let rows = dbs
        .measurements
        .query(
            "SELECT sensor_uuid, kind, start_ts, end_ts, value, expected, score FROM anomalies
             WHERE ($1::uuid IS NULL OR sensor_uuid = $1) AND start_ts >= $2 AND start_ts <= $3
               AND state = 'open' AND (cardinality($4::text[]) = 0 OR kind = ANY($4))
             ORDER BY start_ts, sensor_uuid, kind OFFSET $5 LIMIT $6",
            &[
                &only,
                &args.start_timestamp,
                &args.end_timestamp,
                &kinds,
                &offset,
                &limit,
            ],
        )
        .await
        .map_err(failed("measurement"))?;
    let mut names = std::collections::HashMap::new();
    let mut records = Vec::with_capacity(rows.len());
    for row in rows {
        let uuid: Uuid = row.get(0);
        if let std::collections::hash_map::Entry::Vacant(e) = names.entry(uuid) {
            e.insert(series::name_of(&dbs.mapping, uuid).await?);
        }
        let a = stored_anomaly(&row, 1)?;
        records.push(AnomalyRecord::new(uuid, names[&uuid].clone(), &a));
    }
    Ok(records)
}

/// Every sensor with readings: mapped ones by name, then the unmapped by UUID.
async fn every_sensor(dbs: &Databases) -> Result<Vec<(Uuid, Option<String>)>, Failure> {
    let names: std::collections::HashMap<Uuid, String> = dbs
        .mapping
        .query("SELECT sensor_uuid, sensor_name FROM sensors", &[])
        .await
        .map_err(failed("mapping"))?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(failed("mapping"))?;
    let mut sensors: Vec<(Uuid, Option<String>)> = dbs
        .measurements
        .query("SELECT DISTINCT sensor_uuid FROM measurement_days", &[])
        .await
        .map_err(failed("measurement"))?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<Vec<Uuid>, _>>()
        .map_err(failed("measurement"))?
        .into_iter()
        .map(|u| (u, names.get(&u).cloned()))
        .collect();
    sensors.sort_by(|(ua, a), (ub, b)| (a.is_none(), a, ua).cmp(&(b.is_none(), b, ub)));
    Ok(sensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::serde_header;

    #[test]
    fn csv_header_is_the_field_names() {
        let r = AnomalyRecord::new(
            Uuid::nil(),
            None,
            &Anomaly {
                kind: Kind::Gap,
                start: 0,
                end: 1,
                value: None,
                expected: None,
                score: 2.0,
            },
        );
        assert_eq!(serde_header(&r), AnomalyRecord::FIELDS.join(","));
    }

    #[test]
    fn sensitivity_must_be_positive() {
        assert_eq!(sensitivity("2"), Ok(2.0));
        assert!(sensitivity("0").is_err());
        assert!(sensitivity("-1").is_err());
        assert!(sensitivity("NaN").is_err());
    }
}
