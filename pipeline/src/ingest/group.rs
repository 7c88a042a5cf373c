//! Many small objects in one transaction: what makes thousands of small objects a second possible.
//!
//! A small object (a device's upload of a few minutes: 100 rows, 5 KB) costs little to read and
//! validate, but one transaction of its own costs a dozen round trips to the database — register
//! the version, begin, lock, check the ledger, start and end the `COPY`, write the ledger entry,
//! merge, queue detection, commit — each a wake-up of the worker and of a server process, and
//! each a statement to execute. In the small-objects benchmark that overhead, not the rows, was
//! the time. [`Ingestor::ingest_many`] ingests the measurement objects of a request of up to
//! [`Grouper::MOST`] keys that are at most [`GROUP_OBJECT_BYTES`] large together: their versions
//! locked, looked up in the ledger and registered in one pipelined round trip, their valid
//! readings held in memory (rejected rows staged, tagged with their version), their ledger entries
//! and detection queues pipelined, and one `COPY` of all their readings straight into the table
//! when none is stored within their spans ([`write::merge_group_held`]); otherwise they are
//! staged and upserted at once, where of the group's own lines for a key the newest version's
//! wins.
//! What the contract promises of one object holds for each of them:
//!
//! - Rows, quarantine and ledger entry of an object commit together (the group commits as one).
//! - An unusable object (no header, corrupt gzip, too many rejected rows) fails alone: its staged
//!   rows are dropped and its `failed` entry commits with the others. An object whose bytes could
//!   not be read to the end is left out (an error for it; the caller retries).
//! - Anything that breaks the transaction (the database refused or failed, the deadline passed)
//!   leaves nothing of the group and gives each member an [`IngestError::Grouped`]; [`Grouper`]
//!   retries those alone at once ([`Ingestor::ingest`]), so one object never keeps a group
//!   failing, and callers see what ingesting it alone gives.
//! - A version is never ingested by two at the same time: the group locks each member's version
//!   as [`Ingestor::ingest`] does, in one order (by lock name), so two groups cannot deadlock; a
//!   key asked for twice in one request is ingested alone after the group.
//!
//! [`Grouper`] forms the groups from concurrent callers: each call of [`Grouper::ingest`] for an
//! object that its event or listing says is small queues its key; a few lanes each take whatever
//! has queued (up to [`Grouper::MOST`]) and ingest it with [`Ingestor::ingest_many`]. Under load
//! the queue fills while the lanes work, so the groups grow with the load; an idle pipeline
//! ingests an object as soon as it arrives. Other objects are ingested alone; lanes and lone
//! objects together hold at most the grouper's `concurrency` transactions at once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot, Mutex, OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use super::{route, Compression, Counts, Disposition, IngestError, Ingestor, Outcome};
use super::{Keep, Route, StreamError};
use crate::contract::{Dataset, FileError, RecordReader};
use crate::object_store::OpenedObject;
use crate::readings::Held;
use crate::store::ledger::{self, Entry, ObjectVersion, Status};
use crate::store::versions;
use crate::store::write::{self, Member, Staging};
use crate::store::{PgResultExt, StoreError};

/// The largest object ingested in a group (stored size); larger ones get a transaction of their
/// own, as their rows, not the transaction, are then the cost.
pub const GROUP_OBJECT_BYTES: u64 = 256 * 1024;

/// One object of a group, read.
struct Opened {
    at: usize,
    key: String,
    compression: Compression,
    object: OpenedObject,
}

/// How a member's rows went: its counts, its readings (when detection is on or they are held),
/// the spans of its readings, and whether they are held (not staged).
enum Read {
    Ok(Counts, Option<Held>, write::Spans, bool),
    Failed(FileError),
    Unread(IngestError),
    AlreadyDone,
}

impl Ingestor {
    /// Ingests the current versions of `wanted` (key, and the ETag an event named, if any), in
    /// groups where it pays ([module docs](self)); returns each one's result, in order.
    pub async fn ingest_many(
        &self,
        wanted: &[(String, Option<String>)],
    ) -> Vec<Result<Outcome, IngestError>> {
        let mut seen = HashSet::new();
        let (mut candidates, mut alone) = (Vec::new(), Vec::new());
        for (at, (key, _)) in wanted.iter().enumerate() {
            let measurements = matches!(route(key), Route::Data(Dataset::Measurements, _));
            // A key twice in a group would be one version twice in one transaction.
            if measurements && wanted.len() > 1 && seen.insert(key.as_str()) {
                candidates.push(at);
            } else {
                alone.push(at);
            }
        }
        let opened = join_all(candidates.iter().map(|&at| self.store.open(&wanted[at].0))).await;
        let mut objects = Vec::new();
        let mut ats = Vec::new();
        for (at, object) in candidates.into_iter().zip(opened) {
            match object {
                Ok(object) => {
                    ats.push(at);
                    objects.push((wanted[at].0.clone(), object));
                }
                // Gone, or the store failed: the single path says what that means.
                Err(_) => alone.push(at),
            }
        }
        let mut results: Vec<Option<Result<Outcome, IngestError>>> =
            wanted.iter().map(|_| None).collect();
        for (at, r) in ats.into_iter().zip(self.ingest_objects(objects).await) {
            results[at] = Some(r);
        }
        for at in alone {
            let (key, etag) = &wanted[at];
            results[at] = Some(self.ingest(key, etag.as_deref()).await);
        }
        results
            .into_iter()
            .map(|r| r.expect("every key has a result"))
            .collect()
    }

    /// Ingests the versions `objects` are reading (key, opened object), as
    /// [`Ingestor::ingest_many`] does after its GETs: the small measurement objects in one
    /// transaction (if there are two or more; a key once), every other one alone, one transaction
    /// after the other. Returns each one's result, in order.
    pub async fn ingest_objects(
        &self,
        objects: Vec<(String, OpenedObject)>,
    ) -> Vec<Result<Outcome, IngestError>> {
        let mut seen = HashSet::new();
        let (mut group, mut alone) = (Vec::new(), Vec::new());
        for (at, (key, object)) in objects.into_iter().enumerate() {
            let small = object
                .size
                .is_some_and(|s| (0..=GROUP_OBJECT_BYTES as i64).contains(&s));
            match route(&key) {
                Route::Data(Dataset::Measurements, compression)
                    if small && !seen.contains(&key) =>
                {
                    seen.insert(key.clone());
                    group.push(Opened {
                        at,
                        key,
                        compression,
                        object,
                    });
                }
                _ => alone.push((at, key, object)),
            }
        }
        if group.len() == 1 {
            let m = group.remove(0);
            alone.insert(0, (m.at, m.key, m.object));
        }
        let mut results: Vec<Option<Result<Outcome, IngestError>>> =
            (0..group.len() + alone.len()).map(|_| None).collect();
        let ats: Vec<usize> = group.iter().map(|m| m.at).collect();
        if !group.is_empty() {
            for (at, r) in ats.into_iter().zip(self.ingest_group(group).await) {
                results[at] = Some(r);
            }
        }
        // One transaction at a time: the caller counts this call as one.
        alone.sort_by_key(|a| a.0);
        for (at, key, object) in alone {
            results[at] = Some(self.ingest_object(&key, object).await);
        }
        results
            .into_iter()
            .map(|r| r.expect("every object has a result"))
            .collect()
    }

    /// Ingests at least two small measurement objects in one transaction.
    async fn ingest_group(&self, members: Vec<Opened>) -> Vec<Result<Outcome, IngestError>> {
        let t0 = Instant::now();
        let versions: Vec<ObjectVersion> = members
            .iter()
            .map(|m| self.version(&m.key, &m.object.etag, Some(m.object.written_at)))
            .collect();
        let sizes: Vec<u64> = members
            .iter()
            .map(|m| m.object.size.unwrap_or(0).max(0) as u64)
            .collect();
        let keys: Vec<String> = members.iter().map(|m| m.key.clone()).collect();
        let (reads, merged) = match self.write_group(members, &versions, &sizes, t0).await {
            Ok(done) => done,
            Err(why) => {
                warn!(objects = keys.len(), reason = %why, "group not ingested; its objects are tried again alone");
                return keys
                    .iter()
                    .map(|_| Err(IngestError::Grouped(why.clone())))
                    .collect();
            }
        };
        let mut merged = merged.into_iter();
        // The group's detection work is its last ingested member's (one row per sensor, see
        // `write::queue`): that member takes the readings of all of them to detection, when every
        // member stored exactly its own (all new: a key two members share fails the insert).
        let mut pooled = Some(Held::default());
        let mut owner = None;
        let mut outcomes: Vec<Result<Outcome, IngestError>> = reads
            .into_iter()
            .zip(versions)
            .zip(sizes)
            .zip(&keys)
            .enumerate()
            .map(|(i, (((read, v), size), key))| {
                let outcome = |disposition, counts| {
                    self.outcome(v.clone(), Dataset::Measurements, disposition, counts, size, t0)
                };
                match read {
                    Read::Ok(counts, fresh, ..) => {
                        let m = merged.next().expect("a merge per ingested member");
                        let mut o = outcome(Disposition::Done, counts);
                        let mut fresh = fresh;
                        let distinct = fresh.as_mut().map(Held::settle);
                        match (&mut pooled, fresh) {
                            (Some(all), Some(own)) if distinct == Some(m.changed) => {
                                all.absorb(own);
                            }
                            _ => pooled = None,
                        }
                        if !m.work.is_empty() {
                            owner = Some(i);
                        }
                        o.anomaly_work = m.work;
                        o.met_stored = m.met_stored;
                        info!(%key, rows_ok = o.rows_ok, rows_rejected = o.rows_rejected, "object ingested");
                        Ok(o)
                    }
                    Read::Failed(f) => {
                        warn!(%key, reason = %f, "object failed");
                        Ok(outcome(Disposition::Failed(f.to_string()), Counts::default()))
                    }
                    Read::AlreadyDone => Ok(outcome(Disposition::AlreadyDone, Counts::default())),
                    Read::Unread(e) => Err(e),
                }
            })
            .collect();
        if let (Some(i), Some(mut all)) = (owner, pooled) {
            all.settle();
            if let Some(Ok(o)) = outcomes.get_mut(i) {
                o.fresh = Some(Arc::new(all));
            }
        }
        outcomes
    }

    /// The group's transaction: what each member read, and the merge of each one ingested (in
    /// order); an error when nothing was committed.
    async fn write_group(
        &self,
        members: Vec<Opened>,
        versions: &[ObjectVersion],
        sizes: &[u64],
        t0: Instant,
    ) -> Result<(Vec<Read>, Vec<write::Merged>), String> {
        let dataset = Dataset::Measurements;
        let started_at = Utc::now();
        let limits = self.limits;
        let deadline = tokio::time::Instant::from_std(t0 + limits.object_deadline);
        let mut client = self.dbs.client(dataset).await.map_err(|e| e.to_string())?;
        let db = |source| {
            StoreError::Postgres {
                database: crate::store::database_name(dataset),
                source,
            }
            .to_string()
        };
        let cancel = client.cancel_token();
        let tx = client.transaction().await.map_err(db)?;
        let (statements, register) = tokio::try_join!(
            ledger::GroupStatements::prepare(&tx),
            versions::prepare_all(&tx)
        )
        .map_err(db)?;
        // The locks, then the ledger, then the version numbers: one round trip.
        let (_, statuses, numbers) = tokio::try_join!(
            statements.lock(&tx, versions),
            statements.status(&tx, versions),
            versions::register_all(&tx, &register, versions)
        )
        .map_err(db)?;

        let past_deadline = || {
            format!(
                "not ingested within OBJECT_DEADLINE_SECS ({} s)",
                limits.object_deadline.as_secs()
            )
        };
        // The member being read (usize::MAX: none), to name the one a passed deadline stopped.
        let current = std::sync::atomic::AtomicUsize::new(usize::MAX);
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        let streamed = tokio::time::timeout_at(deadline, async {
            let mut staging = Staging::open_group(&tx).await.db(dataset)?;
            let mut reads = Vec::with_capacity(members.len());
            // The members' shares of the hold budget, kept until the group is written.
            let mut reserved = Vec::with_capacity(members.len());
            for (i, m) in members.into_iter().enumerate() {
                if statuses[i] == Some(Status::Done) {
                    reads.push(Read::AlreadyDone);
                    continue;
                }
                if sizes[i] > limits.max_object_bytes {
                    reads.push(Read::Failed(FileError::Limit(format!(
                        "the object has {} bytes, more than MAX_OBJECT_BYTES ({})",
                        sizes[i], limits.max_object_bytes
                    ))));
                    continue;
                }
                current.store(i, relaxed);
                staging.set_version(numbers[i]);
                let body = self.body(m.object.body, m.compression, sizes[i]);
                let mut reader = RecordReader::new(body, self.contract.delimiter);
                let read = self
                    .stream_rows(
                        &mut staging,
                        &mut reader,
                        dataset,
                        m.compression,
                        &m.key,
                        Keep::Member,
                    )
                    .await;
                reads.push(match read {
                    Ok(mut s) => {
                        // Held: settled (in time order, one per instant) and spanned here, for
                        // the merge to copy them straight in.
                        if s.held {
                            if let Some(f) = s.fresh.as_mut() {
                                f.settle();
                                s.spans = write::Spans::of_settled(&f.readings);
                            }
                        }
                        reserved.push(s.reserved);
                        Read::Ok(s.counts, s.fresh, s.spans, s.held)
                    }
                    Err(StreamError::File(f)) => Read::Failed(f),
                    Err(StreamError::Read(e)) => Read::Unread(e),
                    Err(StreamError::Store(e)) => return Err(e),
                    Err(StreamError::MetStored) => {
                        unreachable!("a group's rows are never streamed straight in")
                    }
                });
            }
            current.store(usize::MAX, relaxed);
            staging.finish(&tx).await.db(dataset)?;
            Ok::<_, StoreError>((reads, reserved))
        })
        .await;
        let (reads, _reserved) = match streamed {
            Ok(reads) => reads.map_err(|e| e.to_string())?,
            Err(_) => {
                self.dbs.cancel(dataset, &cancel).await;
                return Err(match versions.get(current.load(relaxed)) {
                    Some(v) => format!("{}: {}", v.key, past_deadline()),
                    None => past_deadline(),
                });
            }
        };

        let committed = tokio::time::timeout_at(deadline, async {
            let reasons: Vec<Option<String>> = reads
                .iter()
                .map(|r| match r {
                    Read::Failed(f) => Some(f.to_string()),
                    _ => None,
                })
                .collect();
            let mut recorded = Vec::new();
            let mut entries = Vec::new();
            for (i, read) in reads.iter().enumerate() {
                let (status, counts) = match read {
                    Read::Ok(counts, ..) => (Status::Done, *counts),
                    Read::Failed(_) => (Status::Failed, Counts::default()),
                    Read::Unread(_) | Read::AlreadyDone => continue,
                };
                recorded.push(i);
                entries.push(Entry {
                    version: &versions[i],
                    dataset: dataset.as_str(),
                    status,
                    size_bytes: Some(sizes[i] as i64),
                    rows_ok: counts.ok as i64,
                    rows_rejected: counts.rejected as i64,
                    reason: reasons[i].as_deref(),
                    started_at,
                });
            }
            let mut ids = vec![None; reads.len()];
            for (i, id) in recorded
                .into_iter()
                .zip(statements.record(&tx, &entries).await.db(dataset)?)
            {
                ids[i] = Some(id);
            }
            let mut unstage = Vec::new();
            let mut group = Vec::new();
            let mut held = Vec::new();
            for (i, read) in reads.iter().enumerate() {
                match read {
                    Read::Ok(counts, fresh, spans, is_held) => {
                        group.push(Member {
                            version: numbers[i],
                            key: &versions[i].key,
                            quarantine: (counts.rejected > 0).then_some(ids[i]).flatten(),
                            spans,
                        });
                        held.push(fresh.as_ref().filter(|_| *is_held).map(|f| &f.readings));
                    }
                    Read::Failed(_) | Read::Unread(_) => unstage.push(numbers[i]),
                    Read::AlreadyDone => {}
                }
            }
            let merged =
                write::merge_group_held(&tx, &group, &held, &unstage, self.detect_anomalies)
                    .await
                    .db(dataset)?;
            tx.commit().await.db(dataset)?;
            Ok::<_, StoreError>(merged)
        })
        .await;
        match committed {
            Ok(merged) => Ok((reads, merged.map_err(|e| e.to_string())?)),
            Err(_) => {
                self.dbs.cancel(dataset, &cancel).await;
                Err(past_deadline())
            }
        }
    }
}

/// A request queued for the lanes.
struct Request {
    key: String,
    etag: Option<String>,
    reply: oneshot::Sender<Result<Outcome, IngestError>>,
}

/// Groups the small objects that concurrent callers ingest ([module docs](self)), with at most
/// `concurrency` transactions in flight. Cloning shares the lanes; they stop when the last clone
/// is dropped.
#[derive(Clone)]
pub struct Grouper {
    requests: mpsc::UnboundedSender<Request>,
    ingestor: Ingestor,
    /// One per transaction in flight: a lane's group, or an object ingested alone.
    permits: Arc<Semaphore>,
    lanes: usize,
}

impl Grouper {
    /// The most objects one lane takes at once.
    pub const MOST: usize = 64;
    /// Transactions in flight per lane: an eighth of them are lanes, so that while they work
    /// requests queue up and the next groups are large — and few transactions insert at once
    /// (with one lane per transaction in flight, 16 lanes on 2 cores waited on each other's
    /// relation extension locks; bench-events 4,000 small objects: 1,120 objects/s with an
    /// eighth, 874 with a sixteenth, 720–880 with a quarter).
    const PER_LANE: usize = 8;
    /// Lanes at the least: small objects are bound by round trips, not CPU, so even at the
    /// default concurrency (the core count) one lane's group is forming while the other's
    /// commits. `bench-events --per-device` (20,000 files of 100 rows, defaults, 2 cores):
    /// two `run` workers 1,005 objects/s with one lane each, 1,155 with two; `ingest --all`
    /// 732 and 843.
    const MIN_LANES: usize = 2;

    /// Starts the lanes of `ingestor` for `concurrency` transactions in flight. Must be called
    /// within a Tokio runtime.
    pub fn new(ingestor: Ingestor, concurrency: usize) -> Self {
        let concurrency = concurrency.max(1);
        let lanes = concurrency.div_ceil(Self::PER_LANE).max(Self::MIN_LANES);
        let (requests, queue) = mpsc::unbounded_channel::<Request>();
        let queue = Arc::new(Mutex::new(queue));
        let permits = Arc::new(Semaphore::new(concurrency));
        for _ in 0..lanes {
            let (ingestor, queue, permits) = (ingestor.clone(), queue.clone(), permits.clone());
            tokio::spawn(async move {
                loop {
                    let mut taken = Vec::new();
                    {
                        let mut queue = queue.lock().await;
                        let Some(first) = queue.recv().await else {
                            return;
                        };
                        taken.push(first);
                        while taken.len() < Self::MOST {
                            match queue.try_recv() {
                                Ok(r) => taken.push(r),
                                Err(_) => break,
                            }
                        }
                    }
                    let Ok(_permit) = permits.acquire().await else {
                        return;
                    };
                    // A caller that stopped waiting (shutdown) needs no answer.
                    taken.retain(|r| !r.reply.is_closed());
                    let wanted: Vec<(String, Option<String>)> = taken
                        .iter()
                        .map(|r| (r.key.clone(), r.etag.clone()))
                        .collect();
                    let results = ingestor.ingest_many(&wanted).await;
                    for (r, result) in taken.into_iter().zip(results) {
                        let _ = r.reply.send(result);
                    }
                }
            });
        }
        Self {
            requests,
            ingestor,
            permits,
            lanes,
        }
    }

    /// How many objects callers should keep in flight so that the lanes find groups to take:
    /// [`Grouper::MOST`] per lane.
    pub fn in_flight(&self) -> usize {
        self.lanes * Self::MOST
    }

    /// Ingests the current version of `key` (see [`Ingestor::ingest`]): in a group with what other
    /// callers ingest meanwhile if `size` (the stored size an event or a listing gave) says it is
    /// small, alone otherwise. A group that failed is retried alone at once, so the caller sees
    /// what [`Ingestor::ingest`] would have returned. `waiting` (a caller's budget of objects not
    /// yet being ingested) is released once the object is queued for a group (the next group a
    /// lane forms takes it), or else when it is ingested alone.
    pub async fn ingest(
        &self,
        key: &str,
        etag: Option<&str>,
        size: Option<i64>,
        mut waiting: Option<OwnedSemaphorePermit>,
    ) -> Result<Outcome, IngestError> {
        let small = size.is_some_and(|s| (0..=GROUP_OBJECT_BYTES as i64).contains(&s))
            && matches!(route(key), Route::Data(Dataset::Measurements, _));
        if small {
            let (reply, answer) = oneshot::channel();
            let request = Request {
                key: key.to_string(),
                etag: etag.map(str::to_string),
                reply,
            };
            if self.requests.send(request).is_ok() {
                // Queued: the next group of a lane takes it.
                drop(waiting.take());
                match answer.await {
                    Ok(Err(IngestError::Grouped(_))) | Err(_) => {}
                    Ok(result) => return result,
                }
            }
        }
        let _permit = self.permits.acquire().await;
        let result = self.ingestor.ingest(key, etag).await;
        drop(waiting);
        result
    }
}
