//! The ingestion ledger: one record per object version (bucket, key, ETag, write time).
//!
//! A version whose record says `done` is never ingested again. Every attempt on a version happens
//! inside a transaction that first takes a transaction-level advisory lock on that version, so two
//! workers (threads or processes) never ingest it at the same time: the second one waits, then sees
//! `done` and does nothing.

use chrono::{DateTime, Utc};
#[cfg(feature = "ingest")]
use deadpool_postgres::{ClientWrapper, Transaction};

/// How an object version was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Done,
    Failed,
    Ignored,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Ignored => "ignored",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "done" => Some(Status::Done),
            "failed" => Some(Status::Failed),
            "ignored" => Some(Status::Ignored),
            _ => None,
        }
    }
}

/// Identifies one version of one object: a key that goes back to earlier content (ETag A, then B,
/// then A again) has three versions, told apart by their write times.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectVersion {
    pub bucket: String,
    pub key: String,
    /// Without quotes; empty when the store gave none or the object was never read.
    pub etag: String,
    /// The write time (Last-Modified) the store reported for the bytes read; `None` for a key
    /// that was not read (ignored, or gone before it could be read).
    pub written_at: Option<DateTime<Utc>>,
}

impl std::fmt::Display for ObjectVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} (ETag {}", self.bucket, self.key, self.etag)?;
        match self.written_at {
            Some(t) => write!(f, ", written {})", t.to_rfc3339()),
            None => write!(f, ")"),
        }
    }
}

/// How the ledger stores "no write time": `-infinity`, so that the identity stays NOT NULL.
#[cfg(feature = "ingest")]
const NO_WRITE_TIME: &str = "coalesce($4::timestamptz, '-infinity')";

/// The ledger entry to write for an attempt.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub version: &'a ObjectVersion,
    /// `mapping`, `measurements`, or `none` for keys outside the data prefixes.
    pub dataset: &'static str,
    pub status: Status,
    pub size_bytes: Option<i64>,
    pub rows_ok: i64,
    pub rows_rejected: i64,
    pub reason: Option<&'a str>,
    pub started_at: DateTime<Utc>,
}

/// Opens a transaction that holds the lock of version `v`, unless `v` is already `done` (then
/// `None`: there is nothing to do).
///
/// The ledger's statements, like every statement an ingestion repeats, are prepared once per
/// connection (the pool's statement cache): one round trip each instead of two, no parsing.
#[cfg(feature = "ingest")]
pub async fn begin<'c>(
    client: &'c mut ClientWrapper,
    v: &ObjectVersion,
) -> Result<Option<Transaction<'c>>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    lock(&tx, v).await?;
    if status(&tx, v).await? == Some(Status::Done) {
        tx.commit().await?;
        return Ok(None);
    }
    Ok(Some(tx))
}

#[cfg(feature = "ingest")]
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";
#[cfg(feature = "ingest")]
const STATUS: &str = concat!(
    "SELECT status FROM ingest_ledger
     WHERE bucket = $1 AND object_key = $2 AND etag = $3 AND written_at = ",
    "coalesce($4::timestamptz, '-infinity')"
);

/// Takes the per-version lock for the rest of the transaction (waits while another holds it).
#[cfg(feature = "ingest")]
pub async fn lock(tx: &Transaction<'_>, v: &ObjectVersion) -> Result<(), tokio_postgres::Error> {
    let statement = tx.prepare_cached(LOCK).await?;
    lock_with(tx, &statement, v).await
}

/// The statements of [`lock_with`] and [`status_with`], prepared: statements sent together must
/// not wait on a preparation, or they would go out in another order.
#[cfg(feature = "ingest")]
pub async fn prepare_lock_and_status(
    tx: &Transaction<'_>,
) -> Result<(tokio_postgres::Statement, tokio_postgres::Statement), tokio_postgres::Error> {
    Ok((
        tx.prepare_cached(LOCK).await?,
        tx.prepare_cached(STATUS).await?,
    ))
}

/// [`lock`] with its prepared statement.
#[cfg(feature = "ingest")]
pub async fn lock_with(
    tx: &Transaction<'_>,
    statement: &tokio_postgres::Statement,
    v: &ObjectVersion,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(statement, &[&lock_name(v)]).await.map(drop)
}

/// The text whose hash names the advisory lock of version `v` (a test may hold it to stall an
/// ingestion). Collisions of the 64-bit hash only serialise two unrelated versions; they never
/// merge them.
pub fn lock_name(v: &ObjectVersion) -> String {
    let written = v.written_at.map(|t| t.to_rfc3339()).unwrap_or_default();
    format!("{}\n{}\n{}\n{}", v.bucket, v.key, v.etag, written)
}

/// The recorded status of a version, if any.
#[cfg(feature = "ingest")]
pub async fn status(
    tx: &Transaction<'_>,
    v: &ObjectVersion,
) -> Result<Option<Status>, tokio_postgres::Error> {
    let statement = tx.prepare_cached(STATUS).await?;
    status_with(tx, &statement, v).await
}

/// [`status`] with its prepared statement.
#[cfg(feature = "ingest")]
pub async fn status_with(
    tx: &Transaction<'_>,
    statement: &tokio_postgres::Statement,
    v: &ObjectVersion,
) -> Result<Option<Status>, tokio_postgres::Error> {
    let row = tx
        .query_opt(statement, &[&v.bucket, &v.key, &v.etag, &v.written_at])
        .await?;
    Ok(row.and_then(|r| Status::parse(r.get(0))))
}

/// Writes (or overwrites, counting the attempt) the entry of a version; returns its id.
///
/// Quarantine rows of an earlier attempt on the same version are removed: the caller writes the
/// ones of this attempt.
#[cfg(feature = "ingest")]
pub async fn record(tx: &Transaction<'_>, e: &Entry<'_>) -> Result<i64, tokio_postgres::Error> {
    let statement = tx
        .prepare_cached(&format!(
            "INSERT INTO ingest_ledger AS l
                 (bucket, object_key, etag, written_at, dataset, status, size_bytes, rows_ok,
                  rows_rejected, reason, started_at, finished_at)
             VALUES ($1, $2, $3, {NO_WRITE_TIME}, $5, $6, $7, $8, $9, $10, $11, clock_timestamp())
             ON CONFLICT (bucket, object_key, etag, written_at) DO UPDATE SET
                 dataset = EXCLUDED.dataset,
                 status = EXCLUDED.status,
                 size_bytes = EXCLUDED.size_bytes,
                 rows_ok = EXCLUDED.rows_ok,
                 rows_rejected = EXCLUDED.rows_rejected,
                 reason = EXCLUDED.reason,
                 started_at = EXCLUDED.started_at,
                 finished_at = EXCLUDED.finished_at,
                 attempts = l.attempts + 1
             RETURNING id, attempts"
        ))
        .await?;
    let row = tx
        .query_one(
            &statement,
            &[
                &e.version.bucket,
                &e.version.key,
                &e.version.etag,
                &e.version.written_at,
                &e.dataset,
                &e.status.as_str(),
                &e.size_bytes,
                &e.rows_ok,
                &e.rows_rejected,
                &e.reason,
                &e.started_at,
            ],
        )
        .await?;
    let id: i64 = row.get(0);
    let attempts: i32 = row.get(1);
    if attempts > 1 {
        tx.execute("DELETE FROM ingest_quarantine WHERE ledger_id = $1", &[&id])
            .await?;
    }
    Ok(id)
}
