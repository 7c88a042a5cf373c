//! The staging table: one binary `COPY` stream per object (or group of small objects) into a
//! temporary table whose rows live as long as the transaction — valid rows with their fields,
//! rejected rows with their raw bytes and reason.

use super::*;

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
