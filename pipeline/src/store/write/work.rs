//! The detection work an object's transaction queues (`anomaly_work`, one row per sensor and
//! span), so detection is never lost and never in the way ([`crate::alerts`]).

use super::*;
use crate::time::Micros;

/// Queues anomaly detection of the span each sensor's valid rows cover (`anomaly_work`, see
/// `crate::alerts`): `$1`–`$3` sensors, first and last instants ([`Spans`], gathered while the rows
/// were read: aggregating the staged rows again cost 50 ms per 100,000-row object), `$4` the
/// object keys (one statement for a group's objects, one row per sensor: [`queue`]); returns
/// each id.
/// A statement of its own, run only when detection is on, so that with detection off the merge is
/// exactly what it was.
pub(super) const QUEUE_DETECTION: &str = "
    INSERT INTO anomaly_work (sensor_uuid, span_start, span_end, object_key)
    SELECT u, first, last, k
    FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::text[]) AS w(u, first, last, k)
    ORDER BY u, k
    RETURNING id";

/// What the reader gathers from an object's valid rows on the way: each sensor's first and last
/// instant (µs since the Unix epoch), and its readings per UTC hour (count, low, high) — the
/// rollup rows of [`INSERT_MEASUREMENTS`], which then needs no `RETURNING` of every row (that
/// and its aggregation cost as much as a third of the insert). Hours are dropped past
/// [`HOURS_MAX`] (bounded memory; the insert then counts them from the rows it writes,
/// [`INSERT_COUNTED`]).
#[derive(Debug, Clone)]
pub struct Spans {
    pub(super) sensors: std::collections::HashMap<uuid::Uuid, (Micros, Micros)>,
    pub(super) hours: Option<std::collections::HashMap<(uuid::Uuid, Micros), Hour>>,
    pub(super) overflowed: bool,
    /// The most hours gathered ([`HOURS_MAX`] unless [`Spans::with_hours_max`]).
    hours_max: usize,
    /// The valid rows gathered.
    count: u64,
}

impl Default for Spans {
    fn default() -> Self {
        Self::with_hours_max(HOURS_MAX)
    }
}

/// The most (sensor, hour) pairs of an object gathered for the rollup (40 bytes each).
pub const HOURS_MAX: usize = 100_000;

impl Spans {
    /// Spans that gather at most `hours` (sensor, hour) pairs (tests set it low).
    pub fn with_hours_max(hours: usize) -> Self {
        Self {
            sensors: Default::default(),
            hours: None,
            overflowed: false,
            hours_max: hours,
            count: 0,
        }
    }

    /// The valid rows gathered.
    pub(super) fn rows(&self) -> u64 {
        self.count
    }

    /// The hours of several objects together (a (sensor, hour) pair once), or `None` if one of
    /// them gave up gathering them (or none has a valid row).
    pub(super) fn hours_of<'a>(
        all: impl Iterator<Item = &'a Spans>,
    ) -> Option<std::collections::HashMap<(uuid::Uuid, Micros), Hour>> {
        let mut out: Option<std::collections::HashMap<(uuid::Uuid, Micros), Hour>> = None;
        for s in all.filter(|s| !s.sensors.is_empty()) {
            let hours = s.hours.as_ref()?;
            let Some(o) = out.as_mut() else {
                out = Some(hours.clone());
                continue;
            };
            for (k, h) in hours {
                o.entry(*k).and_modify(|t| t.absorb(*h)).or_insert(*h);
            }
        }
        out
    }

    /// The spans and hours of readings held per sensor in time order, one per instant (all of
    /// them: there are at most as many hours as readings, and the readings are held already).
    pub fn of_settled(held: &BySensor) -> Spans {
        let mut hours = std::collections::HashMap::new();
        let mut sensors = std::collections::HashMap::with_capacity(held.len());
        for (u, readings) in held {
            let (Some(first), Some(last)) = (readings.first(), readings.last()) else {
                continue;
            };
            sensors.insert(*u, (first.0, last.0));
            let hour = |r: &(Micros, f64)| hour_of(r.0);
            for same in readings.chunk_by(|a, b| hour(a) == hour(b)) {
                let rolled = Hour::of_readings(same.iter().copied()).expect("a reading");
                hours.insert((*u, hour(&same[0])), rolled);
            }
        }
        Spans {
            sensors,
            hours: Some(hours),
            overflowed: false,
            hours_max: HOURS_MAX,
            count: held.values().map(|r| r.len() as u64).sum(),
        }
    }

    /// Stops gathering hours (and drops those gathered): the rows' hours are written otherwise.
    pub fn forget_hours(&mut self) {
        self.hours = None;
        self.overflowed = true;
    }

    pub fn add(&mut self, sensor: uuid::Uuid, micros: Micros, value: f64) {
        let span = self.sensors.entry(sensor).or_insert((micros, micros));
        span.0 = span.0.min(micros);
        span.1 = span.1.max(micros);
        self.count += 1;
        if self.overflowed {
            return;
        }
        let hours = self.hours.get_or_insert_with(Default::default);
        let hour = hour_of(micros);
        if hours.len() >= self.hours_max && !hours.contains_key(&(sensor, hour)) {
            self.hours = None;
            self.overflowed = true;
            return;
        }
        hours
            .entry((sensor, hour))
            .and_modify(|h| h.add(micros, value))
            .or_insert(Hour::of(micros, value));
    }
}

/// Queues detection of the members' sensors' spans (`spans`, in member order) with `statement`
/// ([`QUEUE_DETECTION`]; `None`: detection is off): one row per sensor, from its first instant in
/// any member to its last, under the greatest key of the members holding it; returns each
/// member's ids, all of them the last member's (the one that holds work for the group).
///
/// One row per sensor, not per sensor and member: a group of small objects that each hold many
/// sensors queued 100 rows per object, and inserting, claiming, checking and deleting them was
/// most of the group's time (5,000 objects of 100 sensors: 500,000 rows). Detection judges a
/// sensor's rows in a batch as one span under its newest row's key anyway
/// ([`crate::alerts`]), so the group's one row is what the batch made of its rows; the group's
/// readings go to detection together, as its last member's ([`crate::ingest`]).
pub(super) async fn queue(
    tx: &deadpool_postgres::Transaction<'_>,
    statement: Option<&tokio_postgres::Statement>,
    members: &[Member<'_>],
    spans: &[Vec<SensorSpan>],
) -> Result<Vec<Vec<i64>>, tokio_postgres::Error> {
    let mut works = vec![Vec::new(); members.len()];
    let Some(statement) = statement.filter(|_| spans.iter().any(|s| !s.is_empty())) else {
        return Ok(works);
    };
    type Span<'k> = (
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
        &'k str,
    );
    let mut per_sensor: std::collections::BTreeMap<uuid::Uuid, Span<'_>> = Default::default();
    for (m, spans) in members.iter().zip(spans) {
        for &(sensor, first, last) in spans {
            per_sensor
                .entry(sensor)
                .and_modify(|s| {
                    s.0 = s.0.min(first);
                    s.1 = s.1.max(last);
                    s.2 = s.2.max(m.key);
                })
                .or_insert((first, last, m.key));
        }
    }
    let sensors: Vec<uuid::Uuid> = per_sensor.keys().copied().collect();
    let firsts: Vec<_> = per_sensor.values().map(|s| s.0).collect();
    let lasts: Vec<_> = per_sensor.values().map(|s| s.1).collect();
    let keys: Vec<&str> = per_sensor.values().map(|s| s.2).collect();
    let rows = tx
        .query(statement, &[&sensors, &firsts, &lasts, &keys])
        .await?;
    if let Some(last) = works.last_mut() {
        last.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
    }
    Ok(works)
}
