//! Saved detectors: the newest few states per sensor, which a later span resumes.

use super::*;

/// Saves the detector after a detection, in place of those it makes stale (saved after `changed_from`,
/// the first reading the detected span changed: their windows may hold values no longer stored),
/// keeping the newest [`SAVED_DETECTORS`] per sensor.
pub(super) async fn save_state(
    tx: &Tx<'_>,
    sensor: Uuid,
    snapshot: &Detector,
    at_span_end: Option<&Detector>,
    changed_from: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    execute(
        tx,
        "DELETE FROM anomaly_detectors WHERE sensor_uuid = $1 AND through >= $2",
        &[&sensor, &changed_from],
    )
    .await?;
    for detector in [Some(snapshot), at_span_end].into_iter().flatten() {
        let Some(last) = detector.last_reading().map(time) else {
            continue;
        };
        execute(
            tx,
            "INSERT INTO anomaly_detectors (sensor_uuid, through, state) VALUES ($1, $2, $3)
             ON CONFLICT (sensor_uuid, through) DO UPDATE
                 SET state = EXCLUDED.state, updated_at = now()",
            &[&sensor, &last, &detector.to_bytes()],
        )
        .await?;
    }
    execute(
        tx,
        "DELETE FROM anomaly_detectors WHERE sensor_uuid = $1 AND through < (
             SELECT through FROM anomaly_detectors WHERE sensor_uuid = $1
             ORDER BY through DESC OFFSET $2 LIMIT 1)",
        &[&sensor, &(SAVED_DETECTORS as i64 - 1)],
    )
    .await?;
    Ok(())
}
