//! The staging table: one binary `COPY` stream per object (or group of small objects) into a
//! temporary table whose rows live as long as the transaction — valid rows with their fields,
//! rejected rows with their raw bytes and reason. An object too large to hold may instead stream
//! its valid rows straight into `measurements` ([`Staging::stream_in`]).

use super::*;
use crate::time::Micros;

/// The session's staging table, emptied at every commit; an aborted transaction leaves its rows
/// dead until the next commit on the connection truncates the table.
pub const CREATE_STAGING: &str = "
    CREATE TEMP TABLE staging_rows (
        line bigint NOT NULL, sensor_uuid uuid, ts timestamptz, value double precision,
        sensor_name text, raw bytea, reason text, object_version bigint
    ) ON COMMIT DELETE ROWS";

pub(super) const COPY_MEASUREMENTS: &str =
    "COPY staging_rows (line, sensor_uuid, ts, value, raw, reason) FROM STDIN (FORMAT binary)";

/// The `COPY` of a group of objects in one transaction ([`Staging::open_group`]): every row
/// carries the number of the version it comes from, and the statements below take only the rows
/// of one version (`object_version = $1`) or, for the fast path, each row with its own.
pub(super) const COPY_GROUP: &str =
    "COPY staging_rows (object_version, line, sensor_uuid, ts, value, raw, reason)
    FROM STDIN (FORMAT binary)";

/// Drops the staged rows of versions that failed or could not be read to the end in a group.
pub(super) const UNSTAGE: &str = "DELETE FROM staging_rows WHERE object_version = ANY($1)";

/// An open `COPY` into the staging table of one transaction.
pub struct Staging {
    pub(super) dataset: Dataset,
    pub(super) sink: Pin<Box<CopyInSink<Bytes>>>,
    pub(super) enc: CopyEncoder,
    /// In a group: the number of the version whose rows are being staged.
    pub(super) version: Option<i64>,
    /// Streaming valid rows straight into `measurements` ([`Staging::stream_in`]).
    pub(super) straight: Option<Straight>,
}

/// The valid rows of one object streaming straight into `measurements` ([`COPY_NEW`]): the
/// version they carry; the rejected rows met meanwhile, encoded for the staging table and held
/// until the stream ends (one connection runs one `COPY` at a time; at most `MAX_REJECTED_ROWS`
/// of them); the statement that widens the rollup and page index after each chunk; and how many
/// readings each (sensor, UTC day) got, for [`merge_streamed`] to tell whether others are stored
/// beside them (`None` past [`DAYS_MAX`]).
pub(super) struct Straight {
    version: i64,
    rejected: CopyEncoder,
    rejected_rows: u64,
    widen: tokio_postgres::Statement,
    days: Option<std::collections::HashMap<(uuid::Uuid, Micros), i64>>,
}

/// The most (sensor, day) pairs whose readings a stream straight in counts (40 bytes each):
/// past them, [`merge_streamed`] takes stored readings to be beside the object's.
pub const DAYS_MAX: usize = 100_000;

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

    pub(super) async fn start(
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
            straight: None,
        })
    }

    /// Streams the valid rows from now on straight into `measurements` as rows of version
    /// number `version` (one object, not a group), when its readings `held` so far allow
    /// ([`may_stream_in`]); returns whether. Ends the staging `COPY` first (the rejected rows so
    /// far are staged; the probe needs the connection), then starts the table's, or the staging
    /// table's again. Rejected rows are held until [`Staging::finish`]. A key stored already, or
    /// repeated in the object, fails the stream with a unique violation (at the latest when it
    /// ends): the caller rolls back and reads the object again to stage it.
    ///
    /// Why: a large object's staging `COPY` and the insert from the staging table cost the server
    /// 12.7 s + 58.7 s for 16.5 M new readings on TimescaleDB, the `COPY` into the hypertable
    /// alone 47.2 s, and counting the rollup's hours from the rows it wrote 5.6 s.
    pub async fn stream_in(
        &mut self,
        tx: &Transaction<'_>,
        version: i64,
        held: &crate::readings::BySensor,
    ) -> Result<bool, tokio_postgres::Error> {
        debug_assert!(self.version.is_none() && self.straight.is_none());
        let staged = std::mem::take(&mut self.enc).finish();
        self.sink.send(staged).await?;
        self.sink.as_mut().finish().await?;
        if !may_stream_in(tx, held).await? {
            self.sink = Box::pin(tx.copy_in(COPY_MEASUREMENTS).await?);
            return Ok(false);
        }
        let widen = tx.prepare(WIDEN_HOURS).await?;
        self.sink = Box::pin(tx.copy_in(super::replace::COPY_NEW).await?);
        self.straight = Some(Straight {
            version,
            rejected: CopyEncoder::new(),
            rejected_rows: 0,
            widen,
            days: Some(Default::default()),
        });
        Ok(true)
    }

    /// Writes a chunk of `readings` straight into the table ([`Staging::stream_in`]): sensors in
    /// key order, each sensor's readings in time order; then ends the `COPY`, widens the rollup
    /// and page index by the chunk's hours ([`WIDEN_HOURS`]), and starts the next `COPY`; empties
    /// `readings`. Returns false, having written part of them, when two readings of a sensor
    /// share an instant (the object must be staged).
    ///
    /// The hours are the reader's, a chunk at a time, in bounded memory: counted from the table
    /// after the stream instead, 275,000 hours of 16.5 M readings took 17.3 s of server time.
    pub async fn stream_sorted(
        &mut self,
        tx: &Transaction<'_>,
        readings: &mut crate::readings::BySensor,
    ) -> Result<bool, tokio_postgres::Error> {
        let version = self.straight.as_ref().expect("streaming in").version;
        let mut sensors: Vec<uuid::Uuid> = readings.keys().copied().collect();
        sensors.sort_unstable();
        let mut hours = HourColumns::default();
        for u in sensors {
            let Some(of) = readings.get_mut(&u) else {
                continue;
            };
            of.sort_unstable_by_key(|r| r.0);
            if of.windows(2).any(|w| w[0].0 == w[1].0) {
                return Ok(false);
            }
            let hour = |r: &(Micros, f64)| hour_of(r.0);
            for same in of.chunk_by(|a, b| hour(a) == hour(b)) {
                let rolled = Hour::of_readings(same.iter().copied()).expect("a reading");
                hours.push(u, hour(&same[0]), &rolled);
                let straight = self.straight.as_mut().expect("streaming in");
                if let Some(days) = straight.days.as_mut() {
                    let day = (u, day_of(same[0].0));
                    if days.len() < DAYS_MAX || days.contains_key(&day) {
                        *days.entry(day).or_default() += same.len() as i64;
                    } else {
                        straight.days = None;
                    }
                }
                for &(at, value) in same {
                    let e = &mut self.enc;
                    e.row(4);
                    e.uuid(&u);
                    e.timestamptz(at);
                    e.float8(value);
                    e.int8(version);
                }
                self.flush_if_full().await?;
            }
        }
        let written = std::mem::take(&mut self.enc).finish();
        self.sink.send(written).await?;
        self.sink.as_mut().finish().await?;
        let widen = &self.straight.as_ref().expect("streaming in").widen;
        tx.query_one(widen, &hours.params()).await?;
        self.sink = Box::pin(tx.copy_in(super::replace::COPY_NEW).await?);
        // Dropped, not kept: the next chunk may spread over other sensors.
        readings.clear();
        Ok(true)
    }

    /// Streaming straight in: the readings of each (sensor, UTC day) written so far, or `None`
    /// past [`DAYS_MAX`] of them.
    pub fn days_streamed_in(&self) -> Option<Vec<(uuid::Uuid, Micros, i64)>> {
        let days = self.straight.as_ref()?.days.as_ref()?;
        Some(days.iter().map(|((u, day), n)| (*u, *day, *n)).collect())
    }

    /// Whether the valid rows stream straight into `measurements` ([`Staging::stream_in`]).
    pub fn streams_in(&self) -> bool {
        self.straight.is_some()
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
    pub(super) fn row(&mut self, fields: i16) {
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
        debug_assert!(
            self.straight.is_none(),
            "streaming in: Staging::stream_sorted"
        );
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
        let e = match &mut self.straight {
            Some(s) => {
                s.rejected_rows += 1;
                s.rejected.row(data_fields + 3);
                &mut s.rejected
            }
            None => {
                self.row(data_fields + 3);
                &mut self.enc
            }
        };
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

    /// Ends the `COPY`; returns the number of lines it wrote. Streaming straight in, then
    /// stages the rejected rows held meanwhile.
    pub async fn finish(mut self, tx: &Transaction<'_>) -> Result<u64, tokio_postgres::Error> {
        let rest = self.enc.finish();
        self.sink.send(rest).await?;
        let written = self.sink.as_mut().finish().await?;
        if let Some(s) = self.straight.filter(|s| s.rejected_rows > 0) {
            let sink = tx.copy_in(COPY_MEASUREMENTS).await?;
            let mut sink = std::pin::pin!(sink);
            sink.send(s.rejected.finish()).await?;
            sink.as_mut().finish().await?;
        }
        Ok(written)
    }
}
