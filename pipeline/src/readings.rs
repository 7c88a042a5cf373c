//! An object's valid readings held in memory, per sensor, in time order, one per instant: the
//! one type ingestion fills ([`crate::ingest`]), the store writes without staging them
//! ([`crate::store::write::merge_held`]) and detection reads instead of the table
//! ([`crate::alerts`]).

use std::collections::HashMap;

use uuid::Uuid;

use crate::store::write::Link;
use crate::time::Micros;

/// Readings per sensor: microseconds since the epoch and value, in time order.
pub type BySensor = HashMap<Uuid, Vec<(Micros, f64)>>;

/// One object's valid readings per sensor, in time order, one per instant (the last line wins).
#[derive(Debug, Default)]
pub struct Held {
    pub readings: BySensor,
    /// When the readings replaced stored ones: the rollup rows of the hours written, and who
    /// wrote them ([`Link`]), for detection to tell whether they are still all those
    /// hours hold.
    pub links: Vec<Link>,
}

impl Held {
    pub(crate) fn push(&mut self, r: &crate::contract::Reading) {
        self.readings
            .entry(r.sensor_uuid)
            .or_default()
            .push((r.unix_micros, r.value));
    }

    /// Adds `other`'s readings and links (call [`Held::settle`] after: each sensor's readings are
    /// appended, not merged in time order).
    pub(crate) fn absorb(&mut self, other: Held) {
        for (sensor, readings) in other.readings {
            self.readings.entry(sensor).or_default().extend(readings);
        }
        self.links.extend(other.links);
    }

    /// How many readings it holds.
    pub fn len(&self) -> usize {
        self.readings.values().map(Vec::len).sum()
    }

    /// Whether it holds no reading.
    pub fn is_empty(&self) -> bool {
        self.readings.values().all(Vec::is_empty)
    }

    /// Sorts each sensor's readings by time, keeping the last line of each instant; returns how
    /// many remain.
    pub(crate) fn settle(&mut self) -> u64 {
        let mut n = 0;
        for v in self.readings.values_mut() {
            // Stable: lines of one instant stay in file order, and the last one is kept.
            v.sort_by_key(|r| r.0);
            let mut out: Vec<(Micros, f64)> = Vec::with_capacity(v.len());
            for &r in v.iter() {
                match out.last_mut() {
                    Some(last) if last.0 == r.0 => *last = r,
                    _ => out.push(r),
                }
            }
            n += out.len() as u64;
            *v = out;
        }
        n
    }
}
