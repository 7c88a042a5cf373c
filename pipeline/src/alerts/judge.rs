//! Judging a sensor's spans: resume a saved detector or warm one up, run it over the readings
//! (from memory where the objects' own readings provably are what was stored), and bring the
//! stored verdicts in line — one path for a batch of sensors and for one ([`judge`]).
//!
//! # Resuming, and bounds
//!
//! Data mostly arrives in time order, and re-reading a warm-up for every object would cost more
//! than ingesting it. So after each detection the sensor's detector is saved as it was after the
//! last reading judged (`anomaly_detectors`, the newest [`SAVED_DETECTORS`]: a few kilobytes each,
//! see [`Detector::to_bytes`]). A span resumes the newest one saved before it (within the
//! detector's memory) and reads only from there; then only the anomalies that detector had not
//! decided yet ([`Detector::provisional`]) and those after its end are judged again: what it
//! decided cannot change by appending. When the object's own readings are all that lies after
//! that detector (it is the newest saved, no other queued work overlaps the span, and the merge
//! stored every one of them: [`crate::readings::Held`]), they are fed to it from memory
//! and only the tail is read. Without one (the first data, late data, corrections) the
//! detection starts from a warm-up before the span — the one `query-cli anomalies` uses
//! ([`WARM_UP_MICROS`] and [`WARM_UP_READINGS`]), capped at [`WARM_UP_MAX_READINGS`] for sensors
//! that read more often than every 23 s; given the objects' readings ([`Alerts::detect_held`]:
//! `ingest` keeps those of re-uploads), it feeds the hours they provably are all of from memory
//! (see [`Link`](crate::store::write::Link)) and reads back only the rest. Either way, when
//! readings before a saved detector's end changed, the detection reads on to the newest one's
//! end (within the memory), judges all of it, and replaces the detectors it made stale with one
//! saved there.

use super::*;
use crate::time::Micros;

/// The readings of `sensor` that the batch's objects hold (`fresh`), in time order, when they are
/// exactly what its work rows (`spans`, first and last instant of each) stored: one held piece
/// per row, spanning it, and no two overlapping (overlapping objects may have overwritten each
/// other's readings; the stored ones are read back then). `None` otherwise.
pub(super) fn own_readings<'f>(
    fresh: &[&'f Held],
    sensor: Uuid,
    spans: &[(Micros, Micros)],
) -> Option<Vec<&'f [(Micros, f64)]>> {
    let mut pieces: Vec<&[(Micros, f64)]> = fresh
        .iter()
        .filter_map(|f| f.readings.get(&sensor).map(Vec::as_slice))
        .collect();
    if pieces.len() != spans.len() || pieces.iter().any(|p| p.is_empty()) {
        return None;
    }
    pieces.sort_by_key(|p| p[0].0);
    let mut spans = spans.to_vec();
    spans.sort_unstable();
    let spanning = pieces
        .iter()
        .zip(&spans)
        .all(|(p, s)| (p[0].0, p[p.len() - 1].0) == *s);
    let apart = pieces
        .windows(2)
        .all(|w| w[0][w[0].len() - 1].0 < w[1][0].0);
    (spanning && apart).then_some(pieces)
}

/// One sensor's span being judged: its detector as it runs over the readings, what it found,
/// and the states to save.
pub(super) struct Judging<'a> {
    pub(super) work: &'a Work,
    pub(super) detector: Detector,
    /// The anomalies starting here are judged again: from what the resumed detector left
    /// undecided, or [`LOOKBACK`] readings before the span.
    pub(super) judged_from: DateTime<Utc>,
    /// And up to here: the span's end, or the newest saved detector's end when the span changed
    /// readings before it (within the detector's memory).
    pub(super) judged_to: DateTime<Utc>,
    /// A resumed detector's end and what it left undecided (see [`reconcile`]).
    pub(super) decided: Option<(i64, Vec<(Kind, i64)>)>,
    /// The state to save: after the last reading judged, before the tail.
    pub(super) snapshot: Option<Detector>,
    /// When the judged range goes on past the span: the detector at the span's end, saved too
    /// (later corrections of the data after it resume it instead of a warm-up).
    pub(super) at_span_end: Option<Detector>,
    pub(super) found: Vec<Anomaly>,
}

impl<'a> Judging<'a> {
    fn new(
        work: &'a Work,
        detector: Detector,
        judged_from: DateTime<Utc>,
        latest: Option<DateTime<Utc>>,
    ) -> Self {
        let memory = chrono::Duration::microseconds(WARM_UP_MICROS);
        let judged_to = match latest {
            Some(t) if t > work.to && t - work.to <= memory => t,
            _ => work.to,
        };
        Judging {
            work,
            detector,
            judged_from,
            judged_to,
            decided: None,
            snapshot: None,
            at_span_end: None,
            found: Vec::new(),
        }
    }

    /// Feeds the next reading, keeping the states to save as the judged range and the span end.
    fn push(&mut self, at: Micros, value: f64) {
        let (span_end, last_judged) = (
            self.work.to.timestamp_micros(),
            self.judged_to.timestamp_micros(),
        );
        if at > span_end && last_judged > span_end && self.at_span_end.is_none() {
            self.at_span_end = Some(self.detector.clone());
        }
        if at > last_judged && self.snapshot.is_none() {
            self.snapshot = Some(self.detector.clone());
        }
        self.detector.push(at, value, &mut self.found);
    }

    /// After the last reading: the anomalies found within the judged range.
    fn finish(&mut self) {
        if self.snapshot.is_none() {
            self.snapshot = Some(self.detector.clone());
        }
        self.detector.finish(&mut self.found);
        let (lo, hi) = (
            self.judged_from.timestamp_micros(),
            self.judged_to.timestamp_micros(),
        );
        self.found.retain(|a| a.start >= lo && a.start <= hi);
    }
}

/// A sensor's saved detectors: the newest one's end, and the newest saved before the span (its
/// end and state: the one to resume).
#[derive(Default)]
struct Saved {
    newest: Option<DateTime<Utc>>,
    base: Option<(DateTime<Utc>, Vec<u8>)>,
}

/// Judges the spans of `work` (each sensor's rows as one span) and brings the stored verdicts in
/// line. Sensors with a saved detector to resume share each statement (readings, stored
/// anomalies, saving); the others warm up one by one ([`warm_up`]).
pub(super) async fn judge(
    tx: &Tx<'_>,
    work: &[Work],
    fresh: &[&Held],
    changes: &mut Detected,
) -> Result<(), tokio_postgres::Error> {
    let memory = chrono::Duration::microseconds(WARM_UP_MICROS);
    let ours: Vec<i64> = work.iter().map(|w| w.id).collect();
    let mut spans: HashMap<Uuid, Vec<(Micros, Micros)>> = HashMap::new();
    for w in work {
        spans
            .entry(w.sensor)
            .or_default()
            .push((w.from.timestamp_micros(), w.to.timestamp_micros()));
    }
    let work = one_span_per_sensor(work);
    let sensors: Vec<Uuid> = work.iter().map(|w| w.sensor).collect();
    let froms: Vec<DateTime<Utc>> = work.iter().map(|w| w.from).collect();
    // Each sensor's newest saved detector, and the newest saved before its span (to resume).
    let mut saved: HashMap<Uuid, Saved> = query(
        tx,
        "SELECT w.u, newest.through, base.through, base.state
             FROM unnest($1::uuid[], $2::timestamptz[]) AS w(u, f)
             CROSS JOIN LATERAL (
                 SELECT max(through) AS through FROM anomaly_detectors WHERE sensor_uuid = w.u
             ) AS newest
             LEFT JOIN LATERAL (
                 SELECT through, state FROM anomaly_detectors
                 WHERE sensor_uuid = w.u AND through < w.f ORDER BY through DESC LIMIT 1
             ) AS base ON true",
        &[&sensors, &froms],
    )
    .await?
    .iter()
    .map(|r| {
        let base = r.get::<_, Option<DateTime<Utc>>>(2).map(|t| (t, r.get(3)));
        (
            r.get(0),
            Saved {
                newest: r.get(1),
                base,
            },
        )
    })
    .collect();
    // Sensors whose span other queued work overlaps (from the saved detectors' ends on): their
    // stored readings may not be this object's alone. Our own work rows are left out by an anti
    // join planned for the ids at hand: under a generic plan (a cached statement run more than
    // five times) `NOT q.id = ANY($4)` scans the array per row, and `unnest($4)` is taken for ten
    // rows (a nested loop again) — 16.8 s instead of 79 ms with 25,600 ids against 300,000
    // queued rows, and `ingest --all` of objects that each write a hundred sensors took up to a
    // minute.
    let crowded: std::collections::HashSet<Uuid> = match fresh {
        [] => Default::default(),
        _ => {
            let afters: Vec<DateTime<Utc>> = work
                .iter()
                .map(|w| saved[&w.sensor].base.as_ref().map_or(w.from, |b| b.0))
                .collect();
            let uptos: Vec<DateTime<Utc>> = work.iter().map(|w| w.to).collect();
            // Planned for these ids each time (not a cached statement): see above.
            tx.query(
                "SELECT DISTINCT q.sensor_uuid FROM anomaly_work q
                 JOIN unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS c(u, after, upto)
                   ON q.sensor_uuid = c.u AND q.span_end > c.after AND q.span_start <= c.upto
                 WHERE NOT EXISTS (SELECT FROM unnest($4::bigint[]) AS o(id) WHERE o.id = q.id)",
                &[&sensors, &afters, &uptos, &ours],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
        }
    };
    let mut resumed = Vec::new();
    // Readings after each resumed detector are read from the database after this instant (its
    // end, or the span's end when the object's own readings were fed).
    let mut afters = Vec::new();
    let mut alone: Vec<(&Work, Option<DateTime<Utc>>)> = Vec::new();
    for w in &work {
        let Saved {
            newest: latest,
            base,
        } = saved.remove(&w.sensor).unwrap_or_default();
        let plan = base
            .filter(|(through, _)| w.from - *through <= memory)
            .and_then(|(through, bytes)| Some((through, Detector::from_bytes(&bytes)?)));
        let Some((through, detector)) = plan else {
            alone.push((w, latest));
            continue;
        };
        // Nothing before what was undecided when it stopped can change.
        let undecided = detector.unsettled_since().map_or(through, time);
        let decided = (through.timestamp_micros(), detector.provisional());
        let mut j = Judging::new(w, detector, undecided.min(w.from), latest);
        j.decided = Some(decided);
        // The objects' own readings are all there is after the saved detector: feed them.
        let own = Some(fresh)
            .filter(|_| latest == Some(through) && !crowded.contains(&w.sensor))
            .and_then(|f| own_readings(f, w.sensor, &spans[&w.sensor]));
        let mut after = through;
        if let Some(own) = own {
            for &(at, value) in own.into_iter().flatten() {
                j.push(at, value);
            }
            j.snapshot = Some(j.detector.clone());
            after = w.to;
            changes.fed += 1;
        }
        resumed.push(j);
        afters.push(after);
    }
    changes.resumed += resumed.len();
    alone.sort_by_key(|(w, _)| w.id);
    let mut judged = Vec::with_capacity(work.len());
    for (w, latest) in alone {
        judged.push(warm_up(tx, w, latest, fresh, changes).await?);
    }
    if !resumed.is_empty() {
        read_on(tx, &mut resumed, &afters).await?;
    }
    judged.append(&mut resumed);
    for j in &mut judged {
        j.finish();
    }
    reconcile_all(tx, &judged, changes).await?;
    save(tx, &judged).await
}

/// A detector warmed up for a sensor with no saved one to resume, run over its span: from a
/// warm-up before it (the one `query-cli anomalies` uses, [`WARM_UP_MICROS`] and
/// [`WARM_UP_READINGS`], capped at [`WARM_UP_MAX_READINGS`]), the hours the objects' readings
/// provably are all of fed from memory ([`held_hours`]) and the rest read.
async fn warm_up<'a>(
    tx: &Tx<'_>,
    w: &'a Work,
    latest: Option<DateTime<Utc>>,
    fresh: &[&Held],
    changes: &mut Detected,
) -> Result<Judging<'a>, tokio_postgres::Error> {
    let memory = chrono::Duration::microseconds(WARM_UP_MICROS);
    let (sensor, from) = (w.sensor, w.from);
    let (read_from, judged_from) = match readings::nth_before(&**tx, sensor, from, LOOKBACK).await?
    {
        // No reading before the span (the sensor's first data, or all of it again): no warm-up
        // to look for.
        None => (from, from),
        Some(judged_from) => {
            let warm = readings::warm_up_from(&**tx, sensor, judged_from, memory, WARM_UP_READINGS)
                .await?;
            let cap =
                readings::nth_before(&**tx, sensor, judged_from, WARM_UP_MAX_READINGS).await?;
            (cap.map_or(warm, |c| c.max(warm)), judged_from)
        }
    };
    let mut j = Judging::new(w, Detector::default(), judged_from, latest);
    let read_to = readings::nth_after(&**tx, sensor, j.judged_to, TAIL).await?;
    let held = held_hours(tx, sensor, fresh).await?;
    changes.held += each_reading_held(tx, sensor, (read_from, read_to), &held, |at, value| {
        j.push(at, value)
    })
    .await?;
    Ok(j)
}

/// Every resumed sensor's readings after `afters`, and a tail, in one stream.
async fn read_on(
    tx: &Tx<'_>,
    resumed: &mut [Judging<'_>],
    afters: &[DateTime<Utc>],
) -> Result<(), tokio_postgres::Error> {
    let index: HashMap<Uuid, usize> = resumed
        .iter()
        .enumerate()
        .map(|(i, r)| (r.work.sensor, i))
        .collect();
    let us: Vec<Uuid> = resumed.iter().map(|r| r.work.sensor).collect();
    let uptos: Vec<DateTime<Utc>> = resumed.iter().map(|r| r.judged_to).collect();
    let tail = TAIL as i64;
    let params: [&(dyn ToSql + Sync); 4] = [&us, &afters, &uptos, &tail];
    let rows = tx
        .query_raw(
            &st(
                tx,
                "SELECT w.u, m.ts, m.value
             FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(u, after, upto)
             CROSS JOIN LATERAL (
                 (SELECT ts, value FROM measurements
                  WHERE sensor_uuid = w.u AND ts > w.after AND ts <= w.upto)
                 UNION ALL
                 (SELECT ts, value FROM measurements
                  WHERE sensor_uuid = w.u AND ts > w.upto ORDER BY ts LIMIT $4)
             ) AS m
             ORDER BY w.u, m.ts",
            )
            .await?,
            params.iter().copied(),
        )
        .await?;
    let mut rows = std::pin::pin!(rows);
    while let Some(row) = futures_util::TryStreamExt::try_next(&mut rows).await? {
        let sensor: Uuid = row.try_get(0)?;
        let at = row.try_get::<_, DateTime<Utc>>(1)?.timestamp_micros();
        resumed[index[&sensor]].push(at, row.try_get(2)?);
    }
    Ok(())
}

/// The stored anomalies of every judged range, brought in line with what was found there.
async fn reconcile_all(
    tx: &Tx<'_>,
    judged: &[Judging<'_>],
    changes: &mut Detected,
) -> Result<(), tokio_postgres::Error> {
    let us: Vec<Uuid> = judged.iter().map(|j| j.work.sensor).collect();
    let los: Vec<DateTime<Utc>> = judged.iter().map(|j| j.judged_from).collect();
    let his: Vec<DateTime<Utc>> = judged.iter().map(|j| j.judged_to).collect();
    let mut stored: HashMap<Uuid, HashMap<(Kind, i64), Stored>> = HashMap::new();
    for row in query(
        tx,
        "SELECT a.sensor_uuid, a.kind, a.start_ts, a.end_ts, a.value, a.expected, a.score,
                    a.state
             FROM anomalies a
             JOIN unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(u, lo, hi)
               ON a.sensor_uuid = w.u AND a.start_ts >= w.lo AND a.start_ts <= w.hi",
        &[&us, &los, &his],
    )
    .await?
    {
        if let Some((k, v)) = stored_row(&row, 1) {
            stored.entry(row.get(0)).or_default().insert(k, v);
        }
    }
    for j in judged {
        let s = stored.remove(&j.work.sensor).unwrap_or_default();
        reconcile(
            tx,
            j.work.sensor,
            &j.found,
            s,
            j.decided.as_ref(),
            &j.work.key,
            changes,
        )
        .await?;
    }
    Ok(())
}
