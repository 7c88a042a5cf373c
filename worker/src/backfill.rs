//! `sensors-worker backfill`: enqueues objects that already exist, as if MinIO had just announced
//! them, so the running workers ingest them.
//!
//! Every object (of the given prefixes, or the whole bucket) becomes one event in MinIO's format
//! whose JetStream message id is derived from bucket, key, ETag and write time (the version's
//! identity): running backfill again within the stream's duplicate window enqueues nothing twice,
//! and a version already ingested is a no-op for the workers anyway. Mapping objects are enqueued
//! first (not needed for the end state, which does not depend on the order, but the names are
//! there sooner). ETag and write time come from a HEAD request, not the listing (not every S3
//! server lists ETags). With `--wait` it follows the ledgers (and the
//! dead letters) until every enqueued object is settled.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use sensor_pipeline::contract::Dataset;
use sensor_pipeline::events::{encode_key, object_created};
use sensor_pipeline::object_store::{ObjectStore, ObjectStoreError};
use sensor_pipeline::queue::Queue;
use sensor_pipeline::store::ledger::Status;
use sensor_pipeline::store::Databases;

/// One ledger entry of an enqueued key.
struct LedgerEntry {
    etag: String,
    written_at: Option<DateTime<Utc>>,
    status: String,
    reason: Option<String>,
    finished_at: DateTime<Utc>,
}

/// An enqueued object version.
struct Enqueued {
    key: String,
    etag: String,
    written_at: Option<DateTime<Utc>>,
}

/// How an enqueued object ended: its ledger entry, or a dead letter (retries exhausted before
/// any ledger entry was written).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Settled {
    Ledger {
        status: Status,
        reason: Option<String>,
    },
    DeadLettered(String),
}

impl Settled {
    fn is(&self, status: Status) -> bool {
        matches!(self, Settled::Ledger { status: s, .. } if *s == status)
    }
}

pub async fn backfill(
    store: &ObjectStore,
    queue: &Queue,
    dbs: &Databases,
    prefixes: &[String],
    wait: bool,
) -> anyhow::Result<bool> {
    let since = database_now(dbs).await?;
    let mut keys = Vec::new();
    if prefixes.is_empty() {
        keys.extend(store.list(None).await.context("listing the bucket")?);
    } else {
        for prefix in prefixes {
            keys.extend(
                store
                    .list(Some(prefix))
                    .await
                    .with_context(|| format!("listing prefix {prefix:?}"))?,
            );
        }
    }
    let mut keys: Vec<String> = keys.into_iter().map(|o| o.key).collect();
    keys.sort_by(|a, b| (!a.starts_with("mapping/"), a).cmp(&(!b.starts_with("mapping/"), b)));
    keys.dedup();

    let bucket = store.bucket().to_string();
    // Mapping objects strictly first: their events are stored before any other is published.
    let mapping_count = keys.iter().filter(|k| k.starts_with("mapping/")).count();
    let (mapping, rest) = keys.split_at(mapping_count);
    let mut enqueued = Vec::with_capacity(keys.len());
    let mut duplicates = 0;
    for group in [mapping, rest] {
        let results: Vec<Option<(Enqueued, bool)>> = stream::iter(group.iter().cloned())
            .map(|key| enqueue(store, queue, &bucket, key))
            .buffered(32)
            .try_collect()
            .await?;
        for (e, duplicate) in results.into_iter().flatten() {
            duplicates += usize::from(duplicate);
            enqueued.push(e);
        }
    }
    println!(
        "enqueued {} objects ({} already enqueued within the duplicate window)",
        enqueued.len() - duplicates,
        duplicates
    );
    if !wait {
        return Ok(true);
    }
    follow(queue, dbs, &bucket, &enqueued, since).await
}

/// HEADs and publishes one object; None if it vanished meanwhile. Returns whether the publish
/// was a duplicate.
async fn enqueue(
    store: &ObjectStore,
    queue: &Queue,
    bucket: &str,
    key: String,
) -> anyhow::Result<Option<(Enqueued, bool)>> {
    let head = match store.head(&key).await {
        Ok(v) => v,
        Err(ObjectStoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading the ETag of {key:?}")),
    };
    let payload = object_created("s3:ObjectCreated:Put", bucket, &key, &head.etag, head.size);
    let written = head
        .written_at
        .map(|t| t.timestamp_micros().to_string())
        .unwrap_or_default();
    let id = format!(
        "backfill/{bucket}/{}/{}/{written}",
        encode_key(&key),
        head.etag
    );
    let duplicate = queue.publish_event(payload, Some(&id)).await?;
    let enqueued = Enqueued {
        key,
        etag: head.etag,
        written_at: head.written_at,
    };
    Ok(Some((enqueued, duplicate)))
}

async fn database_now(dbs: &Databases) -> anyhow::Result<DateTime<Utc>> {
    let client = dbs.client(Dataset::Mapping).await?;
    Ok(client
        .query_one("SELECT now()", &[])
        .await
        .context("reading the database clock")?
        .get(0))
}

/// Polls the ledgers and the dead letters until every enqueued object is settled. A version
/// counts as settled when the ledger has it (ETag and write time), or has another version of the
/// key settled since the backfill started (the object changed between HEAD and GET).
async fn follow(
    queue: &Queue,
    dbs: &Databases,
    bucket: &str,
    enqueued: &[Enqueued],
    since: DateTime<Utc>,
) -> anyhow::Result<bool> {
    let total = enqueued.len() as u64;
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} settled  {elapsed_precise}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let keys: Vec<String> = enqueued.iter().map(|e| e.key.clone()).collect();
    let started = Instant::now();
    let mut last_log = Instant::now();
    let settled = loop {
        let settled = settled(queue, dbs, bucket, enqueued, &keys, since).await?;
        bar.set_position(settled.len() as u64);
        if settled.len() == enqueued.len() {
            break settled;
        }
        if bar.is_hidden() && last_log.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "settled {}/{} after {:.0} s",
                settled.len(),
                total,
                started.elapsed().as_secs_f64()
            );
            last_log = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    bar.finish_and_clear();
    let count = |f: fn(&Settled) -> bool| settled.values().filter(|s| f(s)).count();
    println!(
        "settled: {} done, {} ignored, {} failed, {} dead-lettered",
        count(|s| s.is(Status::Done)),
        count(|s| s.is(Status::Ignored)),
        count(|s| s.is(Status::Failed)),
        count(|s| matches!(s, Settled::DeadLettered(_))),
    );
    let mut ok = true;
    for (key, s) in &settled {
        match s {
            Settled::Ledger {
                status: Status::Failed,
                reason,
            } => println!("failed: {key}: {}", reason.as_deref().unwrap_or("")),
            Settled::DeadLettered(reason) => println!("dead-lettered: {key}: {reason}"),
            Settled::Ledger { .. } => continue,
        }
        ok = false;
    }
    Ok(ok)
}

async fn settled(
    queue: &Queue,
    dbs: &Databases,
    bucket: &str,
    enqueued: &[Enqueued],
    keys: &[String],
    since: DateTime<Utc>,
) -> anyhow::Result<BTreeMap<String, Settled>> {
    let mut ledger: HashMap<String, Vec<LedgerEntry>> = HashMap::new();
    let mut datasets = vec![Dataset::Mapping];
    if !dbs.same_database() {
        datasets.push(Dataset::Measurements);
    }
    for dataset in datasets {
        let client = dbs.client(dataset).await?;
        for row in client
            .query(
                "SELECT object_key, etag, \
                        CASE WHEN written_at = '-infinity' THEN NULL ELSE written_at END, \
                        status, reason, finished_at FROM ingest_ledger \
                 WHERE bucket = $1 AND object_key = ANY($2)",
                &[&bucket, &keys],
            )
            .await
            .context("reading the ledger")?
        {
            ledger.entry(row.get(0)).or_default().push(LedgerEntry {
                etag: row.get(1),
                written_at: row.get(2),
                status: row.get(3),
                reason: row.get(4),
                finished_at: row.get(5),
            });
        }
    }
    let mut out = BTreeMap::new();
    for e in enqueued {
        let entry = ledger.get(&e.key).and_then(|versions| {
            versions
                .iter()
                .find(|l| l.etag == e.etag && l.written_at == e.written_at)
                .or_else(|| versions.iter().find(|l| l.finished_at >= since))
        });
        if let Some(l) = entry {
            let state = Settled::Ledger {
                // The ledger's CHECK constraint allows only the statuses `Status` knows.
                status: Status::parse(&l.status).unwrap_or(Status::Failed),
                reason: l.reason.clone(),
            };
            out.insert(e.key.clone(), state);
        }
    }
    // Dead letters only matter for versions the ledgers do not have (retries exhausted).
    if out.len() < enqueued.len() {
        let wanted: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
        for letter in queue.dead_letters().await? {
            if letter.failed_at.is_some_and(|t| t >= since) {
                for key in letter.keys {
                    if wanted.contains(key.as_str()) {
                        out.entry(key)
                            .or_insert_with(|| Settled::DeadLettered(letter.reason.clone()));
                    }
                }
            }
        }
    }
    Ok(out)
}
