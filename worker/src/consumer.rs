//! `run`'s consumer loop: fetches MinIO events from the shared JetStream consumer and ingests
//! every object they name; what it then tells JetStream is [`crate::settle`]'s.
//!
//! One event message is one unit of work: it is acknowledged only after every object version it
//! names has been settled (its transaction committed, or recorded as failed/ignored). While an
//! object is being ingested the message gets an in-progress ack every third of the ack wait, so
//! JetStream does not hand it to another worker; if this process dies, JetStream redelivers it
//! after the ack wait and the ledger makes the second attempt exact (a version already `done` is
//! a no-op; a half-written one was rolled back).
//!
//! Outages: while a dependency is down ([`crate::health`]) the worker fetches nothing, and an
//! event whose ingestion failed because of it is held with in-progress acks and tried again
//! once the dependency is back — in the same delivery, so no outage uses up its deliveries.
//!
//! Failures: an undecodable event, an event for another bucket (a misconfiguration) or a failed
//! object is permanent — dead-lettered with the reason, then acked. Anything else (database, object store, network) is transient — nak'ed with
//! a growing delay so JetStream redelivers it, and dead-lettered once `NATS_MAX_DELIVER`
//! deliveries are used up. Shutdown (SIGINT/SIGTERM) stops fetching, lets in-flight objects finish
//! within the grace period, and naks what is still unfinished so another worker takes it — except
//! at its last delivery, where it is dead-lettered instead (a nak would strand it). An event whose
//! last delivery ends with no word at all (a crash) is dead-lettered by [`crate::stranded`].
//!
//! An ingested object hands the detection work its transaction queued to the detection loop
//! ([`crate::detect`]) and is acknowledged without waiting for it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use sensor_pipeline::events::{self, ObjectEvent};
use sensor_pipeline::ingest::{Disposition, Grouper, IngestError, Ingestor, Outcome};
use sensor_pipeline::queue::dead_letters::Filing;
use sensor_pipeline::queue::Queue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use crate::health::Health;
use crate::settle::{settle, Action, Verdict};
use crate::{detect, telemetry};

/// How long one fetch waits for events before the loop looks at the shutdown signal again.
const FETCH_WAIT: Duration = Duration::from_secs(1);
/// How often a worker waiting for a dependency checks whether it is back.
const HOLD_POLL: Duration = Duration::from_secs(1);

pub struct Worker {
    pub ingestor: Ingestor,
    /// Ingests small objects in groups ([`Grouper`]), at most `concurrency` transactions at once.
    pub grouper: Grouper,
    pub queue: Queue,
    /// What is checked before fetching, and while an event waits out an outage.
    pub health: Health,
    /// Transactions in flight at once, and events held that are not being ingested yet.
    pub concurrency: usize,
    /// How long in-flight objects may take to finish after a shutdown signal.
    pub grace: Duration,
    /// Where the anomaly detection queued by ingested objects goes (none: detection is off).
    pub detections: Option<detect::Handoff>,
}

impl Worker {
    /// Consumes until `shutdown` fires, then drains (see the module docs). Returns when done.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let consumer = self.queue.consumer().await?;
        let worker = Arc::new(self);
        // Every event in flight holds a slot, and a waiting slot until its object is being
        // ingested (a small one: queued for the next group; any other: to the end). A fetch asks
        // for no more than both have free, so a worker never holds more large objects' events
        // than `concurrency` that it is not working on (the others stay for the other workers),
        // while small objects fill the next groups up to the slots.
        let slots = Arc::new(Semaphore::new(
            worker.grouper.in_flight().max(worker.concurrency),
        ));
        let unstarted = Arc::new(Semaphore::new(worker.concurrency));
        let abort = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let mut waiting = false;
        let mut checked = None;
        info!(
            concurrency = worker.concurrency,
            consumer = %worker.queue.settings().consumer,
            "consuming events"
        );
        while !shutdown.is_cancelled() {
            // Wait for a free slot, then ask for as many events as there are free slots.
            let slot = tokio::select! {
                _ = shutdown.cancelled() => break,
                slot = async {
                    let slot = slots.clone().acquire_owned().await?;
                    let one = unstarted.clone().acquire_owned().await?;
                    Ok::<_, tokio::sync::AcquireError>((slot, one))
                } => slot?,
            };
            drop(slot);
            // A dependency down: fetch nothing until it is back (what is in flight is held).
            // Checked at most every HOLD_POLL while it answers.
            let due = checked.is_none_or(|at: std::time::Instant| at.elapsed() >= HOLD_POLL);
            let health = if due {
                worker.health.check().await
            } else {
                Ok(())
            };
            if let Err(why) = health {
                checked = None;
                if !waiting {
                    warn!(%why, "a dependency is down: not fetching events until it is back");
                    waiting = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(HOLD_POLL) => {
                        metrics::counter!(telemetry::WAITED, "what" => "fetch")
                            .increment(HOLD_POLL.as_secs());
                        continue;
                    }
                }
            }
            if due {
                checked = Some(std::time::Instant::now());
            }
            if std::mem::take(&mut waiting) {
                info!("dependencies are back: fetching events again");
            }
            let wanted = slots
                .available_permits()
                .min(unstarted.available_permits())
                .max(1);
            let batch = consumer
                .fetch()
                .max_messages(wanted)
                .expires(FETCH_WAIT)
                .messages()
                .await;
            let mut batch = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    warn!(error = %e, "cannot fetch events; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            // Read the batch to its end even when stopping: events already sent to us are handed
            // back at once instead of waiting out the ack wait.
            while let Some(message) = batch.next().await {
                let message = match message {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "event fetch interrupted");
                        break;
                    }
                };
                if shutdown.is_cancelled() {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                    continue;
                }
                let slot = slots.clone().acquire_owned().await?;
                let one = unstarted.clone().acquire_owned().await?;
                let (worker, abort) = (worker.clone(), abort.clone());
                tasks.spawn(async move {
                    worker.handle(message, &abort, one).await;
                    drop(slot);
                });
            }
            while tasks.try_join_next().is_some() {}
        }

        info!(in_flight = tasks.len(), grace = ?worker.grace, "stopping: finishing in-flight objects");
        let deadline = tokio::time::sleep(worker.grace);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = tasks.join_next() => if next.is_none() { break },
                _ = &mut deadline => {
                    warn!(unfinished = tasks.len(), "grace period over: handing unfinished objects back");
                    abort.cancel();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        info!("stopped");
        Ok(())
    }

    /// Settles one event; `waiting` is released once its first object is being ingested.
    async fn handle(
        &self,
        message: jetstream::Message,
        abort: &CancellationToken,
        waiting: OwnedSemaphorePermit,
    ) {
        let mut waiting = Some(waiting);
        let (delivered, sequence) = match message.info() {
            Ok(i) => (i.delivered, i.stream_sequence),
            Err(_) => (1, 0),
        };
        metrics::gauge!(telemetry::IN_FLIGHT).increment(1.0);
        let verdict = loop {
            match self.process(&message, abort, &mut waiting).await {
                // An outage, not a flaky request: wait it out within this delivery.
                Verdict::Retry(reason) => match self.health.check().await {
                    Ok(()) => break Verdict::Retry(reason),
                    Err(why) => {
                        warn!(%reason, %why, "a dependency is down: holding the event until it is back");
                        if !self.hold(&message, abort).await {
                            break Verdict::HandBack;
                        }
                        info!("dependencies are back: trying the event again");
                    }
                },
                verdict => break verdict,
            }
        };
        metrics::gauge!(telemetry::IN_FLIGHT).decrement(1.0);

        let settings = self.queue.settings();
        let (reason, keys) = match settle(verdict, delivered, settings.max_deliver) {
            Action::Ack => {
                ack(&message).await;
                return;
            }
            Action::HandBack => {
                let _ = message.ack_with(AckKind::Nak(None)).await;
                return;
            }
            Action::Retry { reason, delay } => {
                warn!(%reason, delivered, retry_in = ?delay, "transient failure; the event will be redelivered");
                metrics::counter!(telemetry::OBJECTS, "outcome" => "retried").increment(1);
                let _ = message.ack_with(AckKind::Nak(Some(delay))).await;
                return;
            }
            Action::DeadLetter {
                reason,
                keys,
                stranded,
            } => {
                if stranded {
                    metrics::counter!(telemetry::STRANDED, "path" => "last_delivery").increment(1);
                }
                let keys = keys.unwrap_or_else(|| event_keys(&message.payload));
                (reason, keys)
            }
        };
        let filing = Filing {
            payload: &message.payload,
            reason: &reason,
            keys: &keys,
            attempts: delivered,
            event_sequence: sequence,
        };
        match self.queue.dead_letter(&filing).await {
            Ok(()) => {
                warn!(%reason, ?keys, "event dead-lettered");
                metrics::counter!(telemetry::OBJECTS, "outcome" => "dead_lettered").increment(1);
                ack(&message).await;
            }
            Err(e) => {
                // Not filed: keep the event; it comes back after a delay.
                warn!(error = %e, "cannot dead-letter the event; it will be redelivered");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                    .await;
            }
        }
    }

    async fn process(
        &self,
        message: &jetstream::Message,
        abort: &CancellationToken,
        waiting: &mut Option<OwnedSemaphorePermit>,
    ) -> Verdict {
        let events = match events::decode(&message.payload) {
            Ok(events) => events,
            Err(e) => {
                metrics::counter!(telemetry::EVENTS, "kind" => "undecodable").increment(1);
                return Verdict::DeadLetter {
                    reason: e.to_string(),
                    keys: Vec::new(),
                };
            }
        };
        let mut failed = Vec::new();
        for event in events {
            if !event.is_created() {
                metrics::counter!(telemetry::EVENTS, "kind" => "not_created").increment(1);
                info!(event = %event.name, key = %event.key, "ignoring event (not an object creation)");
                continue;
            }
            if event.bucket != self.ingestor.store().bucket() {
                // A misconfiguration (this worker's MINIO_BUCKET, or MinIO's notification
                // target): someone must see it, and the event must survive it for a replay.
                metrics::counter!(telemetry::EVENTS, "kind" => "other_bucket").increment(1);
                let reason = format!(
                    "the event is for bucket {:?}, but this worker reads bucket {:?} \
                     (MINIO_BUCKET); replay it once a worker for that bucket consumes the events",
                    event.bucket,
                    self.ingestor.store().bucket()
                );
                warn!(bucket = %event.bucket, key = %event.key, "event for another bucket");
                failed.push((event.key, reason));
                continue;
            }
            metrics::counter!(telemetry::EVENTS, "kind" => "object_created").increment(1);
            let span = tracing::info_span!("object", key = %event.key, etag = event.etag.as_deref().unwrap_or(""));
            let result = self
                .ingest(message, &event, abort, waiting.take())
                .instrument(span.clone())
                .await;
            let _entered = span.enter();
            match result {
                None => return Verdict::HandBack,
                Some(Err(e)) => return Verdict::Retry(format!("{}: {e}", event.key)),
                Some(Ok(outcome)) => {
                    telemetry::record(&outcome);
                    if let (Some(to), false) = (&self.detections, outcome.anomaly_work.is_empty()) {
                        to.send(outcome.anomaly_work.clone(), outcome.fresh.clone());
                    }
                    log_outcome(&outcome);
                    if let Disposition::Failed(reason) = outcome.disposition {
                        failed.push((event.key, reason));
                    }
                }
            }
        }
        if failed.is_empty() {
            return Verdict::Ack;
        }
        Verdict::DeadLetter {
            reason: failed
                .iter()
                .map(|(k, r)| format!("{k}: {r}"))
                .collect::<Vec<_>>()
                .join("; "),
            keys: failed.into_iter().map(|(k, _)| k).collect(),
        }
    }

    /// Holds `message` (in-progress acks) until the dependencies answer again: true, or false if
    /// aborted (shutdown) first.
    async fn hold(&self, message: &jetstream::Message, abort: &CancellationToken) -> bool {
        metrics::gauge!(telemetry::HELD).increment(1.0);
        let back = async {
            let mut poll = tokio::time::interval(HOLD_POLL);
            poll.tick().await; // the first tick is immediate
            loop {
                poll.tick().await;
                metrics::counter!(telemetry::WAITED, "what" => "event")
                    .increment(HOLD_POLL.as_secs());
                if self.health.check().await.is_ok() {
                    break;
                }
            }
        };
        let back = self.heartbeat(message, abort, back).await.is_some();
        metrics::gauge!(telemetry::HELD).decrement(1.0);
        back
    }

    /// Ingests one object, sending in-progress acks meanwhile. `None` if aborted.
    async fn ingest(
        &self,
        message: &jetstream::Message,
        event: &ObjectEvent,
        abort: &CancellationToken,
        waiting: Option<OwnedSemaphorePermit>,
    ) -> Option<Result<Outcome, IngestError>> {
        let ingest = self
            .grouper
            .ingest(&event.key, event.etag.as_deref(), event.size, waiting);
        self.heartbeat(message, abort, ingest).await
    }

    /// Runs `work` while telling JetStream every third of the ack wait that `message` is in
    /// progress (so it is not handed to another worker); `None` if aborted first. The first
    /// in-progress ack goes out a third of the ack wait in: a message comes here right after its
    /// delivery or its last in-progress ack.
    async fn heartbeat<T>(
        &self,
        message: &jetstream::Message,
        abort: &CancellationToken,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        tokio::pin!(work);
        let mut progress = tokio::time::interval(self.queue.settings().ack_wait / 3);
        progress.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                done = &mut work => return Some(done),
                _ = progress.tick() => {
                    if let Err(e) = message.ack_with(AckKind::Progress).await {
                        warn!(error = %e, "cannot send an in-progress ack");
                    }
                }
                _ = abort.cancelled() => return None,
            }
        }
    }
}

async fn ack(message: &jetstream::Message) {
    // A double ack waits for the server's confirmation, so an ack lost on the way is noticed.
    if let Err(e) = message.double_ack().await {
        warn!(error = %e, "ack not confirmed; the event may be redelivered (and then be a no-op)");
    }
}

fn log_outcome(o: &Outcome) {
    let ms = o.elapsed.as_millis() as u64;
    match &o.disposition {
        Disposition::Done => info!(
            etag = %o.version.etag, rows_ok = o.rows_ok, rows_rejected = o.rows_rejected,
            elapsed_ms = ms, "ingested"
        ),
        Disposition::AlreadyDone => info!(etag = %o.version.etag, "already ingested"),
        Disposition::Ignored(reason) => info!(%reason, "ignored"),
        Disposition::Failed(reason) => warn!(%reason, "object failed"),
    }
}

/// The keys an event names, for dead letters of events that could be decoded.
fn event_keys(payload: &[u8]) -> Vec<String> {
    events::decode(payload)
        .map(|evs| evs.into_iter().map(|e| e.key).collect())
        .unwrap_or_default()
}
