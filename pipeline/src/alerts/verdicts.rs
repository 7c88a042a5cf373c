//! Verdicts: the stored anomalies of a judged range, and bringing them in line with what the
//! detector found (open, resolve, reopen, refresh).

use super::*;

/// One stored anomaly of the judged range.
pub(super) struct Stored {
    pub(super) end: DateTime<Utc>,
    pub(super) value: Option<f64>,
    pub(super) expected: Option<f64>,
    pub(super) score: f64,
    pub(super) state: State,
}

/// A stored anomaly from the columns `kind, start_ts, end_ts, value, expected, score, state`
/// starting at column `at`.
pub(super) fn stored_row(r: &tokio_postgres::Row, at: usize) -> Option<((Kind, i64), Stored)> {
    let kind: Kind = r.get::<_, &str>(at).parse().ok()?;
    let start: DateTime<Utc> = r.get(at + 1);
    let state = if r.get::<_, &str>(at + 6) == "open" {
        State::Open
    } else {
        State::Resolved
    };
    Some((
        (kind, start.timestamp_micros()),
        Stored {
            end: r.get(at + 2),
            value: r.get(at + 3),
            expected: r.get(at + 4),
            score: r.get(at + 5),
            state,
        },
    ))
}

/// Brings the stored anomalies of a judged range (`stored`) in line with what was `found` there:
/// opens, reopens, refreshes, resolves. With `decided_through` (a resumed detector's end and what
/// it left undecided), stored anomalies that start before that end are left alone unless
/// undecided. (One that starts at the end itself — a gap after its last reading, say — was found
/// by readings the detector had not seen: it is judged again.)
pub(super) async fn reconcile(
    tx: &Tx<'_>,
    sensor: Uuid,
    found: &[Anomaly],
    mut stored: HashMap<(Kind, i64), Stored>,
    decided_through: Option<&(i64, Vec<(Kind, i64)>)>,
    key: &str,
    changes: &mut Detected,
) -> Result<(), tokio_postgres::Error> {
    for a in found {
        let start = time(a.start);
        let end = time(a.end);
        let kind = a.kind.as_str();
        let common: [&(dyn ToSql + Sync); 7] = [
            &sensor,
            &start,
            &kind,
            &end,
            &a.value,
            &a.expected,
            &a.score,
        ];
        match stored.remove(&(a.kind, a.start)) {
            None => {
                execute(
                    tx,
                    "INSERT INTO anomalies (sensor_uuid, start_ts, kind, end_ts, value, expected,
                         score, state, object_key)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, 'open', $8)",
                    &[&common[..], &[&key]].concat(),
                )
                .await?;
                changes.opened.push(a.kind);
            }
            Some(s) if s.state == State::Resolved => {
                execute(
                    tx,
                    "UPDATE anomalies SET end_ts = $4, value = $5, expected = $6, score = $7,
                         state = 'open', object_key = $8, revision = revision + 1,
                         updated_at = now()
                     WHERE sensor_uuid = $1 AND start_ts = $2 AND kind = $3",
                    &[&common[..], &[&key]].concat(),
                )
                .await?;
                changes.opened.push(a.kind);
            }
            Some(s) if !same(&s, a, end) => {
                execute(
                    tx,
                    "UPDATE anomalies SET end_ts = $4, value = $5, expected = $6, score = $7,
                         updated_at = now()
                     WHERE sensor_uuid = $1 AND start_ts = $2 AND kind = $3",
                    &common,
                )
                .await?;
            }
            Some(_) => {}
        }
    }
    for ((kind, start), s) in stored {
        if s.state != State::Open {
            continue;
        }
        if let Some((through, provisional)) = decided_through {
            if start < *through && !provisional.contains(&(kind, start)) {
                continue;
            }
        }
        execute(
            tx,
            "UPDATE anomalies SET state = $4, object_key = $5, revision = revision + 1,
                 updated_at = now()
             WHERE sensor_uuid = $1 AND start_ts = $2 AND kind = $3",
            &[
                &sensor,
                &time(start),
                &kind.as_str(),
                &State::Resolved.as_str(),
                &key,
            ],
        )
        .await?;
        changes.resolved.push(kind);
    }
    Ok(())
}

/// Whether a stored open anomaly already says what was found.
pub(super) fn same(s: &Stored, a: &Anomaly, end: DateTime<Utc>) -> bool {
    s.end == end && s.value == a.value && s.expected == a.expected && s.score == a.score
}
