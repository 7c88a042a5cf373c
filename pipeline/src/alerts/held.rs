//! The objects' own readings fed to detection instead of read back, where the rollup's links
//! prove they are all an hour holds; and the rollup hours a replacing merge left inexact,
//! settled from them or from the stored readings.

use super::*;
use crate::time::Micros;

/// An hour's start (microseconds since the epoch) and the held readings it holds, in time order
/// (from one object, or several that wrote it one after the other).
pub(super) type HeldHour<'f> = (Micros, Vec<&'f [(Micros, f64)]>);

/// What the objects of a batch (`fresh`) hold of one sensor in the hours their replacing merges
/// wrote ([`Link`](crate::store::write::Link)): each hour's readings, in time order, and the
/// links of the merges that wrote it. Empty when none of them replaced readings of the sensor,
/// or when their readings of it overlap (which of two wins a key is for the stored versions to
/// say).
#[derive(Default)]
pub(super) struct HeldOf<'f> {
    pub(super) hours: std::collections::BTreeMap<Micros, Vec<&'f [(Micros, f64)]>>,
    pub(super) links: HashMap<i64, Vec<(Option<i64>, i64)>>,
}

impl<'f> HeldOf<'f> {
    pub(super) fn of(sensor: Uuid, fresh: &[&'f Held]) -> Self {
        let mut links: HashMap<i64, Vec<(Option<i64>, i64)>> = HashMap::new();
        let mut pieces: Vec<&[(Micros, f64)]> = Vec::new();
        for f in fresh {
            let mut linked = false;
            for l in f.links.iter().filter(|l| l.sensor == sensor) {
                links.entry(l.hour).or_default().push((l.before, l.by));
                linked = true;
            }
            match f.readings.get(&sensor) {
                Some(r) if linked && !r.is_empty() => pieces.push(r),
                _ => {}
            }
        }
        pieces.sort_by_key(|p| p[0].0);
        let apart = pieces
            .windows(2)
            .all(|w| w[0][w[0].len() - 1].0 < w[1][0].0);
        if pieces.is_empty() || !apart {
            return Self::default();
        }
        let mut hours: std::collections::BTreeMap<Micros, Vec<&'f [(Micros, f64)]>> =
            Default::default();
        for piece in pieces {
            let mut rest = piece;
            while let Some(&(at, _)) = rest.first() {
                let hour = hour_of(at);
                let n = rest.partition_point(|r| r.0 < hour + HOUR_MICROS);
                hours.entry(hour).or_default().push(&rest[..n]);
                rest = &rest[n..];
            }
        }
        Self { hours, links }
    }

    /// Whether the readings held for `hour` are all it holds, given its rollup row's count and
    /// writer (`xmin`) now: that row was last written by the newest of the merges that wrote
    /// the hour, each of them wrote it right after the one before (so nothing else wrote into
    /// the hour from the first of them on), and they hold as many readings as it counts (so it
    /// holds nothing else).
    pub(super) fn proves(&self, hour: Micros, count: i64, now: i64) -> bool {
        let held: usize = self
            .hours
            .get(&hour)
            .map_or(0, |s| s.iter().map(|p| p.len()).sum());
        let chain = self.links.get(&hour).map_or(&[][..], Vec::as_slice);
        held as i64 == count && chained(chain, now)
    }
}

/// The hours of `sensor` whose stored readings are provably exactly what `fresh` holds
/// ([`HeldOf::proves`], against the rollup now), in time order.
pub(super) async fn held_hours<'f>(
    tx: &Tx<'_>,
    sensor: Uuid,
    fresh: &[&'f Held],
) -> Result<Vec<HeldHour<'f>>, tokio_postgres::Error> {
    let held = HeldOf::of(sensor, fresh);
    if held.hours.is_empty() {
        return Ok(Vec::new());
    }
    let starts: Vec<DateTime<Utc>> = held.hours.keys().map(|&h| time(h)).collect();
    let rows = query(tx, rollup::HOURS_AND_WRITERS, &[&sensor, &starts]).await?;
    let proven: std::collections::HashSet<i64> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, DateTime<Utc>>(0).timestamp_micros(),
                r.get(1),
                r.get(2),
            )
        })
        .filter(|&(hour, count, now)| held.proves(hour, count, now))
        .map(|(hour, ..)| hour)
        .collect();
    Ok(held
        .hours
        .into_iter()
        .filter(|(h, _)| proven.contains(h))
        .collect())
}

/// Settles the rollup hours within the spans of `work` that are not exact (a replacing merge
/// with detection on leaves those whose bounds it cannot tell: [`crate::store::write`]): from
/// the readings the objects hold where they provably are all the hour holds ([`HeldOf`]), else
/// from the stored readings. Hours another transaction is writing are skipped (their writer's
/// detection settles them). Returns how many were settled.
pub(super) async fn settle_hours(
    tx: &Tx<'_>,
    work: &[Work],
    fresh: &[&Held],
) -> Result<usize, tokio_postgres::Error> {
    let sensors: Vec<Uuid> = work.iter().map(|w| w.sensor).collect();
    let firsts: Vec<DateTime<Utc>> = work.iter().map(|w| w.from).collect();
    let lasts: Vec<DateTime<Utc>> = work.iter().map(|w| w.to).collect();
    let rows = query(
        tx,
        rollup::INEXACT_HOURS_IN_SPANS,
        &[&sensors, &firsts, &lasts],
    )
    .await?;
    // (An hour two of the spans share comes twice.)
    let mut hours: Vec<(Uuid, DateTime<Utc>, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    hours.dedup_by_key(|h| (h.0, h.1));
    let mut held: HashMap<Uuid, HeldOf> = HashMap::new();
    let (mut known, mut unknown) = (HourColumns::default(), (vec![], vec![]));
    for &(sensor, at, count, now) in &hours {
        let hour = at.timestamp_micros();
        let of = held
            .entry(sensor)
            .or_insert_with(|| HeldOf::of(sensor, fresh));
        if of.proves(hour, count, now) {
            let readings = of.hours[&hour].iter().flat_map(|p| p.iter().copied());
            if let Some(rolled) = Hour::of_readings(readings) {
                known.push(sensor, hour, &rolled);
            }
        } else {
            unknown.0.push(sensor);
            unknown.1.push(at);
        }
    }
    rollup::settle(&**tx, &known, (&unknown.0, &unknown.1)).await?;
    Ok(hours.len())
}

/// Whether `links` (before, by) are one chain of writers ending with `now`: following each
/// writer back to the one before it from `now` meets every link.
pub(super) fn chained(links: &[(Option<i64>, i64)], now: i64) -> bool {
    let mut at = Some(now);
    let mut met = 0;
    while let Some(by) = at {
        let Some(link) = links.iter().find(|l| l.1 == by) else {
            break;
        };
        met += 1;
        if met > links.len() {
            return false;
        }
        at = link.0;
    }
    !links.is_empty() && met == links.len()
}

/// [`readings::each_reading`] over `[from, to]`, the hours in `held` (from [`held_hours`]) fed
/// from memory and only the rest read from the database; returns how many were fed from memory.
pub(super) async fn each_reading_held(
    tx: &Tx<'_>,
    sensor: Uuid,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    held: &[HeldHour<'_>],
    mut each: impl FnMut(Micros, f64),
) -> Result<u64, tokio_postgres::Error> {
    let (lo, hi) = (from.timestamp_micros(), to.timestamp_micros());
    // The first instant not fed yet.
    let mut next = lo;
    let mut fed = 0;
    for (hour, pieces) in held {
        let (start, end) = ((*hour).max(lo), (hour + HOUR_MICROS - 1).min(hi));
        if start > end {
            continue;
        }
        if next < start {
            readings::each_reading(&**tx, sensor, time(next), time(start - 1), &mut each).await?;
        }
        for &(at, value) in pieces.iter().flat_map(|p| p.iter()) {
            if at >= start && at <= end {
                each(at, value);
                fed += 1;
            }
        }
        next = end + 1;
    }
    if next <= hi {
        readings::each_reading(&**tx, sensor, time(next), to, &mut each).await?;
    }
    Ok(fed)
}
