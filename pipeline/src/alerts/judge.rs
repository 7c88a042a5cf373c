//! Judging a sensor's spans: resume a saved detector or warm one up, run it over the readings
//! (from memory where the objects' own readings provably are what was stored), and bring the
//! stored verdicts in line — for many sensors at once ([`judge_batch`]) or one ([`judge`]).
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

/// The readings of `sensor` that the batch's objects hold (`fresh`), in time order, when they are
/// exactly what its work rows (`spans`, first and last instant of each) stored: one held piece
/// per row, spanning it, and no two overlapping (overlapping objects may have overwritten each
/// other's readings; the stored ones are read back then). `None` otherwise.
pub(super) fn own_readings<'f>(
    fresh: &[&'f Held],
    sensor: Uuid,
    spans: &[(i64, i64)],
) -> Option<Vec<&'f [(i64, f64)]>> {
    let mut pieces: Vec<&[(i64, f64)]> = fresh
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

/// A saved detector: its end (`through`), its state, and the end of the sensor's newest one.
pub(super) type Saved = (DateTime<Utc>, Vec<u8>, DateTime<Utc>);

/// A sensor of a batch that resumes a saved detector.
pub(super) struct Resumed<'a> {
    pub(super) work: &'a Work,
    /// Readings after this are read from the database (the saved detector's end, or the span's
    /// end when the object's own readings were fed).
    pub(super) after: DateTime<Utc>,
    pub(super) detector: Detector,
    pub(super) judged_from: DateTime<Utc>,
    pub(super) judged_to: DateTime<Utc>,
    pub(super) decided: (i64, Vec<(Kind, i64)>),
    pub(super) snapshot: Option<Detector>,
    /// When the judged range goes on past the span: the detector at the span's end, saved too
    /// (later corrections of the data after it resume it instead of a warm-up).
    pub(super) at_span_end: Option<Detector>,
    pub(super) found: Vec<Anomaly>,
}

/// [`judge`] for many sensors at once: those with one span here and a saved detector to resume
/// share each statement (saved detectors, readings, stored anomalies, saving); the rest are
/// judged one by one.
pub(super) async fn judge_batch(
    tx: &Tx<'_>,
    work: &[Work],
    fresh: &[&Held],
    changes: &mut Detected,
) -> Result<(), tokio_postgres::Error> {
    let memory = chrono::Duration::microseconds(WARM_UP_MICROS);
    let ours: Vec<i64> = work.iter().map(|w| w.id).collect();
    let mut spans: HashMap<Uuid, Vec<(i64, i64)>> = HashMap::new();
    for w in work {
        spans
            .entry(w.sensor)
            .or_default()
            .push((w.from.timestamp_micros(), w.to.timestamp_micros()));
    }
    let work = one_span_per_sensor(work);
    let work = &work[..];
    let single: Vec<&Work> = work.iter().collect();
    let sensors: Vec<Uuid> = single.iter().map(|w| w.sensor).collect();
    let froms: Vec<DateTime<Utc>> = single.iter().map(|w| w.from).collect();
    // The newest saved detector before each span, and the newest of each sensor.
    let mut bases: HashMap<Uuid, Saved> = query(
        tx,
        "SELECT DISTINCT ON (d.sensor_uuid) d.sensor_uuid, d.through, d.state,
                    (SELECT max(e.through) FROM anomaly_detectors e
                     WHERE e.sensor_uuid = d.sensor_uuid)
             FROM anomaly_detectors d
             JOIN unnest($1::uuid[], $2::timestamptz[]) AS w(u, f)
               ON d.sensor_uuid = w.u AND d.through < w.f
             ORDER BY d.sensor_uuid, d.through DESC",
        &[&sensors, &froms],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
    .collect();
    let mut resumed = Vec::new();
    let mut alone: Vec<&Work> = Vec::new();
    // Sensors whose span other queued work overlaps (from the saved detectors' ends on): their
    // stored readings may not be this object's alone.
    let crowded: std::collections::HashSet<Uuid> = match fresh {
        [] => Default::default(),
        _ => {
            let afters: Vec<DateTime<Utc>> = single
                .iter()
                .map(|w| bases.get(&w.sensor).map_or(w.from, |b| b.0))
                .collect();
            let uptos: Vec<DateTime<Utc>> = single.iter().map(|w| w.to).collect();
            query(
                tx,
                "SELECT DISTINCT q.sensor_uuid FROM anomaly_work q
                 JOIN unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS c(u, after, upto)
                   ON q.sensor_uuid = c.u AND q.span_end > c.after AND q.span_start <= c.upto
                 WHERE NOT q.id = ANY($4)",
                &[&sensors, &afters, &uptos, &ours],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
        }
    };
    for w in single {
        let plan = bases
            .remove(&w.sensor)
            .filter(|(through, ..)| w.from - *through <= memory)
            .and_then(|(through, bytes, latest)| {
                let detector = Detector::from_bytes(&bytes)?;
                Some((through, detector, latest))
            });
        let Some((through, mut detector, latest)) = plan else {
            alone.push(w);
            continue;
        };
        let undecided = detector.unsettled_since().map_or(through, time);
        let decided = (through.timestamp_micros(), detector.provisional());
        // The objects' own readings are all there is after the saved detector: feed them.
        let own = Some(fresh)
            .filter(|_| latest == through && !crowded.contains(&w.sensor))
            .and_then(|f| own_readings(f, w.sensor, &spans[&w.sensor]));
        let mut found = Vec::new();
        let mut snapshot = None;
        let mut after = through;
        if let Some(own) = own {
            for &(at, value) in own.into_iter().flatten() {
                detector.push(at, value, &mut found);
            }
            snapshot = Some(detector.clone());
            after = w.to;
            changes.fed += 1;
        }
        resumed.push(Resumed {
            work: w,
            after,
            detector,
            judged_from: undecided.min(w.from),
            judged_to: if latest > w.to && latest - w.to <= memory {
                latest
            } else {
                w.to
            },
            decided,
            snapshot,
            at_span_end: None,
            found,
        });
    }
    alone.sort_by_key(|w| w.id);
    for w in alone {
        judge(tx, w.sensor, (w.from, w.to), &w.key, fresh, changes).await?;
    }
    if resumed.is_empty() {
        return Ok(());
    }
    changes.resumed += resumed.len();

    // Every resumed sensor's readings after its detector, and a tail, in one stream.
    let index: HashMap<Uuid, usize> = resumed
        .iter()
        .enumerate()
        .map(|(i, r)| (r.work.sensor, i))
        .collect();
    let us: Vec<Uuid> = resumed.iter().map(|r| r.work.sensor).collect();
    let afters: Vec<DateTime<Utc>> = resumed.iter().map(|r| r.after).collect();
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
        let value: f64 = row.try_get(2)?;
        let r = &mut resumed[index[&sensor]];
        if at > r.work.to.timestamp_micros() && r.judged_to > r.work.to && r.at_span_end.is_none() {
            r.at_span_end = Some(r.detector.clone());
        }
        if at > r.judged_to.timestamp_micros() && r.snapshot.is_none() {
            r.snapshot = Some(r.detector.clone());
        }
        r.detector.push(at, value, &mut r.found);
    }
    for r in &mut resumed {
        if r.snapshot.is_none() {
            r.snapshot = Some(r.detector.clone());
        }
        r.detector.finish(&mut r.found);
        let (lo, hi) = (
            r.judged_from.timestamp_micros(),
            r.judged_to.timestamp_micros(),
        );
        r.found.retain(|a| a.start >= lo && a.start <= hi);
    }

    // The stored anomalies of every judged range.
    let los: Vec<DateTime<Utc>> = resumed.iter().map(|r| r.judged_from).collect();
    let mut stored: HashMap<Uuid, HashMap<(Kind, i64), Stored>> = HashMap::new();
    for row in query(
        tx,
        "SELECT a.sensor_uuid, a.kind, a.start_ts, a.end_ts, a.value, a.expected, a.score,
                    a.state
             FROM anomalies a
             JOIN unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(u, lo, hi)
               ON a.sensor_uuid = w.u AND a.start_ts >= w.lo AND a.start_ts <= w.hi",
        &[&us, &los, &uptos],
    )
    .await?
    {
        if let Some((k, v)) = stored_row(&row, 1) {
            stored.entry(row.get(0)).or_default().insert(k, v);
        }
    }
    for r in &resumed {
        let s = stored.remove(&r.work.sensor).unwrap_or_default();
        reconcile(
            tx,
            r.work.sensor,
            &r.found,
            s,
            Some(&r.decided),
            &r.work.key,
            changes,
        )
        .await?;
    }

    // Save the detectors, in place of those the spans made stale; keep the newest few.
    let changed: Vec<DateTime<Utc>> = resumed.iter().map(|r| r.work.from).collect();
    execute(
        tx,
        "DELETE FROM anomaly_detectors d USING unnest($1::uuid[], $2::timestamptz[]) AS w(u, f)
         WHERE d.sensor_uuid = w.u AND d.through >= w.f",
        &[&us, &changed],
    )
    .await?;
    let mut saved_us = Vec::new();
    let mut throughs = Vec::new();
    let mut states = Vec::new();
    for r in &resumed {
        let snapshot = r.snapshot.as_ref().expect("set above");
        // (The same detector when no reading lies between the span's end and the range's.)
        let at_span_end = r
            .at_span_end
            .as_ref()
            .filter(|d| d.last_reading() != snapshot.last_reading());
        for detector in [Some(snapshot), at_span_end].into_iter().flatten() {
            if let Some(last) = detector.last_reading() {
                saved_us.push(r.work.sensor);
                throughs.push(time(last));
                states.push(detector.to_bytes());
            }
        }
    }
    execute(
        tx,
        "INSERT INTO anomaly_detectors (sensor_uuid, through, state)
         SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::bytea[])
         ON CONFLICT (sensor_uuid, through) DO UPDATE
             SET state = EXCLUDED.state, updated_at = now()",
        &[&saved_us, &throughs, &states],
    )
    .await?;
    execute(
        tx,
        "DELETE FROM anomaly_detectors d WHERE d.sensor_uuid = ANY($1) AND d.through < (
             SELECT e.through FROM anomaly_detectors e WHERE e.sensor_uuid = d.sensor_uuid
             ORDER BY e.through DESC OFFSET $2 LIMIT 1)",
        &[&us, &(SAVED_DETECTORS as i64 - 1)],
    )
    .await?;
    Ok(())
}

/// Detects over one span of one sensor and brings the stored anomalies of its judged range in
/// line with what was found.
pub(super) async fn judge(
    tx: &Tx<'_>,
    sensor: Uuid,
    (from, to): (DateTime<Utc>, DateTime<Utc>),
    key: &str,
    fresh: &[&Held],
    changes: &mut Detected,
) -> Result<(), tokio_postgres::Error> {
    // The newest saved detector from before the span (to resume), and the newest of all.
    let memory = chrono::Duration::microseconds(WARM_UP_MICROS);
    let base: Option<(DateTime<Utc>, Vec<u8>)> = tx
        .query_opt(
            &st(
                tx,
                "SELECT through, state FROM anomaly_detectors
             WHERE sensor_uuid = $1 AND through < $2 ORDER BY through DESC LIMIT 1",
            )
            .await?,
            &[&sensor, &from],
        )
        .await?
        .map(|r| (r.get(0), r.get(1)));
    let latest: Option<DateTime<Utc>> = tx
        .query_one(
            &st(
                tx,
                "SELECT max(through) FROM anomaly_detectors WHERE sensor_uuid = $1",
            )
            .await?,
            &[&sensor],
        )
        .await?
        .get(0);
    // Readings before a saved detector's end changed: read on to the newest one's end (when it
    // is within the detector's memory), judge all of it and save the detector there afresh.
    let judged_to = match latest {
        Some(t) if t > to && t - to <= memory => t,
        _ => to,
    };
    // Resume when a saved detector ends before the span, not too long before it.
    let resumed = base
        .filter(|(through, _)| from - *through <= memory)
        .and_then(|(through, bytes)| Some((through, Detector::from_bytes(&bytes)?)));
    // Resumed: stored anomalies up to `through` were decided before, except the provisional ones.
    let mut decided_through: Option<(i64, Vec<(Kind, i64)>)> = None;
    let (mut detector, read_from, judged_from) = match resumed {
        Some((through, detector)) => {
            // Nothing before what was undecided when it stopped can change.
            let undecided = detector.unsettled_since().map_or(through, time);
            let read_from = through + chrono::Duration::microseconds(1);
            decided_through = Some((through.timestamp_micros(), detector.provisional()));
            changes.resumed += 1;
            (detector, read_from, undecided.min(from))
        }
        None => match readings::nth_before(&**tx, sensor, from, LOOKBACK).await? {
            // No reading before the span (the sensor's first data, or all of it again): no
            // warm-up to look for.
            None => (Detector::default(), from, from),
            Some(judged_from) => {
                let warm =
                    readings::warm_up_from(&**tx, sensor, judged_from, memory, WARM_UP_READINGS)
                        .await?;
                let cap =
                    readings::nth_before(&**tx, sensor, judged_from, WARM_UP_MAX_READINGS).await?;
                let read_from = cap.map_or(warm, |c| c.max(warm));
                (Detector::default(), read_from, judged_from)
            }
        },
    };
    let read_to = readings::nth_after(&**tx, sensor, judged_to, TAIL).await?;
    let mut found = Vec::new();
    // The state to save: after the last reading judged, before the tail.
    let mut snapshot = None;
    // And when the judged range goes on past the span, the detector at the span's end (later
    // corrections of what follows resume it instead of a warm-up).
    let mut at_span_end = None;
    let last_judged = judged_to.timestamp_micros();
    let span_end = to.timestamp_micros();
    let held = held_hours(tx, sensor, fresh).await?;
    let feed = |at, value| {
        if at > span_end && last_judged > span_end && at_span_end.is_none() {
            at_span_end = Some(detector.clone());
        }
        if at > last_judged && snapshot.is_none() {
            snapshot = Some(detector.clone());
        }
        detector.push(at, value, &mut found)
    };
    changes.held += each_reading_held(tx, sensor, (read_from, read_to), &held, feed).await?;
    let snapshot = snapshot.unwrap_or_else(|| detector.clone());
    detector.finish(&mut found);
    save_state(tx, sensor, &snapshot, at_span_end.as_ref(), from).await?;
    let (lo, hi) = (judged_from.timestamp_micros(), last_judged);
    found.retain(|a| a.start >= lo && a.start <= hi);
    let (judged_from, to) = (judged_from, judged_to);

    let stored: HashMap<(Kind, i64), Stored> = query(
        tx,
        "SELECT kind, start_ts, end_ts, value, expected, score, state FROM anomalies
             WHERE sensor_uuid = $1 AND start_ts >= $2 AND start_ts <= $3",
        &[&sensor, &judged_from, &to],
    )
    .await?
    .iter()
    .filter_map(|r| stored_row(r, 0))
    .collect();
    reconcile(
        tx,
        sensor,
        &found,
        stored,
        decided_through.as_ref(),
        key,
        changes,
    )
    .await
}
