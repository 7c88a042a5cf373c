//! The detection work an object's transaction queues (`anomaly_work`, one row per sensor and
//! span), so detection is never lost and never in the way ([`crate::alerts`]).

use super::*;
use crate::time::Micros;

/// Queues anomaly detection of the span each sensor's valid rows cover (`anomaly_work`, see
/// `crate::alerts`): `$1`–`$3` sensors, first and last instants ([`Spans`], gathered while the rows
/// were read: aggregating the staged rows again cost 50 ms per 100,000-row object), `$4` the
/// object keys (one statement for a group's objects); returns each id with its key.
/// A statement of its own, run only when detection is on, so that with detection off the merge is
/// exactly what it was.
pub(super) const QUEUE_DETECTION: &str = "
    INSERT INTO anomaly_work (sensor_uuid, span_start, span_end, object_key)
    SELECT u, first, last, k
    FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::text[]) AS w(u, first, last, k)
    ORDER BY u, k
    RETURNING id, object_key";

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

/// Queues detection of each member's sensors' spans (`spans`, in member order) with `statement`
/// ([`QUEUE_DETECTION`]; `None`: detection is off); returns each member's ids.
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
    let all = || {
        members
            .iter()
            .zip(spans)
            .flat_map(|(m, s)| s.iter().map(|s| (m.key, s)))
    };
    let sensors: Vec<uuid::Uuid> = all().map(|(_, s)| s.0).collect();
    let firsts: Vec<_> = all().map(|(_, s)| s.1).collect();
    let lasts: Vec<_> = all().map(|(_, s)| s.2).collect();
    let keys: Vec<&str> = all().map(|(k, _)| k).collect();
    let at: std::collections::HashMap<&str, usize> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (m.key, i))
        .collect();
    for row in tx
        .query(statement, &[&sensors, &firsts, &lasts, &keys])
        .await?
    {
        let key: &str = row.get(1);
        works[at[key]].push(row.get(0));
    }
    Ok(works)
}
