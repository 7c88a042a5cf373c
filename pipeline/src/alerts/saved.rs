//! Saved detectors: the newest few states per sensor, which a later span resumes.

use super::*;

/// Saves each judged sensor's detector (and the one at its span's end, when the judged range
/// went on past it) in place of those its span made stale — saved at or after the span's start:
/// their windows may hold values no longer stored — keeping the newest [`SAVED_DETECTORS`] per
/// sensor.
pub(super) async fn save(tx: &Tx<'_>, judged: &[Judging<'_>]) -> Result<(), tokio_postgres::Error> {
    let us: Vec<Uuid> = judged.iter().map(|j| j.work.sensor).collect();
    let changed: Vec<DateTime<Utc>> = judged.iter().map(|j| j.work.from).collect();
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
    for j in judged {
        let snapshot = j
            .snapshot
            .as_ref()
            .expect("set when the detection finished");
        // (The same detector when no reading lies between the span's end and the range's.)
        let at_span_end = j
            .at_span_end
            .as_ref()
            .filter(|d| d.last_reading() != snapshot.last_reading());
        for detector in [Some(snapshot), at_span_end].into_iter().flatten() {
            if let Some(last) = detector.last_reading() {
                saved_us.push(j.work.sensor);
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
