//! The set-based merge of staged rows: new readings inserted as they are, the others upserted
//! where their version beats the stored row's, the rollup and page index kept in step; for one
//! object or a group of small ones.

use super::*;

/// What follows the rows to upsert in [`MERGE_MEASUREMENTS`] and [`MERGE_GROUP`]: the version
/// check, the rollup and page index, and the result (rows written; the inexact hours, with the
/// rows written in each and their lowest and highest value).
macro_rules! upsert_rest {
    () => {
        concat!(
            "
        ON CONFLICT (sensor_uuid, ts) DO UPDATE SET value = EXCLUDED.value, version = EXCLUDED.version
        WHERE ",
    incoming_beats_stored!(),
    "
        RETURNING target.sensor_uuid, target.ts, target.value, target.xmax = 0 AS inserted
    ), hours AS (
        SELECT sensor_uuid, date_trunc('hour', ts, 'UTC') AS hour,
               count(*) AS written, count(*) FILTER (WHERE inserted) AS added,
               bool_and(inserted) AS only_added,
               min(value) AS low, max(value) AS high, sum(value) AS total,
               min(ts) AS first_at, (array_agg(value ORDER BY ts))[1] AS first_value,
               max(ts) AS last_at, (array_agg(value ORDER BY ts DESC))[1] AS last_value
        FROM merged GROUP BY 1, 2
    ), rolled AS (
        INSERT INTO measurement_hours AS h (sensor_uuid, hour, exact, ",
    rollup_columns!(),
    ")
        SELECT sensor_uuid, hour, only_added, added, low, high, total, first_at, first_value,
               last_at, last_value
        FROM hours ORDER BY 1, 2
        ON CONFLICT (sensor_uuid, hour) DO UPDATE SET exact = h.exact AND EXCLUDED.exact, ",
    widen_set!(),
    "
    ), days AS (
        INSERT INTO measurement_days AS d (sensor_uuid, day, readings)
        SELECT sensor_uuid, date_trunc('day', hour, 'UTC'), sum(added)
        FROM hours
        GROUP BY 1, 2 HAVING sum(added) > 0 ORDER BY 1, 2
        ON CONFLICT (sensor_uuid, day) DO UPDATE SET readings = d.readings + EXCLUDED.readings
    )
    SELECT (SELECT coalesce(sum(written), 0)::bigint FROM hours),
           ARRAY(SELECT sensor_uuid FROM hours WHERE NOT only_added ORDER BY 1, hour),
           ARRAY(SELECT hour FROM hours WHERE NOT only_added ORDER BY sensor_uuid, 1),
           ARRAY(SELECT written FROM hours WHERE NOT only_added ORDER BY sensor_uuid, hour),
           ARRAY(SELECT low FROM hours WHERE NOT only_added ORDER BY sensor_uuid, hour),
           ARRAY(SELECT high FROM hours WHERE NOT only_added ORDER BY sensor_uuid, hour),
           ARRAY(SELECT total FROM hours WHERE NOT only_added ORDER BY sensor_uuid, hour),
           ARRAY(SELECT first_at FROM hours WHERE NOT only_added ORDER BY sensor_uuid, hour),
           ARRAY(SELECT first_value FROM hours WHERE NOT only_added ORDER BY sensor_uuid, hour),
           ARRAY(SELECT last_at FROM hours WHERE NOT only_added ORDER BY sensor_uuid, hour),
           ARRAY(SELECT last_value FROM hours WHERE NOT only_added ORDER BY sensor_uuid, hour)"
        )
    };
}

/// Upserts the last line of every key where this version beats the stored row's, then widens the
/// hourly rollup `measurement_hours` by the rows written (an hour with overwrites — `xmax` is 0
/// only for a freshly inserted row version — is marked inexact: the value replaced may have been
/// its extreme; [`EXACT_HOURS`] recomputes those) and adds the rows that were new to the page
/// index `measurement_days`, each in (sensor, hour/day) order so concurrent ingestions lock their
/// rows in one order. `$1` is the version. Returns the rows written and the inexact hours.
///
/// [`EXACT_HOURS`]: super::rollup::EXACT_HOURS
pub(super) const MERGE_MEASUREMENTS: &str = concat!(
    "WITH merged AS (
        INSERT INTO measurements AS target (sensor_uuid, ts, value, version)
        SELECT DISTINCT ON (sensor_uuid, ts) sensor_uuid, ts, value, $1::bigint
        FROM staging_rows
        WHERE reason IS NULL AND (object_version IS NULL OR object_version = $1)
        ORDER BY sensor_uuid, ts, line DESC
",
    upsert_rest!()
);

/// [`MERGE_MEASUREMENTS`] for all the versions staged in a group at once, when some reading of
/// the group is stored already or two of its objects share a key: of the group's own lines for one
/// key, the newest version's last line (the order of `sensors_version_beats`: write time, then key,
/// ETag and bucket in byte order); then the version check against the stored row. One statement,
/// so the rows are locked in key order as every other ingestion locks them (version after version,
/// two groups, or a group and a single object, could deadlock).
pub(super) const MERGE_GROUP: &str = concat!(
    "WITH merged AS (
        INSERT INTO measurements AS target (sensor_uuid, ts, value, version)
        SELECT DISTINCT ON (s.sensor_uuid, s.ts) s.sensor_uuid, s.ts, s.value, s.object_version
        FROM staging_rows AS s JOIN object_versions AS v ON v.version = s.object_version
        WHERE s.reason IS NULL
        ORDER BY s.sensor_uuid, s.ts, v.written_at DESC, v.object_key COLLATE \"C\" DESC,
            v.etag COLLATE \"C\" DESC, v.bucket COLLATE \"C\" DESC, s.line DESC
",
    upsert_rest!()
);

/// The start of [`INSERT_MEASUREMENTS`] and [`INSERT_COUNTED`]: whether no stored reading lies
/// within any sensor's span in the object (`fresh`), and if so the insert of the staged rows in
/// key order (`inserted`, its `RETURNING` clause to follow).
macro_rules! insert_if_fresh {
    () => {
    "
    WITH fresh AS (
        SELECT NOT EXISTS (
            SELECT FROM unnest($2::uuid[], $3::timestamptz[], $4::timestamptz[]) AS w(u, first, last)
            CROSS JOIN LATERAL (
                SELECT FROM measurements m
                WHERE m.sensor_uuid = w.u AND m.ts >= w.first AND m.ts <= w.last LIMIT 1
            ) AS stored
        ) AS fresh
    ), inserted AS (
        INSERT INTO measurements (sensor_uuid, ts, value, version)
        SELECT sensor_uuid, ts, value, coalesce(object_version, $1::bigint)
        FROM staging_rows, fresh WHERE reason IS NULL AND fresh.fresh
        ORDER BY sensor_uuid, ts"
    };
}

/// The fast path of a measurement object whose readings are all new: when no stored reading lies
/// within any sensor's span in the object (`$2`–`$4`: sensors, first and last instants; one index
/// probe per sensor — as a semi-join the planner hashed the whole table), a plain `INSERT` of the
/// staged rows (no speculative insertion: 40 % less server time than the upsert for 100,000 new
/// rows), and the hourly rollup and page index widened by the reader's
/// hours (`$5`–`$9`: sensors, hours, readings, lows, highs); otherwise nothing. Returns whether it
/// ran and the rows inserted. A repeated key within the object, or rows another ingestion inserted meanwhile, fail it
/// with a unique violation: [`merge`] runs it in a savepoint and falls back to
/// [`MERGE_MEASUREMENTS`]. Locks are taken in the upsert's order, so that the two cannot deadlock
/// (the upsert would report that as an error): the rows in key order, and all of them before the
/// page index and rollup — the main query counts them, which runs the insert first (the other
/// data-modifying CTEs run after the main query, the last one first).
pub(super) const INSERT_MEASUREMENTS: &str = concat!(
    insert_if_fresh!(),
    "
        RETURNING 1
    ), hours AS (
        SELECT * FROM ",
    unnest_hours!("$5", "$6", "$7", "$8", "$9", "$10", "$11", "$12", "$13", "$14"),
    ", fresh
        WHERE fresh.fresh
    )",
    widen_hours!(),
    "
    SELECT fresh, (SELECT count(*) FROM inserted) FROM fresh"
);

/// [`INSERT_MEASUREMENTS`] for an object whose reader could not keep its hours (more than
/// [`HOURS_MAX`] of them: a large object over a long span): the rollup and page index are widened
/// by the hours the insert counts from the rows it returns. Plain inserts where the upsert used to
/// run for such objects (16.5 M new readings of 100 sensors over 114 days: see the README).
pub(super) const INSERT_COUNTED: &str = concat!(
    insert_if_fresh!(),
    "
        RETURNING sensor_uuid, ts, value
    ), hours AS (
        SELECT sensor_uuid, date_trunc('hour', ts, 'UTC') AS hour, count(*) AS readings,
               min(value) AS low, max(value) AS high, sum(value) AS total,
               min(ts) AS first_at, (array_agg(value ORDER BY ts))[1] AS first_value,
               max(ts) AS last_at, (array_agg(value ORDER BY ts DESC))[1] AS last_value
        FROM inserted GROUP BY 1, 2
    )",
    widen_hours!(),
    "
    SELECT fresh, (SELECT count(*) FROM inserted) FROM fresh"
);

/// What a merge changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    /// Stored rows inserted or overwritten.
    pub changed: u64,
    /// The `anomaly_work` entries queued (one per sensor with valid rows in the object; a group's
    /// all in its last member's, see [`queue`]).
    pub work: Vec<i64>,
    /// Readings were stored within the spans written (they were upserted): a correction, or
    /// data that interleaves with stored data, whose detection reads on to the newest readings.
    pub met_stored: bool,
    /// When the held readings replaced the stored ones ([`merge_held`]): one link per hour
    /// written, for detection to tell whether they are still all the hour holds.
    pub links: Vec<Link>,
}

/// Before writing: work memory for the upsert (sorting a 100,000-row object's staged rows spilled
/// to disk at PostgreSQL's default of 4 MB), and the savepoint the fast path falls back to.
pub(super) const MERGE_WORK_MEM: &str = "SET LOCAL work_mem = '64MB'; SAVEPOINT fresh_rows";

/// Moves the staged rejected rows into quarantine under ledger entry `quarantine` (`None`: no row
/// was rejected) and writes the valid rows of object version number `version` (`spans`: each
/// sensor's first and last instant in it):
/// inserted when none of them is stored yet ([`INSERT_MEASUREMENTS`]), else upserted
/// ([`MERGE_MEASUREMENTS`]). With `detect`, queues anomaly detection of those spans.
pub async fn merge(
    tx: &deadpool_postgres::Transaction<'_>,
    dataset: Dataset,
    quarantine: Option<i64>,
    key: &str,
    version: i64,
    spans: &Spans,
    detect: bool,
) -> Result<Merged, tokio_postgres::Error> {
    match dataset {
        Dataset::Measurements => {
            let member = Member {
                version,
                key,
                quarantine,
                spans,
            };
            let mut merged = merge_group(tx, &[member], &[], detect).await?;
            Ok(merged.pop().unwrap_or_default())
        }
        Dataset::Mapping => {
            quarantine_one(tx, quarantine, key, version).await?;
            let merge = tx.prepare_cached(MERGE_MAPPING).await?;
            Ok(Merged {
                changed: tx.execute(&merge, &[&version]).await?,
                ..Merged::default()
            })
        }
    }
}

/// Whether the fast path's write of new readings failed because another ingestion wrote one of
/// their keys meanwhile (or a repeated key in them, or a deadlock with such a writer): then it is
/// rolled back to the savepoint and the readings are upserted.
pub fn met_a_stored_key(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
        || e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED)
}

/// A sensor and the first and last instant of its readings in an object.
pub(super) type SensorSpan = (
    uuid::Uuid,
    chrono::DateTime<chrono::Utc>,
    chrono::DateTime<chrono::Utc>,
);

/// One measurement object of [`merge_group`].
pub struct Member<'a> {
    /// The number of its version (what its staged rows carry, in a group).
    pub version: i64,
    pub key: &'a str,
    /// Its ledger entry, if rows were rejected.
    pub quarantine: Option<i64>,
    pub spans: &'a Spans,
}

/// [`merge`] for the measurement objects staged in one transaction (a group, or a single object):
/// first drops the staged rows of the versions in `unstage` (objects of the group that failed or
/// could not be read to the end); then quarantines each member's rejected rows; then, when no
/// reading of any member is stored yet, one plain insert of them all; otherwise one upsert of them
/// all ([`MERGE_GROUP`]; a single object: [`MERGE_MEASUREMENTS`]). Returns what each member
/// changed, in order (0 for each member of a group that was upserted).
pub async fn merge_group(
    tx: &deadpool_postgres::Transaction<'_>,
    members: &[Member<'_>],
    unstage: &[i64],
    detect: bool,
) -> Result<Vec<Merged>, tokio_postgres::Error> {
    unstage_and_quarantine(tx, members, unstage).await?;
    merge_staged(tx, members, detect).await
}

/// The first steps of a group's merge: drops the staged rows of the versions in `unstage`, then
/// moves each member's rejected rows into quarantine.
async fn unstage_and_quarantine(
    tx: &deadpool_postgres::Transaction<'_>,
    members: &[Member<'_>],
    unstage: &[i64],
) -> Result<(), tokio_postgres::Error> {
    use futures_util::future::try_join_all;
    if !unstage.is_empty() {
        tx.execute(UNSTAGE, &[&unstage]).await?;
    }
    if members.iter().any(|m| m.quarantine.is_some()) {
        // Prepared once per connection: the staging table lives as long as the connection.
        let quarantine = tx.prepare_cached(QUARANTINE).await?;
        let quarantine = &quarantine;
        try_join_all(members.iter().filter_map(|m| {
            let id = m.quarantine?;
            Some(async move { tx.execute(quarantine, &[&id, &m.key, &m.version]).await })
        }))
        .await?;
    }
    Ok(())
}

/// Each member's sensors with their first and last instant.
fn member_spans(members: &[Member<'_>]) -> Vec<Vec<SensorSpan>> {
    members
        .iter()
        .map(|m| {
            m.spans
                .sensors
                .iter()
                .map(|(u, s)| (*u, instant(s.0), instant(s.1)))
                .collect()
        })
        .collect()
}

/// The rest of [`merge_group`], once the members' valid rows are all staged.
async fn merge_staged(
    tx: &deadpool_postgres::Transaction<'_>,
    members: &[Member<'_>],
    detect: bool,
) -> Result<Vec<Merged>, tokio_postgres::Error> {
    if members.is_empty() {
        return Ok(Vec::new());
    }
    let spans = member_spans(members);
    // Prepared before anything is sent: statements pipelined with the insert must go out in
    // their order, and preparing would send this one only after its round trip.
    let queue_statement = match detect {
        true => Some(tx.prepare_cached(QUEUE_DETECTION).await?),
        false => None,
    };
    let queue_all = || queue(tx, queue_statement.as_ref(), members, &spans);
    let all = spans.iter().flatten();
    let sensors: Vec<uuid::Uuid> = all.clone().map(|s| s.0).collect();
    let firsts: Vec<_> = all.clone().map(|s| s.1).collect();
    let lasts: Vec<_> = all.map(|s| s.2).collect();
    // A single object's rows carry no version: `$1` is theirs.
    let version = members.first().map_or(0, |m| m.version);
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
        vec![&version, &sensors, &firsts, &lasts];
    // The reader's hours when it could keep them all; else the insert counts them itself.
    let hours = Spans::hours_of(members.iter().map(|m| m.spans)).map(|h| HourColumns::of(&h));
    let insert = match &hours {
        Some(hours) => {
            params.extend(hours.params());
            tx.prepare_cached(INSERT_MEASUREMENTS).await?
        }
        None => tx.prepare_cached(INSERT_COUNTED).await?,
    };
    // The detection queue, the savepoint and the insert go out in one round trip; the insert
    // last, so that the rollup and page index rows it locks are held for the shortest time
    // (concurrent objects of the same sensors and hours wait for them).
    let (works, set, inserted) = tokio::join!(
        queue_all(),
        tx.batch_execute(MERGE_WORK_MEM),
        tx.query_one(&insert, &params)
    );
    let works = works?;
    set?;
    match inserted {
        // Every valid row was new and inserted: a repeated key fails the insert.
        Ok(row) if row.get::<_, bool>(0) => Ok(all_new(members, works)),
        Ok(_) => upserted(tx, members, works).await,
        Err(e) if met_a_stored_key(&e) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT fresh_rows").await?;
            upserted(tx, members, works).await
        }
        Err(e) => Err(e),
    }
}

/// What each member changed when all their valid rows were new and written (`works`: what was
/// queued for each).
fn all_new(members: &[Member<'_>], works: Vec<Vec<i64>>) -> Vec<Merged> {
    members
        .iter()
        .zip(works)
        .map(|(m, work)| Merged {
            changed: m.spans.rows(),
            work,
            met_stored: false,
            links: Vec::new(),
        })
        .collect()
}

/// Upserts the members' rows (`works`: what was queued for each): a single object's with
/// [`MERGE_MEASUREMENTS`], a group's all at once with [`MERGE_GROUP`] (which tells no member's
/// count apart: each gets 0, so detection reads their readings back).
pub(super) async fn upserted(
    tx: &deadpool_postgres::Transaction<'_>,
    members: &[Member<'_>],
    works: Vec<Vec<i64>>,
) -> Result<Vec<Merged>, tokio_postgres::Error> {
    let row = match members {
        [one] => upsert(tx, one.version).await?,
        _ => {
            let merge = tx.prepare_cached(MERGE_GROUP).await?;
            tx.query_one(&merge, &[]).await?
        }
    };
    let written: i64 = row.get(0);
    // The hours it overwrote readings in, with what it wrote there.
    settle_inexact(tx, &HourColumns::from_row(&row, 1)).await?;
    let alone = members.len() == 1;
    Ok(works
        .into_iter()
        .map(|work| Merged {
            changed: if alone { written as u64 } else { 0 },
            work,
            met_stored: true,
            links: Vec::new(),
        })
        .collect())
}

/// Runs [`MERGE_MEASUREMENTS`] for version `version`.
pub(super) async fn upsert(
    tx: &deadpool_postgres::Transaction<'_>,
    version: i64,
) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
    let merge = tx.prepare_cached(MERGE_MEASUREMENTS).await?;
    tx.query_one(&merge, &[&version]).await
}

/// Held readings of a group staged after all, each row with its member's version, its line the
/// reading's place among its sensor's in the member (one per instant: no two lines of a key).
const COPY_GROUP_HELD: &str =
    "COPY staging_rows (object_version, line, sensor_uuid, ts, value) FROM STDIN (FORMAT binary)";

/// [`merge_group`] for members whose valid readings were held in memory, each settled (in time
/// order per sensor, one per instant): `held`, in member order (`None`: that member held too
/// many and staged them). When every member held its readings, no reading is stored within the
/// members' spans ([`STORED_IN_SPANS`]: one probe per sensor over all the members, and only if
/// that finds one, one per sensor and member) and no two members' readings of a sensor
/// interleave, they are copied straight into the table in key order, each
/// row with its member's version ([`COPY_NEW`]), and the rollup and page index widened by their
/// hours ([`WIDEN_HOURS`]) — what [`merge_held`] does for one object. Otherwise (or if a
/// concurrent ingestion inserted one of their keys meanwhile: the `COPY` fails with a unique
/// violation and is rolled back to the savepoint) they are staged and merged as
/// [`merge_group`] merges staged rows.
///
/// Why: staging a group's rows and inserting them from the staging table cost the server 1.44 s
/// and 3.7 s for 5,000 objects of 100 readings of 100 sensors; a `COPY` of the same rows into the
/// table, about 1.3 s.
pub async fn merge_group_held(
    tx: &deadpool_postgres::Transaction<'_>,
    members: &[Member<'_>],
    held: &[Option<&BySensor>],
    unstage: &[i64],
    detect: bool,
) -> Result<Vec<Merged>, tokio_postgres::Error> {
    debug_assert_eq!(members.len(), held.len());
    let all_held: Option<Vec<&BySensor>> = held.iter().copied().collect();
    let pieces = all_held.as_deref().and_then(|h| in_key_order(members, h));
    let (Some(all_held), Some(pieces)) = (all_held, pieces) else {
        stage_held(tx, members, held).await?;
        return merge_group(tx, members, unstage, detect).await;
    };
    unstage_and_quarantine(tx, members, unstage).await?;
    if pieces.is_empty() {
        return Ok(members.iter().map(|_| Merged::default()).collect());
    }
    let spans = member_spans(members);
    let queue_statement = match detect {
        true => Some(tx.prepare_cached(QUEUE_DETECTION).await?),
        false => None,
    };
    let stored = tx.prepare_cached(STORED_IN_SPANS).await?;
    // First each sensor's span over all members (one probe per sensor); only if a reading is
    // stored there, each member's (the members' readings may lie between another's).
    let union = sensor_spans(&spans);
    let (works, set, in_union) = tokio::join!(
        queue(tx, queue_statement.as_ref(), members, &spans),
        tx.batch_execute(MERGE_WORK_MEM),
        stored_in(tx, &stored, union.iter())
    );
    let works = works?;
    set?;
    let stored = match in_union? {
        false => Ok(false),
        true => stored_in(tx, &stored, spans.iter().flatten()).await,
    };
    if !stored? {
        let written = async {
            copy_pieces(tx, &pieces).await?;
            let hours = Spans::hours_of(members.iter().map(|m| m.spans))
                .expect("the hours of held readings");
            let widen = tx.prepare_cached(WIDEN_HOURS).await?;
            tx.query_one(&widen, &HourColumns::of(&hours).params())
                .await
        }
        .await;
        match written {
            Ok(_) => return Ok(all_new(members, works)),
            Err(e) if met_a_stored_key(&e) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT fresh_rows").await?;
            }
            Err(e) => return Err(e),
        }
    }
    let held: Vec<Option<&BySensor>> = all_held.into_iter().map(Some).collect();
    stage_held(tx, members, &held).await?;
    upserted(tx, members, works).await
}

/// Runs [`STORED_IN_SPANS`] (prepared) over `spans`.
async fn stored_in(
    tx: &deadpool_postgres::Transaction<'_>,
    statement: &tokio_postgres::Statement,
    spans: impl Iterator<Item = &SensorSpan> + Clone,
) -> Result<bool, tokio_postgres::Error> {
    let sensors: Vec<uuid::Uuid> = spans.clone().map(|s| s.0).collect();
    let firsts: Vec<_> = spans.clone().map(|s| s.1).collect();
    let lasts: Vec<_> = spans.map(|s| s.2).collect();
    let (Some(earliest), Some(latest)) = (firsts.iter().min(), lasts.iter().max()) else {
        return Ok(false);
    };
    let row = tx
        .query_one(statement, &[&sensors, &firsts, &lasts, earliest, latest])
        .await?;
    Ok(row.get(0))
}

/// Each sensor's span over all the members that hold it.
fn sensor_spans(spans: &[Vec<SensorSpan>]) -> Vec<SensorSpan> {
    let mut union: std::collections::HashMap<uuid::Uuid, SensorSpan> = Default::default();
    for &(u, first, last) in spans.iter().flatten() {
        union
            .entry(u)
            .and_modify(|s| {
                s.1 = s.1.min(first);
                s.2 = s.2.max(last);
            })
            .or_insert((u, first, last));
    }
    union.into_values().collect()
}

/// One member's readings of one sensor: the sensor, the member's version, the readings.
type Piece<'h> = (uuid::Uuid, i64, &'h [(crate::time::Micros, f64)]);

/// The members' held readings as pieces in key order (by sensor, then time), or `None` when two
/// members' readings of a sensor interleave (which of two readings of a key wins, and whether
/// their keys differ at all, is the upsert's to say).
fn in_key_order<'h>(members: &[Member<'_>], held: &[&'h BySensor]) -> Option<Vec<Piece<'h>>> {
    let mut pieces: Vec<Piece<'h>> = members
        .iter()
        .zip(held)
        .flat_map(|(m, h)| {
            h.iter()
                .filter(|(_, r)| !r.is_empty())
                .map(move |(u, r)| (*u, m.version, r.as_slice()))
        })
        .collect();
    pieces.sort_unstable_by_key(|p| (p.0, p.2[0].0));
    let apart = pieces
        .windows(2)
        .all(|w| w[0].0 != w[1].0 || w[0].2[w[0].2.len() - 1].0 < w[1].2[0].0);
    apart.then_some(pieces)
}

/// Copies `pieces` into the table ([`COPY_NEW`]), in their order.
async fn copy_pieces(
    tx: &deadpool_postgres::Transaction<'_>,
    pieces: &[Piece<'_>],
) -> Result<(), tokio_postgres::Error> {
    let rows = pieces
        .iter()
        .flat_map(|(u, version, readings)| readings.iter().map(move |r| (*u, *version, *r)))
        .collect::<Vec<_>>();
    copy_rows(tx, COPY_NEW, &rows, |enc, (u, version, (us, value))| {
        enc.row(4);
        enc.uuid(u);
        enc.timestamptz(*us);
        enc.float8(*value);
        enc.int8(*version);
    })
    .await
}

/// Stages the held readings of the members that held them ([`COPY_GROUP_HELD`]).
async fn stage_held(
    tx: &deadpool_postgres::Transaction<'_>,
    members: &[Member<'_>],
    held: &[Option<&BySensor>],
) -> Result<(), tokio_postgres::Error> {
    if held.iter().flatten().all(|h| h.values().all(Vec::is_empty)) {
        return Ok(());
    }
    let rows = members.iter().zip(held).flat_map(|(m, h)| {
        h.iter()
            .flat_map(|h| h.iter())
            .flat_map(move |(u, readings)| {
                readings
                    .iter()
                    .enumerate()
                    .map(move |(line, r)| (m.version, line as i64, *u, *r))
            })
    });
    let rows: Vec<_> = rows.collect();
    copy_rows(
        tx,
        COPY_GROUP_HELD,
        &rows,
        |enc, (version, line, u, (us, value))| {
            enc.row(5);
            enc.int8(*version);
            enc.int8(*line);
            enc.uuid(u);
            enc.timestamptz(*us);
            enc.float8(*value);
        },
    )
    .await
}
