//! `query-cli sensors`: every sensor — mapped, or only seen in readings — with its reading count
//! and first/last timestamp. Mapping and measurements may live in two databases, so the two sides
//! are read apart and joined here. Counts come from the per-day page index, so this stays instant
//! with hundreds of millions of readings.

use std::collections::BTreeMap;
use std::io::Write;

use chrono::{DateTime, Utc};
use sensor_pipeline::config::DatabaseSettings;
use uuid::Uuid;

use crate::db::{failed, Databases};
use crate::output::{render, timestamp, Column, Format, Record};
use crate::Failure;

#[derive(Default)]
struct Sensor {
    name: Option<String>,
    readings: i64,
    first: Option<DateTime<Utc>>,
    last: Option<DateTime<Utc>>,
}

/// One line of `query-cli sensors` (SPEC §5 field names).
#[derive(serde::Serialize)]
struct SensorRecord {
    sensor_uuid: String,
    /// `None` for a sensor seen only in readings.
    sensor_name: Option<String>,
    readings: i64,
    first: Option<String>,
    last: Option<String>,
}

impl Record for SensorRecord {
    const FIELDS: &'static [&'static str] =
        &["sensor_uuid", "sensor_name", "readings", "first", "last"];
    const TABLE: &'static [Column<Self>] = &[
        Column::left("sensor_uuid", |r| r.sensor_uuid.clone()),
        Column::left("sensor_name", |r| or(&r.sensor_name, "(unmapped)")),
        Column::right("readings", |r| r.readings.to_string()),
        Column::left("first", |r| or(&r.first, "-")),
        Column::left("last", |r| or(&r.last, "-")),
    ];
}

/// A table cell: the value, or `none` when there is none.
fn or(v: &Option<String>, none: &str) -> String {
    v.clone().unwrap_or_else(|| none.to_string())
}

pub async fn run(
    settings: &DatabaseSettings,
    format: Format,
    out: &mut impl Write,
) -> Result<(), Failure> {
    let dbs = Databases::connect(settings).await?;
    let mut sensors: BTreeMap<Uuid, Sensor> = BTreeMap::new();
    for row in dbs
        .mapping
        .query("SELECT sensor_uuid, sensor_name FROM sensors", &[])
        .await
        .map_err(failed("mapping"))?
    {
        let uuid: Uuid = row.try_get(0).map_err(failed("mapping"))?;
        sensors.entry(uuid).or_default().name = Some(row.try_get(1).map_err(failed("mapping"))?);
    }
    for row in dbs
        .measurements
        .query(
            // Counts from the page index (kept exact by ingestion), first and last from the
            // primary key: no scan of the readings themselves.
            "SELECT d.sensor_uuid, d.readings, f.ts, l.ts \
             FROM (SELECT sensor_uuid, sum(readings)::bigint AS readings \
                   FROM measurement_days GROUP BY sensor_uuid) d \
             CROSS JOIN LATERAL (SELECT ts FROM measurements m \
                   WHERE m.sensor_uuid = d.sensor_uuid ORDER BY ts LIMIT 1) f \
             CROSS JOIN LATERAL (SELECT ts FROM measurements m \
                   WHERE m.sensor_uuid = d.sensor_uuid ORDER BY ts DESC LIMIT 1) l",
            &[],
        )
        .await
        .map_err(failed("measurement"))?
    {
        let uuid: Uuid = row.try_get(0).map_err(failed("measurement"))?;
        let s = sensors.entry(uuid).or_default();
        s.readings = row.try_get(1).map_err(failed("measurement"))?;
        s.first = row.try_get(2).map_err(failed("measurement"))?;
        s.last = row.try_get(3).map_err(failed("measurement"))?;
    }
    // Mapped sensors by name, then the unmapped ones by UUID.
    let mut sensors: Vec<(Uuid, Sensor)> = sensors.into_iter().collect();
    sensors.sort_by(|(ua, a), (ub, b)| {
        (a.name.is_none(), &a.name, ua).cmp(&(b.name.is_none(), &b.name, ub))
    });

    let records: Vec<SensorRecord> = sensors
        .into_iter()
        .map(|(uuid, s)| SensorRecord {
            sensor_uuid: uuid.to_string(),
            sensor_name: s.name,
            readings: s.readings,
            first: s.first.map(timestamp),
            last: s.last.map(timestamp),
        })
        .collect();
    render(out, format, &records)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::serde_header;

    #[test]
    fn csv_header_is_the_field_names() {
        let s = SensorRecord {
            sensor_uuid: "u".into(),
            sensor_name: None,
            readings: 0,
            first: None,
            last: None,
        };
        assert_eq!(serde_header(&s), SensorRecord::FIELDS.join(","));
    }
}
