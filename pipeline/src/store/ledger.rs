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

/// How writing the entry of a version that has one overwrites it, counting the attempt (the
/// ledger's alias is `l`).
#[cfg(feature = "ingest")]
const RECORD_AGAIN: &str = "ON CONFLICT (bucket, object_key, etag, written_at) DO UPDATE SET
    dataset = EXCLUDED.dataset, status = EXCLUDED.status, size_bytes = EXCLUDED.size_bytes,
    rows_ok = EXCLUDED.rows_ok, rows_rejected = EXCLUDED.rows_rejected, reason = EXCLUDED.reason,
    started_at = EXCLUDED.started_at, finished_at = EXCLUDED.finished_at,
    attempts = l.attempts + 1";

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
    tx.execute(&statement, &[&lock_name(v)]).await.map(drop)
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
    let row = tx
        .query_opt(&statement, &[&v.bucket, &v.key, &v.etag, &v.written_at])
        .await?;
    Ok(row.and_then(|r| Status::parse(r.get(0))))
}

/// The statements of a group of versions of one bucket (see `crate::ingest::Grouper`): each one
/// statement for all of them, prepared before any is sent so that they go out in their order.
#[cfg(feature = "ingest")]
pub struct GroupStatements {
    lock: tokio_postgres::Statement,
    status: tokio_postgres::Statement,
    record: tokio_postgres::Statement,
}

#[cfg(feature = "ingest")]
impl GroupStatements {
    pub async fn prepare(tx: &Transaction<'_>) -> Result<Self, tokio_postgres::Error> {
        let record = format!(
            "INSERT INTO ingest_ledger AS l
                 (bucket, object_key, etag, written_at, dataset, status, size_bytes, rows_ok,
                  rows_rejected, reason, started_at, finished_at)
             SELECT $1, e.*, $10, clock_timestamp()
             FROM unnest($2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[],
                         $7::bigint[], $8::bigint[], $9::bigint[], $11::text[])
                 AS e(object_key, etag, written_at, dataset, status, size_bytes, rows_ok,
                      rows_rejected, reason)
             ORDER BY e.object_key
             {RECORD_AGAIN} RETURNING object_key, id, attempts"
        );
        let (lock, status, record) = tokio::try_join!(
            tx.prepare_cached(
                "SELECT count(pg_advisory_xact_lock(hashtextextended(n, 0))) \
                 FROM unnest($1::text[]) AS n"
            ),
            tx.prepare_cached(
                // A subquery per version: one index probe each, whatever the planner thinks of
                // the ledger's size (as a join it may hash the whole ledger).
                "SELECT v.i, (SELECT l.status FROM ingest_ledger l
                              WHERE l.bucket = $1 AND l.object_key = v.object_key
                                  AND l.etag = v.etag AND l.written_at = v.written_at)
                 FROM unnest($2::text[], $3::text[], $4::timestamptz[]) WITH ORDINALITY
                     AS v(object_key, etag, written_at, i)"
            ),
            tx.prepare_cached(&record),
        )?;
        Ok(Self {
            lock,
            status,
            record,
        })
    }

    /// [`lock`] for every version of `group`, in one order (by lock name): two groups never wait
    /// on each other in a cycle.
    pub async fn lock(
        &self,
        tx: &Transaction<'_>,
        group: &[ObjectVersion],
    ) -> Result<(), tokio_postgres::Error> {
        let mut names: Vec<String> = group.iter().map(lock_name).collect();
        names.sort();
        tx.execute(&self.lock, &[&names]).await.map(drop)
    }

    /// [`status`] of every version of `group` (all of one bucket, all read), in order.
    pub async fn status(
        &self,
        tx: &Transaction<'_>,
        group: &[ObjectVersion],
    ) -> Result<Vec<Option<Status>>, tokio_postgres::Error> {
        let (bucket, keys, etags, written) = columns(group);
        let mut out = vec![None; group.len()];
        for row in tx
            .query(&self.status, &[&bucket, &keys, &etags, &written])
            .await?
        {
            let i: i64 = row.get(0);
            out[i as usize - 1] = row.get::<_, Option<&str>>(1).and_then(Status::parse);
        }
        Ok(out)
    }

    /// [`record`] of every entry (versions of one bucket, each key once); returns their ids, in
    /// order.
    pub async fn record(
        &self,
        tx: &Transaction<'_>,
        entries: &[Entry<'_>],
    ) -> Result<Vec<i64>, tokio_postgres::Error> {
        let Some(first) = entries.first() else {
            return Ok(Vec::new());
        };
        let versions: Vec<ObjectVersion> = entries.iter().map(|e| e.version.clone()).collect();
        let (bucket, keys, etags, written) = columns(&versions);
        let datasets: Vec<&str> = entries.iter().map(|e| e.dataset).collect();
        let statuses: Vec<&str> = entries.iter().map(|e| e.status.as_str()).collect();
        let sizes: Vec<Option<i64>> = entries.iter().map(|e| e.size_bytes).collect();
        let oks: Vec<i64> = entries.iter().map(|e| e.rows_ok).collect();
        let rejected: Vec<i64> = entries.iter().map(|e| e.rows_rejected).collect();
        let reasons: Vec<Option<&str>> = entries.iter().map(|e| e.reason).collect();
        let rows = tx
            .query(
                &self.record,
                &[
                    &bucket,
                    &keys,
                    &etags,
                    &written,
                    &datasets,
                    &statuses,
                    &sizes,
                    &oks,
                    &rejected,
                    &first.started_at,
                    &reasons,
                ],
            )
            .await?;
        let mut ids = std::collections::HashMap::new();
        let mut again = Vec::new();
        for row in rows {
            let (key, id, attempts): (String, i64, i32) = (row.get(0), row.get(1), row.get(2));
            if attempts > 1 {
                again.push(id);
            }
            ids.insert(key, id);
        }
        if !again.is_empty() {
            tx.execute(
                "DELETE FROM ingest_quarantine WHERE ledger_id = ANY($1)",
                &[&again],
            )
            .await?;
        }
        Ok(keys.iter().map(|k| ids[*k]).collect())
    }
}

/// Bucket, keys, ETags and write times of versions of one bucket that were read.
#[cfg(feature = "ingest")]
fn columns(group: &[ObjectVersion]) -> (&str, Vec<&str>, Vec<&str>, Vec<DateTime<Utc>>) {
    let bucket = group.first().map_or("", |v| v.bucket.as_str());
    debug_assert!(group
        .iter()
        .all(|v| v.bucket == bucket && v.written_at.is_some()));
    (
        bucket,
        group.iter().map(|v| v.key.as_str()).collect(),
        group.iter().map(|v| v.etag.as_str()).collect(),
        group.iter().filter_map(|v| v.written_at).collect(),
    )
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
             {RECORD_AGAIN} RETURNING id, attempts"
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
