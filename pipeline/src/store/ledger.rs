//! The ingestion ledger: one record per object version (bucket, key, ETag).
//!
//! A version whose record says `done` is never ingested again. Every attempt on a version happens
//! inside a transaction that first takes a transaction-level advisory lock on that version, so two
//! workers (threads or processes) never ingest it at the same time: the second one waits, then sees
//! `done` and does nothing.

use chrono::{DateTime, Utc};
use tokio_postgres::Transaction;

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

/// Identifies one version of one object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectVersion {
    pub bucket: String,
    pub key: String,
    /// Without quotes; empty when the version is unknown (e.g. the object vanished before it was read).
    pub etag: String,
}

impl std::fmt::Display for ObjectVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} (ETag {})", self.bucket, self.key, self.etag)
    }
}

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
pub async fn begin<'c>(
    client: &'c mut tokio_postgres::Client,
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

/// Takes the per-version lock for the rest of the transaction (waits while another holds it).
pub async fn lock(tx: &Transaction<'_>, v: &ObjectVersion) -> Result<(), tokio_postgres::Error> {
    // Collisions of the 64-bit hash only serialise two unrelated objects; they never merge them.
    let name = format!("{}\n{}\n{}", v.bucket, v.key, v.etag);
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        &[&name],
    )
    .await
    .map(drop)
}

/// The recorded status of a version, if any.
pub async fn status(
    tx: &Transaction<'_>,
    v: &ObjectVersion,
) -> Result<Option<Status>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "SELECT status FROM ingest_ledger WHERE bucket = $1 AND object_key = $2 AND etag = $3",
            &[&v.bucket, &v.key, &v.etag],
        )
        .await?;
    Ok(row.and_then(|r| Status::parse(r.get(0))))
}

/// Writes (or overwrites, counting the attempt) the entry of a version; returns its id.
///
/// Quarantine rows of an earlier attempt on the same version are removed: the caller writes the
/// ones of this attempt.
pub async fn record(tx: &Transaction<'_>, e: &Entry<'_>) -> Result<i64, tokio_postgres::Error> {
    let row = tx
        .query_one(
            "INSERT INTO ingest_ledger AS l
                 (bucket, object_key, etag, dataset, status, size_bytes, rows_ok, rows_rejected,
                  reason, started_at, finished_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, clock_timestamp())
             ON CONFLICT (bucket, object_key, etag) DO UPDATE SET
                 dataset = EXCLUDED.dataset,
                 status = EXCLUDED.status,
                 size_bytes = EXCLUDED.size_bytes,
                 rows_ok = EXCLUDED.rows_ok,
                 rows_rejected = EXCLUDED.rows_rejected,
                 reason = EXCLUDED.reason,
                 started_at = EXCLUDED.started_at,
                 finished_at = EXCLUDED.finished_at,
                 attempts = l.attempts + 1
             RETURNING id, attempts",
            &[
                &e.version.bucket,
                &e.version.key,
                &e.version.etag,
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
