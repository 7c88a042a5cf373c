//! Writing one object's rows: binary `COPY` into a temporary staging table, then one set-based merge.
//!
//! Every line of the object, valid or rejected, goes through a single `COPY` stream into a staging
//! table whose rows live only as long as the transaction: valid rows with their fields, rejected
//! rows with their raw bytes and reason. The staging table is a temporary table created once per
//! connection ([`CREATE_STAGING`], run when the pool opens a connection) with `ON COMMIT DELETE
//! ROWS`: creating and dropping a table per object cost 1 ms of catalog writes, the most of any
//! statement for a small object. It is one table for both datasets (each uses its columns):
//! PostgreSQL truncates every such table at each commit, heap, TOAST table and TOAST index, and
//! that truncation was 23% of the server's CPU in the small-objects benchmark with two tables.
//! Memory stays bounded however large the object is. The merge then moves rejected rows into
//! quarantine and writes the valid ones: readings that are all new are inserted as they are
//! ([`INSERT_MEASUREMENTS`], the common case: data arrives once); the others are upserted
//! ([`MERGE_MEASUREMENTS`]), collapsing repeated keys within the object to the last line and
//! overwriting a stored row only with a version that beats the one it came from (see
//! [`super::versions`]); the same version ingested again writes nothing. Either statement keeps
//! the page index (`measurement_days`) and the hourly rollup (`measurement_hours`, what
//! `query-cli plot` draws wide columns from) in step with the rows.
//!
//! A measurement object of up to a million valid readings ([`crate::ingest::FRESH_MAX`]), the
//! usual upload, skips the staging of its valid rows: the reader holds them in memory (sorted
//! and collapsed to the last line of each key once read, which detection wants anyway), only
//! rejected rows are staged, and [`merge_held`] copies them straight into `measurements` in key
//! order when none is stored yet — the work of a bare `COPY`. Measured with `bench-ingest` (24
//! objects of 100,000 readings, detection on): the staging `COPY` (112 ms per object on the
//! server) and the insert from it (345–364 ms) became one `COPY` of the table: the whole run is
//! at 0.71–0.81× of `psql \copy`. Readings that meet stored ones
//! replace them the same way when the stored readings they beat within their spans are exactly
//! their keys (a re-upload or correction: [`replace_held`] deletes those rows and copies the
//! readings in — 12 corrections of 100,000 readings take 4.5–4.8 s, upserted 6.3–6.8 s); otherwise
//! they are staged after all and upserted as below. With detection on, a replacement leaves the
//! rollup hours whose new bounds it cannot tell marked inexact, their bounds around the
//! readings' (a plot reads such an hour's readings), for the detection it queues to settle: that
//! holds the object's readings and, where it can prove they are all the hour holds ([`Link`]),
//! settles the hour from them without a scan (`crate::alerts`). Settling them here scanned the
//! hours' other readings: 0.66–0.72 s of server time for the 12 corrections. Objects too large
//! to hold stage theirs as they stream, and a group of small objects stages its rows tagged with
//! their versions ([`crate::ingest::Grouper`]).

use std::pin::Pin;

use bytes::Bytes;
use futures_util::SinkExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::{CopyInSink, Transaction};

use super::copy::CopyEncoder;
use super::rollup::{
    recompute_hours, rollup_columns, settle_inexact, unnest_hours, widen_hours, widen_set, Hour,
    HourColumns, HOURS_BEFORE, OUTSIDE_HOURS, REPLACE_HOURS, WIDEN_HOURS,
};
use super::versions::{incoming_beats_stored, version_beats};
use crate::contract::{Dataset, Reading, SensorName};
use crate::readings::BySensor;
use crate::time::{hour_of, instant};

/// The session's staging table, emptied at every commit; an aborted transaction leaves its rows
/// dead until the next commit on the connection truncates the table.
pub const CREATE_STAGING: &str = "
    CREATE TEMP TABLE staging_rows (
        line bigint NOT NULL, sensor_uuid uuid, ts timestamptz, value double precision,
        sensor_name text, raw bytea, reason text, object_version bigint
    ) ON COMMIT DELETE ROWS";
const COPY_MEASUREMENTS: &str =
    "COPY staging_rows (line, sensor_uuid, ts, value, raw, reason) FROM STDIN (FORMAT binary)";
/// The `COPY` of a group of objects in one transaction ([`Staging::open_group`]): every row
/// carries the number of the version it comes from, and the statements below take only the rows
/// of one version (`object_version = $1`) or, for the fast path, each row with its own.
const COPY_GROUP: &str =
    "COPY staging_rows (object_version, line, sensor_uuid, ts, value, raw, reason)
    FROM STDIN (FORMAT binary)";
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
const MERGE_MEASUREMENTS: &str = concat!(
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
const MERGE_GROUP: &str = concat!(
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
const INSERT_MEASUREMENTS: &str = concat!(
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
        ORDER BY sensor_uuid, ts
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
/// Whether any reading is stored within a sensor's span (`$1`–`$3`: sensors, first and last
/// instants; one index probe per sensor).
const STORED_WITHIN: &str = "
    SELECT EXISTS (
        SELECT FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[]) AS w(u, first, last)
        CROSS JOIN LATERAL (
            SELECT FROM measurements m
            WHERE m.sensor_uuid = w.u AND m.ts >= w.first AND m.ts <= w.last LIMIT 1
        ) AS stored
    )";
/// The fast path of [`merge_held`]: the held readings, all new, straight into the table.
const COPY_NEW: &str =
    "COPY measurements (sensor_uuid, ts, value, version) FROM STDIN (FORMAT binary)";
/// Held readings staged to be upserted, when some are stored already.
const COPY_HELD: &str =
    "COPY staging_rows (line, sensor_uuid, ts, value) FROM STDIN (FORMAT binary)";
/// The first step of replacing stored readings with held ones ([`replace_held`]): deletes the
/// stored rows within each sensor's span (`$sensors`, `$firsts`, `$lasts`, sensors in key order)
/// that version `$version` beats, and sends their keys and values back as a binary `COPY`. In key
/// order, as every other ingestion locks rows: the settings of [`KEY_ORDER`] leave the planner a
/// nested loop over the spans with an index scan of each. A `COPY` takes no parameters: the
/// placeholders are replaced by literals ([`replaced_statement`]). Sending the rows as `COPY`
/// data rather than `RETURNING` rows spares the server the result's tuple store and the worker a
/// row object per reading.
const REPLACED: &str = concat!(
    "COPY (DELETE FROM measurements AS target
    USING unnest($sensors::uuid[], $firsts::timestamptz[], $lasts::timestamptz[])
        AS w(u, first, last)
    WHERE target.sensor_uuid = w.u AND target.ts >= w.first AND target.ts <= w.last AND ",
    version_beats!("$version::bigint", "target.version"),
    "
    RETURNING target.sensor_uuid, target.ts, target.value) TO STDOUT (FORMAT binary)"
);
/// The plan [`REPLACED`] must have (a hash join would scan the whole table, and a bitmap scan
/// visits rows in the order they lie on disk), for this transaction, until [`ANY_PLAN`].
const KEY_ORDER: &str = "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off;
    SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";
const ANY_PLAN: &str =
    "RESET enable_seqscan; RESET enable_bitmapscan; RESET enable_hashjoin; RESET enable_mergejoin";
/// Queues anomaly detection of the span each sensor's valid rows cover (`anomaly_work`, see
/// `crate::alerts`): `$1`–`$3` sensors, first and last instants ([`Spans`], gathered while the rows
/// were read: aggregating the staged rows again cost 50 ms per 100,000-row object), `$4` the
/// object keys (one statement for a group's objects); returns each id with its key.
/// A statement of its own, run only when detection is on, so that with detection off the merge is
/// exactly what it was.
const QUEUE_DETECTION: &str = "
    INSERT INTO anomaly_work (sensor_uuid, span_start, span_end, object_key)
    SELECT u, first, last, k
    FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::text[]) AS w(u, first, last, k)
    ORDER BY u, k
    RETURNING id, object_key";

/// What the reader gathers from an object's valid rows on the way: each sensor's first and last
/// instant (µs since the Unix epoch), and its readings per UTC hour (count, low, high) — the
/// rollup rows of [`INSERT_MEASUREMENTS`], which then needs no `RETURNING` of every row (that
/// and its aggregation cost as much as a third of the insert). Hours are dropped past
/// [`HOURS_MAX`] (bounded memory; the object is then upserted).
#[derive(Debug, Default, Clone)]
pub struct Spans {
    sensors: std::collections::HashMap<uuid::Uuid, (i64, i64)>,
    hours: Option<std::collections::HashMap<(uuid::Uuid, i64), Hour>>,
    overflowed: bool,
}

/// The most (sensor, hour) pairs of an object gathered for the rollup (40 bytes each).
pub const HOURS_MAX: usize = 100_000;

impl Spans {
    /// The valid rows gathered (all of them while the hours are kept).
    fn rows(&self) -> u64 {
        self.hours
            .as_ref()
            .map_or(0, |h| h.values().map(|h| h.readings as u64).sum())
    }

    /// The hours of several objects together (a (sensor, hour) pair once), or `None` if one of
    /// them gave up gathering them (or none has a valid row).
    fn hours_of<'a>(
        all: impl Iterator<Item = &'a Spans>,
    ) -> Option<std::collections::HashMap<(uuid::Uuid, i64), Hour>> {
        let mut out: Option<std::collections::HashMap<(uuid::Uuid, i64), Hour>> = None;
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
            let hour = |r: &(i64, f64)| hour_of(r.0);
            for same in readings.chunk_by(|a, b| hour(a) == hour(b)) {
                let rolled = Hour::of_readings(same.iter().copied()).expect("a reading");
                hours.insert((*u, hour(&same[0])), rolled);
            }
        }
        Spans {
            sensors,
            hours: Some(hours),
            overflowed: false,
        }
    }

    pub fn add(&mut self, sensor: uuid::Uuid, micros: i64, value: f64) {
        let span = self.sensors.entry(sensor).or_insert((micros, micros));
        span.0 = span.0.min(micros);
        span.1 = span.1.max(micros);
        if self.overflowed {
            return;
        }
        let hours = self.hours.get_or_insert_with(Default::default);
        let hour = hour_of(micros);
        if hours.len() >= HOURS_MAX && !hours.contains_key(&(sensor, hour)) {
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

const COPY_MAPPING: &str =
    "COPY staging_rows (line, sensor_uuid, sensor_name, raw, reason) FROM STDIN (FORMAT binary)";
const MERGE_MAPPING: &str = concat!(
    "INSERT INTO sensors AS target (sensor_uuid, sensor_name, version)
    SELECT DISTINCT ON (sensor_uuid) sensor_uuid, sensor_name, $1::bigint
    FROM staging_rows WHERE reason IS NULL
    ORDER BY sensor_uuid, line DESC
    ON CONFLICT (sensor_uuid) DO UPDATE
        SET sensor_name = EXCLUDED.sensor_name, version = EXCLUDED.version, updated_at = now()
    WHERE ",
    incoming_beats_stored!()
);

/// `$3`: the version whose rows to take (rows of a single object carry none).
const QUARANTINE: &str = "INSERT INTO ingest_quarantine (ledger_id, object_key, line, raw, reason)
    SELECT $1, $2, line, raw, reason FROM staging_rows
    WHERE reason IS NOT NULL AND (object_version IS NULL OR object_version = $3)";
/// Drops the staged rows of versions that failed or could not be read to the end in a group.
const UNSTAGE: &str = "DELETE FROM staging_rows WHERE object_version = ANY($1)";

/// An open `COPY` into the staging table of one transaction.
pub struct Staging {
    dataset: Dataset,
    sink: Pin<Box<CopyInSink<Bytes>>>,
    enc: CopyEncoder,
    /// In a group: the number of the version whose rows are being staged.
    version: Option<i64>,
}

impl Staging {
    /// Starts the `COPY` of one object into the session's staging table.
    pub async fn open(
        tx: &Transaction<'_>,
        dataset: Dataset,
    ) -> Result<Self, tokio_postgres::Error> {
        let copy = match dataset {
            Dataset::Measurements => COPY_MEASUREMENTS,
            Dataset::Mapping => COPY_MAPPING,
        };
        Self::start(tx, dataset, copy, None).await
    }

    /// Starts the `COPY` of a group of measurement objects, each row tagged with its version
    /// ([`Staging::set_version`] before each object's rows).
    pub async fn open_group(tx: &Transaction<'_>) -> Result<Self, tokio_postgres::Error> {
        Self::start(tx, Dataset::Measurements, COPY_GROUP, Some(0)).await
    }

    async fn start(
        tx: &Transaction<'_>,
        dataset: Dataset,
        copy: &str,
        version: Option<i64>,
    ) -> Result<Self, tokio_postgres::Error> {
        let sink = tx.copy_in(copy).await?;
        Ok(Self {
            dataset,
            sink: Box::pin(sink),
            enc: CopyEncoder::new(),
            version,
        })
    }

    /// The version the next rows come from (a group's `COPY` only).
    pub fn set_version(&mut self, version: i64) {
        debug_assert!(
            self.version.is_some(),
            "only a group's rows carry their version"
        );
        self.version = Some(version);
    }

    /// Starts a row of `fields` fields (plus the version, in a group).
    fn row(&mut self, fields: i16) {
        match self.version {
            Some(v) => {
                self.enc.row(fields + 1);
                self.enc.int8(v);
            }
            None => self.enc.row(fields),
        }
    }

    pub fn reading(&mut self, line: u64, r: &Reading) {
        debug_assert_eq!(self.dataset, Dataset::Measurements);
        self.row(6);
        let e = &mut self.enc;
        e.int8(line as i64);
        e.uuid(&r.sensor_uuid);
        e.timestamptz(r.unix_micros);
        e.float8(r.value);
        e.null();
        e.null();
    }

    pub fn sensor(&mut self, line: u64, s: &SensorName<'_>) {
        debug_assert_eq!(self.dataset, Dataset::Mapping);
        self.row(5);
        let e = &mut self.enc;
        e.int8(line as i64);
        e.uuid(&s.sensor_uuid);
        e.bytes(s.name.as_bytes());
        e.null();
        e.null();
    }

    pub fn rejected(&mut self, line: u64, raw: &[u8], reason: &str) {
        let data_fields = match self.dataset {
            Dataset::Measurements => 3,
            Dataset::Mapping => 2,
        };
        self.row(data_fields + 3);
        let e = &mut self.enc;
        e.int8(line as i64);
        for _ in 0..data_fields {
            e.null();
        }
        e.bytes(raw);
        e.bytes(reason.as_bytes());
    }

    /// Ships buffered rows to the server once enough have accumulated.
    pub async fn flush_if_full(&mut self) -> Result<(), tokio_postgres::Error> {
        if let Some(chunk) = self.enc.take_if_full() {
            self.sink.send(chunk).await?;
        }
        Ok(())
    }

    /// Ends the `COPY`; returns the number of staged lines.
    pub async fn finish(mut self) -> Result<u64, tokio_postgres::Error> {
        let rest = self.enc.finish();
        self.sink.send(rest).await?;
        self.sink.as_mut().finish().await
    }
}

/// What a merge changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    /// Stored rows inserted or overwritten.
    pub changed: u64,
    /// The `anomaly_work` entries queued (one per sensor with valid rows in the object).
    pub work: Vec<i64>,
    /// Readings were stored within the spans written (they were upserted): a correction, or
    /// data that interleaves with stored data, whose detection reads on to the newest readings.
    pub met_stored: bool,
    /// When the held readings replaced the stored ones ([`merge_held`]): one link per hour
    /// written, for detection to tell whether they are still all the hour holds.
    pub links: Vec<Link>,
}

/// The rollup row of one hour a replacing merge wrote ([`merge_held`]): the transaction that
/// wrote it last before the merge (`before`; `None` if it had no row) and the merge's own
/// (`by`), as PostgreSQL numbers them (the row's `xmin`). Every write of readings rewrites the
/// rollup rows of the hours it writes, so while the row's `xmin` is still `by`, nothing wrote
/// into the hour since; and a chain of such links from the row's `xmin` back says which merges
/// wrote it one after the other, with nothing in between. When their readings are also as many
/// as the hour holds, they are all it holds: detection takes them from memory
/// ([`crate::alerts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub sensor: uuid::Uuid,
    /// The hour's start, in microseconds since the epoch.
    pub hour: i64,
    pub before: Option<i64>,
    pub by: i64,
}

/// Before writing: work memory for the upsert (sorting a 100,000-row object's staged rows spilled
/// to disk at PostgreSQL's default of 4 MB), and the savepoint the fast path falls back to.
const MERGE_WORK_MEM: &str = "SET LOCAL work_mem = '64MB'; SAVEPOINT fresh_rows";

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

/// Moves an object's rejected rows into quarantine under ledger entry `ledger_id` (`None`: no row
/// was rejected).
async fn quarantine_one(
    tx: &deadpool_postgres::Transaction<'_>,
    ledger_id: Option<i64>,
    key: &str,
    version: i64,
) -> Result<(), tokio_postgres::Error> {
    if let Some(ledger_id) = ledger_id {
        let quarantine = tx.prepare_cached(QUARANTINE).await?;
        tx.execute(&quarantine, &[&ledger_id, &key, &version])
            .await?;
    }
    Ok(())
}

/// Whether the fast path's write of new readings failed because another ingestion wrote one of
/// their keys meanwhile (or a repeated key in them, or a deadlock with such a writer): then it is
/// rolled back to the savepoint and the readings are upserted.
fn met_a_stored_key(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::UNIQUE_VIOLATION)
        || e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED)
}

/// A sensor and the first and last instant of its readings in an object.
type SensorSpan = (
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
    if members.is_empty() {
        return Ok(Vec::new());
    }
    let spans: Vec<Vec<SensorSpan>> = members
        .iter()
        .map(|m| {
            m.spans
                .sensors
                .iter()
                .map(|(u, s)| (*u, instant(s.0), instant(s.1)))
                .collect()
        })
        .collect();
    // Prepared before anything is sent: statements pipelined with the insert must go out in
    // their order, and preparing would send this one only after its round trip.
    let queue_statement = match detect {
        true => Some(tx.prepare_cached(QUEUE_DETECTION).await?),
        false => None,
    };
    let queue_all = || queue(tx, queue_statement.as_ref(), members, &spans);
    if let Some(hours) = Spans::hours_of(members.iter().map(|m| m.spans)) {
        let all = spans.iter().flatten();
        let sensors: Vec<uuid::Uuid> = all.clone().map(|s| s.0).collect();
        let firsts: Vec<_> = all.clone().map(|s| s.1).collect();
        let lasts: Vec<_> = all.map(|s| s.2).collect();
        let hours = HourColumns::of(&hours);
        let insert = tx.prepare_cached(INSERT_MEASUREMENTS).await?;
        // A single object's rows carry no version: `$1` is theirs.
        let version = members.first().map_or(0, |m| m.version);
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            vec![&version, &sensors, &firsts, &lasts];
        params.extend(hours.params());
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
            Ok(row) if row.get::<_, bool>(0) => {
                Ok(members
                    .iter()
                    .zip(works)
                    .map(|(m, work)| Merged {
                        // Every valid row was new and inserted: a repeated key fails the insert.
                        changed: m.spans.rows(),
                        work,
                        met_stored: false,
                        links: Vec::new(),
                    })
                    .collect())
            }
            Ok(_) => upserted(tx, members, works).await,
            Err(e) if met_a_stored_key(&e) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT fresh_rows").await?;
                upserted(tx, members, works).await
            }
            Err(e) => Err(e),
        }
    } else {
        let works = queue_all().await?;
        tx.batch_execute(MERGE_WORK_MEM).await?;
        upserted(tx, members, works).await
    }
}

/// [`merge`] for a measurement object whose valid readings were held in memory (`held`) instead
/// of staged (its rejected rows are staged): when none of them is stored yet, they are copied
/// straight into the table in key order ([`COPY_NEW`], half the server time of staging them and
/// inserting from the staging table) and the rollup and page index widened by their hours
/// ([`WIDEN_HOURS`]); when some are, the stored readings they overwrite are replaced
/// ([`replace_held`]). Where that cannot be done (a stored reading it would remove is not among
/// them, or one of their keys holds no reading they beat), or if a concurrent ingestion
/// inserted one of their keys meanwhile (the `COPY` then fails with a unique violation), the
/// transaction is rolled back to the savepoint and they are staged and upserted as [`merge`]
/// does.
pub async fn merge_held(
    tx: &deadpool_postgres::Transaction<'_>,
    quarantine: Option<i64>,
    key: &str,
    version: i64,
    held: &BySensor,
    detect: bool,
) -> Result<Merged, tokio_postgres::Error> {
    quarantine_one(tx, quarantine, key, version).await?;
    let mut sensors: Vec<uuid::Uuid> = held
        .iter()
        .filter(|(_, r)| !r.is_empty())
        .map(|(u, _)| *u)
        .collect();
    if sensors.is_empty() {
        return Ok(Merged::default());
    }
    // Key order: the order every ingestion locks rows in.
    sensors.sort_unstable();
    let spans = Spans::of_settled(held);
    let member = Member {
        version,
        key,
        quarantine,
        spans: &spans,
    };
    let within: Vec<SensorSpan> = sensors
        .iter()
        .map(|u| {
            let (first, last) = spans.sensors[u];
            (*u, instant(first), instant(last))
        })
        .collect();
    let queue_statement = match detect {
        true => Some(tx.prepare_cached(QUEUE_DETECTION).await?),
        false => None,
    };
    let stored = tx.prepare_cached(STORED_WITHIN).await?;
    let firsts: Vec<_> = within.iter().map(|s| s.1).collect();
    let lasts: Vec<_> = within.iter().map(|s| s.2).collect();
    let within = [within];
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&sensors, &firsts, &lasts];
    let (works, set, stored) = tokio::join!(
        queue(
            tx,
            queue_statement.as_ref(),
            std::slice::from_ref(&member),
            &within
        ),
        tx.batch_execute(MERGE_WORK_MEM),
        tx.query_one(&stored, &params)
    );
    let mut works = works?;
    set?;
    let met_stored = stored?.get::<_, bool>(0);
    let written = match met_stored {
        false => copy_new(tx, version, &sensors, held, &spans)
            .await
            .map(|()| Some(Vec::new())),
        true => {
            replace_held(
                tx,
                version,
                &sensors,
                (&firsts, &lasts),
                held,
                &spans,
                !detect,
            )
            .await
        }
    };
    match written {
        Ok(Some(links)) => {
            return Ok(Merged {
                changed: held.values().map(|r| r.len() as u64).sum(),
                work: works.pop().unwrap_or_default(),
                met_stored,
                links,
            })
        }
        Ok(None) => tx.batch_execute("ROLLBACK TO SAVEPOINT fresh_rows").await?,
        Err(e) if met_a_stored_key(&e) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT fresh_rows").await?;
        }
        Err(e) => return Err(e),
    }
    copy_held(tx, COPY_HELD, &sensors, held, None).await?;
    let mut merged = upserted(tx, std::slice::from_ref(&member), works).await?;
    Ok(merged.pop().unwrap_or_default())
}

/// Replaces the stored readings the held ones overwrite, when the readings stored within their
/// spans that version `version` beats are exactly their keys (a re-upload or correction of the
/// same readings: the common case): deletes those ([`REPLACED`]), copies the held readings
/// straight into the table ([`COPY_NEW`]), and settles the bounds of the rollup's hours
/// ([`REPLACE_HOURS`], then — with `settle` — [`OUTSIDE_HOURS`] and [`EXACT_HOURS`] for the
/// hours whose bounds it cannot tell; without, those hours are left inexact, their bounds around
/// the readings', for the detection this transaction queues to settle from the readings it
/// holds: `crate::alerts`); the counts and the page index do not change. Returns the [`Link`]s
/// of the hours it wrote (their rollup rows' writers, read and locked by [`HOURS_BEFORE`]); or
/// `None`, having written nothing the caller must keep (it rolls back to the savepoint and
/// upserts), when a reading it deleted is not among the held ones (it must stay) or a held
/// reading deleted none (a new key, or one whose stored reading the version does not beat).
///
/// Why every held key must have been deleted: the delete locks rows in key order, as every
/// writer does, but the `COPY` then goes through the keys a second time. A key it inserts
/// without having deleted it could be one another writer inserted meanwhile and holds while it
/// waits for a row this transaction deleted — a deadlock, in which PostgreSQL may abort the
/// other writer. A key whose stored row this transaction deleted cannot be held by anyone
/// else: a writer of it waits for this transaction. So the `COPY` never waits.
///
/// Measured on PostgreSQL 15 (100,000 readings over 100 sensors overwritten in a 1.2-million-row
/// table): the staging `COPY` and the upsert of [`MERGE_MEASUREMENTS`] cost about 100 and 490 ms
/// of server time; deleting the replaced rows 110 ms and copying the new ones in 200–290 ms. An
/// overwrite cannot be cheaper than writing a new row version and its index entry; the delete
/// and `COPY` do exactly that, with the `COPY`'s batched inserts, and skip the staging table.
///
/// [`EXACT_HOURS`]: super::rollup::EXACT_HOURS
async fn replace_held(
    tx: &deadpool_postgres::Transaction<'_>,
    version: i64,
    sensors: &[uuid::Uuid],
    (firsts, lasts): (
        &[chrono::DateTime<chrono::Utc>],
        &[chrono::DateTime<chrono::Utc>],
    ),
    held: &BySensor,
    written: &Spans,
    settle: bool,
) -> Result<Option<Vec<Link>>, tokio_postgres::Error> {
    use futures_util::TryStreamExt;
    use tokio_postgres::binary_copy::BinaryCopyOutStream;
    use tokio_postgres::types::Type;
    let Some(statement) = replaced_statement(version, sensors, firsts, lasts) else {
        return Ok(None);
    };
    let deleted = async {
        let rows = tx.copy_out(statement.as_str()).await?;
        let rows = BinaryCopyOutStream::new(rows, &[Type::UUID, Type::TIMESTAMPTZ, Type::FLOAT8]);
        let mut rows = std::pin::pin!(rows);
        let mut removed = Removed::default();
        while let Some(row) = rows.try_next().await? {
            let at = row
                .get::<chrono::DateTime<chrono::Utc>>(1)
                .timestamp_micros();
            if !removed.add(held, row.get(0), at, row.get(2)) {
                return Ok(None);
            }
        }
        Ok::<_, tokio_postgres::Error>(Some(removed.finish()))
    };
    let (set, removed) = tokio::join!(tx.batch_execute(KEY_ORDER), deleted);
    set?;
    let Some(removed) = removed? else {
        return Ok(None);
    };
    let deleted: i64 = removed.values().map(|h| h.readings).sum();
    let keys: usize = held.values().map(Vec::len).sum();
    if deleted as usize != keys {
        return Ok(None);
    }
    let hours = tx.prepare_cached(REPLACE_HOURS).await?;
    let before = tx.prepare_cached(HOURS_BEFORE).await?;
    tx.batch_execute(ANY_PLAN).await?;
    copy_held(tx, COPY_NEW, sensors, held, Some(version)).await?;
    let hours_written = written.hours.as_ref().expect("the hours of held readings");
    let columns = HourColumns::of(hours_written);
    let before: std::collections::HashMap<(uuid::Uuid, i64), i64> = tx
        .query(&before, &[&columns.sensors, &columns.hours])
        .await?
        .iter()
        .map(|r| {
            let hour: chrono::DateTime<chrono::Utc> = r.get(1);
            ((r.get(0), hour.timestamp_micros()), r.get(2))
        })
        .collect();
    // Every hour written replaced as many readings (the keys are the same).
    let gone: Vec<Hour> = columns
        .sensors
        .iter()
        .zip(&columns.hours)
        .map(|(u, h)| removed[&(*u, h.timestamp_micros())])
        .collect();
    let gone_lows: Vec<f64> = gone.iter().map(|h| h.low).collect();
    let gone_highs: Vec<f64> = gone.iter().map(|h| h.high).collect();
    let gone_totals: Vec<f64> = gone.iter().map(|h| h.total).collect();
    let mut params = columns.params().to_vec();
    params.extend([
        &gone_lows as &(dyn tokio_postgres::types::ToSql + Sync),
        &gone_highs,
        &gone_totals,
    ]);
    let row = tx.query_one(&hours, &params).await?;
    let (inexact, hours): (Vec<uuid::Uuid>, Vec<chrono::DateTime<chrono::Utc>>) =
        (row.get(0), row.get(1));
    let (rolled, at, by): (
        Vec<uuid::Uuid>,
        Vec<chrono::DateTime<chrono::Utc>>,
        Vec<i64>,
    ) = (row.get(2), row.get(3), row.get(4));
    let links = rolled
        .into_iter()
        .zip(at)
        .zip(by)
        .map(|((sensor, hour), by)| {
            let hour = hour.timestamp_micros();
            Link {
                sensor,
                hour,
                before: before.get(&(sensor, hour)).copied(),
                by,
            }
        })
        .collect();
    if inexact.is_empty() || !settle {
        return Ok(Some(links));
    }
    // What the held readings of each inexact hour are.
    let mut within = HourColumns::default();
    for (u, hour) in inexact.iter().zip(&hours) {
        let start = hour.timestamp_micros();
        within.push(*u, start, &hours_written[&(*u, start)]);
    }
    let outside = tx.prepare_cached(OUTSIDE_HOURS).await?;
    let params = within.params();
    let rest = tx.query(&outside, &params).await?;
    recompute_hours(tx, &rest).await?;
    Ok(Some(links))
}

/// [`REPLACED`] with its placeholders replaced by literals: the version's number and the spans
/// as array literals (UUIDs and UTC instants to the microsecond, as this code formats them).
/// `None` for an instant outside the years 1 to 9999, which PostgreSQL does not read in that
/// form (the readings are then upserted: [`merge_held`]).
fn replaced_statement(
    version: i64,
    sensors: &[uuid::Uuid],
    firsts: &[chrono::DateTime<chrono::Utc>],
    lasts: &[chrono::DateTime<chrono::Utc>],
) -> Option<String> {
    use chrono::Datelike as _;
    use std::fmt::Write as _;
    if !firsts
        .iter()
        .chain(lasts)
        .all(|t| (1..=9999).contains(&t.year()))
    {
        return None;
    }
    fn array<T>(items: &[T], mut each: impl FnMut(&mut String, &T)) -> String {
        let mut s = String::from("'{");
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            each(&mut s, item);
        }
        s.push_str("}'");
        s
    }
    let instants = |at: &[chrono::DateTime<chrono::Utc>]| {
        array(at, |s, t| {
            let _ = write!(s, "{}", t.format("%Y-%m-%dT%H:%M:%S%.6fZ"));
        })
    };
    let statement = REPLACED
        .replace("$version", &version.to_string())
        .replace(
            "$sensors",
            &array(sensors, |s, u| {
                let _ = write!(s, "{u}");
            }),
        )
        .replace("$firsts", &instants(firsts))
        .replace("$lasts", &instants(lasts));
    Some(statement)
}

/// The readings a replacement deleted, per (sensor, hour): how many, their low and high. They
/// arrive in key order, so each is checked against the held readings by walking them, and
/// gathered into its hour until the next hour begins.
#[derive(Default)]
struct Removed {
    hours: std::collections::HashMap<(uuid::Uuid, i64), Hour>,
    /// The sensor of the last reading, the place after it among the held readings, and its hour.
    at: Option<(uuid::Uuid, usize, i64, Hour)>,
}

impl Removed {
    /// Adds a deleted reading; false when it is not one of the held readings.
    fn add(&mut self, held: &BySensor, sensor: uuid::Uuid, at: i64, value: f64) -> bool {
        let Some(readings) = held.get(&sensor) else {
            return false;
        };
        let hour = hour_of(at);
        let mut place = match self.at {
            Some((u, place, ..)) if u == sensor => place,
            _ => 0,
        };
        while place < readings.len() && readings[place].0 < at {
            place += 1;
        }
        if readings.get(place).is_none_or(|r| r.0 != at) {
            // Out of order (the next reading is not further on): look it up.
            match readings.binary_search_by_key(&at, |r| r.0) {
                Ok(i) => place = i,
                Err(_) => return false,
            }
        }
        match &mut self.at {
            Some((u, p, h, sum)) if *u == sensor && *h == hour => {
                *p = place + 1;
                sum.add(at, value);
            }
            _ => {
                self.flush();
                self.at = Some((sensor, place + 1, hour, Hour::of(at, value)));
            }
        }
        true
    }

    /// Adds the hour being gathered to the others.
    fn flush(&mut self) {
        if let Some((u, _, h, sum)) = self.at.take() {
            self.hours
                .entry((u, h))
                .and_modify(|h| h.absorb(sum))
                .or_insert(sum);
        }
    }

    fn finish(mut self) -> std::collections::HashMap<(uuid::Uuid, i64), Hour> {
        self.flush();
        self.hours
    }
}

/// [`COPY_NEW`] of the held readings of `sensors` (in key order) as version `version`, then
/// [`WIDEN_HOURS`] by their hours.
async fn copy_new(
    tx: &deadpool_postgres::Transaction<'_>,
    version: i64,
    sensors: &[uuid::Uuid],
    held: &BySensor,
    spans: &Spans,
) -> Result<(), tokio_postgres::Error> {
    let widen = tx.prepare_cached(WIDEN_HOURS).await?;
    copy_held(tx, COPY_NEW, sensors, held, Some(version)).await?;
    let hours = spans.hours.as_ref().expect("the hours of held readings");
    tx.query_one(&widen, &HourColumns::of(hours).params())
        .await?;
    Ok(())
}

/// Copies the held readings of `sensors`, in that order: with `version`, as rows of the table
/// ([`COPY_NEW`]); without, as staged rows ([`COPY_HELD`]) whose line is the reading's place
/// among its sensor's (one per instant: no two lines of a key to order).
async fn copy_held(
    tx: &deadpool_postgres::Transaction<'_>,
    statement: &str,
    sensors: &[uuid::Uuid],
    held: &BySensor,
    version: Option<i64>,
) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in(statement).await?;
    let mut sink = std::pin::pin!(sink);
    let mut enc = CopyEncoder::new();
    for u in sensors {
        for (line, &(us, value)) in held[u].iter().enumerate() {
            enc.row(4);
            if version.is_none() {
                enc.int8(line as i64);
            }
            enc.uuid(u);
            enc.timestamptz(us);
            enc.float8(value);
            if let Some(v) = version {
                enc.int8(v);
            }
            if let Some(chunk) = enc.take_if_full() {
                sink.send(chunk).await?;
            }
        }
    }
    sink.send(enc.finish()).await?;
    sink.as_mut().finish().await?;
    Ok(())
}

/// Upserts the members' rows (`works`: what was queued for each): a single object's with
/// [`MERGE_MEASUREMENTS`], a group's all at once with [`MERGE_GROUP`] (which tells no member's
/// count apart: each gets 0, so detection reads their readings back).
async fn upserted(
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
async fn upsert(
    tx: &deadpool_postgres::Transaction<'_>,
    version: i64,
) -> Result<tokio_postgres::Row, tokio_postgres::Error> {
    let merge = tx.prepare_cached(MERGE_MEASUREMENTS).await?;
    tx.query_one(&merge, &[&version]).await
}

/// Queues detection of each member's sensors' spans (`spans`, in member order) with `statement`
/// ([`QUEUE_DETECTION`]; `None`: detection is off); returns each member's ids.
async fn queue(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::HOUR_MICROS;

    /// Sensor, hour, and what it holds.
    type RemovedHour = (u128, i64, Hour);

    fn hour(
        readings: i64,
        (low, high, total): (f64, f64, f64),
        first: (i64, f64),
        last: (i64, f64),
    ) -> Hour {
        Hour {
            readings,
            low,
            high,
            total,
            first,
            last,
        }
    }

    /// The removed readings of `deleted` (sensor, instant, value) in the order given, by hour;
    /// `None` when one is not held.
    fn removed(held: &BySensor, deleted: &[(u128, i64, f64)]) -> Option<Vec<RemovedHour>> {
        let mut r = Removed::default();
        for &(u, at, value) in deleted {
            if !r.add(held, uuid::Uuid::from_u128(u), at, value) {
                return None;
            }
        }
        let mut hours: Vec<_> = r
            .finish()
            .into_iter()
            .map(|((u, h), s)| (u.as_u128(), h, s))
            .collect();
        hours.sort_by_key(|h| (h.0, h.1));
        Some(hours)
    }

    #[test]
    fn removed_readings_are_checked_against_the_held_ones_and_gathered_by_hour() {
        const H: i64 = HOUR_MICROS;
        let held: BySensor = [
            (
                uuid::Uuid::from_u128(1),
                vec![(5, 1.0), (H - 1, 3.0), (H, 2.0), (H + 9, 0.5)],
            ),
            (uuid::Uuid::from_u128(2), vec![(-1, 7.0), (7, 8.0)]),
        ]
        .into();
        let in_order = [
            (1, 5, 1.5),
            (1, H - 1, -3.0),
            (1, H, 2.0),
            (1, H + 9, 4.0),
            (2, -1, 6.0),
            (2, 7, 9.0),
        ];
        let expected = Some(vec![
            (1, 0, hour(2, (-3.0, 1.5, -1.5), (5, 1.5), (H - 1, -3.0))),
            (1, H, hour(2, (2.0, 4.0, 6.0), (H, 2.0), (H + 9, 4.0))),
            (2, -H, hour(1, (6.0, 6.0, 6.0), (-1, 6.0), (-1, 6.0))),
            (2, 0, hour(1, (9.0, 9.0, 9.0), (7, 9.0), (7, 9.0))),
        ]);
        assert_eq!(removed(&held, &in_order), expected);
        // Out of order (another plan): each reading is looked up, and an hour met twice adds up.
        let mut shuffled = in_order;
        shuffled.reverse();
        shuffled.swap(0, 3);
        assert_eq!(removed(&held, &shuffled), expected);
        // Some held readings not removed: the ones removed still add up (the caller compares
        // the counts).
        assert_eq!(
            removed(&held, &[(1, H, 2.0)]),
            Some(vec![(1, H, hour(1, (2.0, 2.0, 2.0), (H, 2.0), (H, 2.0)))])
        );
        // A removed reading that is not held, between two held ones, after the last, of
        // another sensor.
        assert_eq!(removed(&held, &[(1, 5, 1.0), (1, 6, 1.0)]), None);
        assert_eq!(removed(&held, &[(1, H + 10, 1.0)]), None);
        assert_eq!(removed(&held, &[(3, 5, 1.0)]), None);
    }

    #[test]
    fn the_replacing_delete_gets_its_spans_as_literals() {
        let at = |us| chrono::DateTime::from_timestamp_micros(us).unwrap();
        let statement = replaced_statement(
            (1_356_998_400 << 24) + 7,
            &[uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(0xab)],
            &[at(0), at(1_356_998_400_000_001)],
            &[at(-1), at(1_356_998_401_500_000)],
        );
        let statement = statement.unwrap();
        assert!(!statement.contains('$'), "{statement}");
        assert!(statement.contains(
            "unnest('{00000000-0000-0000-0000-000000000001,00000000-0000-0000-0000-0000000000ab}'::uuid[], \
             '{1970-01-01T00:00:00.000000Z,2013-01-01T00:00:00.000001Z}'::timestamptz[], \
             '{1969-12-31T23:59:59.999999Z,2013-01-01T00:00:01.500000Z}'::timestamptz[])"
        ), "{statement}");
        assert!(
            statement.contains("((22766655268454407::bigint >> 24)"),
            "{statement}"
        );
        let year = |y| {
            chrono::NaiveDate::from_ymd_opt(y, 1, 1)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
        };
        let u = [uuid::Uuid::from_u128(1)];
        assert!(replaced_statement(1, &u, &[year(1)], &[year(9999)]).is_some());
        assert_eq!(replaced_statement(1, &u, &[year(0)], &[year(2013)]), None);
        assert_eq!(
            replaced_statement(1, &u, &[year(2013)], &[year(10000)]),
            None
        );
    }

    #[test]
    fn spans_gather_hours_until_too_many() {
        let (a, b) = (uuid::Uuid::from_u128(1), uuid::Uuid::from_u128(2));
        let mut s = Spans::default();
        s.add(a, 3_600_000_000 + 5, 2.0);
        s.add(a, 7_199_999_999, -1.0);
        s.add(a, 7_200_000_000, 4.0);
        s.add(b, -1, 9.0);
        let mut hours: Vec<_> = s
            .hours
            .as_ref()
            .unwrap()
            .iter()
            .map(|(k, h)| (*k, *h))
            .collect();
        hours.sort_by_key(|(k, _)| *k);
        const H: i64 = HOUR_MICROS;
        assert_eq!(
            hours,
            vec![
                (
                    (a, H),
                    hour(2, (-1.0, 2.0, 1.0), (H + 5, 2.0), (2 * H - 1, -1.0))
                ),
                (
                    (a, 2 * H),
                    hour(1, (4.0, 4.0, 4.0), (2 * H, 4.0), (2 * H, 4.0))
                ),
                ((b, -H), hour(1, (9.0, 9.0, 9.0), (-1, 9.0), (-1, 9.0))),
            ]
        );
        assert_eq!(s.sensors[&a], (3_600_000_005, 7_200_000_000));
        for i in 0..HOURS_MAX as i64 {
            s.add(a, i * HOUR_MICROS, 0.0);
        }
        assert!(s.hours.is_none());
        s.add(b, 0, 0.0);
        assert!(s.hours.is_none());
        assert_eq!(s.sensors[&b], (-1, 0));
    }
}
