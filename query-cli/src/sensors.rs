//! `query-cli sensors`: every sensor — mapped, or only seen in readings — with its reading count
//! and first/last timestamp. Mapping and measurements may live in two databases, so the two sides
//! are read apart and joined here. Counts come from the per-day page index, so this stays instant
//! with hundreds of millions of readings.

use std::collections::BTreeMap;
use std::io::Write;

use chrono::{DateTime, Utc};
use sensor_pipeline::config::DatabaseSettings;
use serde_json::json;
use uuid::Uuid;

use crate::db::{failed, Databases};
use crate::output::{csv_field, timestamp, write_table, Align, Format};
use crate::Failure;

#[derive(Default)]
struct Sensor {
    name: Option<String>,
    readings: i64,
    first: Option<DateTime<Utc>>,
    last: Option<DateTime<Utc>>,
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

    let ts = |t: Option<DateTime<Utc>>| t.map(timestamp);
    match format {
        Format::Json => {
            for (uuid, s) in &sensors {
                let line = json!({
                    "sensor_uuid": uuid.to_string(),
                    "sensor_name": s.name,
                    "readings": s.readings,
                    "first": ts(s.first),
                    "last": ts(s.last),
                });
                writeln!(out, "{line}")?;
            }
        }
        Format::Csv => {
            writeln!(out, "sensor_uuid,sensor_name,readings,first,last")?;
            for (uuid, s) in &sensors {
                writeln!(
                    out,
                    "{uuid},{},{},{},{}",
                    csv_field(s.name.as_deref().unwrap_or("")),
                    s.readings,
                    ts(s.first).unwrap_or_default(),
                    ts(s.last).unwrap_or_default()
                )?;
            }
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = sensors
                .iter()
                .map(|(uuid, s)| {
                    vec![
                        uuid.to_string(),
                        s.name.clone().unwrap_or_else(|| "(unmapped)".into()),
                        s.readings.to_string(),
                        ts(s.first).unwrap_or_else(|| "-".into()),
                        ts(s.last).unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            write_table(
                out,
                &[
                    ("sensor_uuid", Align::Left),
                    ("sensor_name", Align::Left),
                    ("readings", Align::Right),
                    ("first", Align::Left),
                    ("last", Align::Left),
                ],
                &rows,
            )?;
        }
    }
    Ok(())
}
