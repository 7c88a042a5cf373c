//! Anomaly detection in the worker ([`sensor_pipeline::alerts`]): the background loop of
//! `sensors-worker run`, and `sensors-worker detect --all`.
//!
//! The loop detects the work an object's ingestion queued as soon as the object's event has been
//! handled (its ids come over a channel), sweeps every few seconds for work nobody is doing (a
//! worker died after its commit, an earlier detection failed and its delay is over), and then
//! publishes what changed. It runs beside the consumer, never in an event's way: an event is
//! acknowledged once its rows are committed, whatever detection does.

use std::io::IsTerminal;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sensor_pipeline::alerts::{AlertError, Alerts, Detected};
use sensor_pipeline::queue::Queue;
use sensor_pipeline::readings::Held;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::telemetry;

/// How often the loop looks for work and unpublished changes nobody is handling.
const SWEEP: Duration = Duration::from_secs(2);

/// One ingested object's queued work and its readings, for the loop to detect now.
pub type Work = (Vec<i64>, Option<Arc<Held>>);
/// Readings that wait for the loop at most, over all objects (an object holds up to `FRESH_MAX`,
/// 24 MB; so this is at most four large objects, or thousands of small ones); the work of an
/// object whose readings do not fit waits without them (they are read back).
pub const WAITING: usize = 4 * sensor_pipeline::ingest::FRESH_MAX;

/// Where ingested objects' work goes to be detected in batches: every object's work ids (a few
/// bytes each; detection keeps up with ingestion in the batches, so they do not pile up), and
/// their readings up to [`WAITING`] of them at a time. Handing the ids over even when detection is
/// behind matters: work left to the sweep is detected sensor by sensor, a transaction each.
#[derive(Clone)]
pub struct Handoff {
    tx: mpsc::UnboundedSender<Work>,
    holding: Arc<AtomicUsize>,
}

/// The loop's end of a [`Handoff`].
pub struct Pending {
    rx: mpsc::UnboundedReceiver<Work>,
    holding: Arc<AtomicUsize>,
}

/// A connected [`Handoff`] and [`Pending`].
pub fn handoff() -> (Handoff, Pending) {
    let (tx, rx) = mpsc::unbounded_channel();
    let holding = Arc::new(AtomicUsize::new(0));
    (
        Handoff {
            tx,
            holding: holding.clone(),
        },
        Pending { rx, holding },
    )
}

impl Handoff {
    /// Hands over one object's work and, room permitting, its readings. False if the loop is gone
    /// (the work stays queued in the database for the sweep of any worker).
    pub fn send(&self, ids: Vec<i64>, fresh: Option<Arc<Held>>) -> bool {
        let fresh = fresh.filter(|f| {
            let more = f.len();
            self.holding
                .fetch_update(SeqCst, SeqCst, |n| {
                    (n + more <= WAITING).then_some(n + more)
                })
                .is_ok()
        });
        self.tx.send((ids, fresh)).is_ok()
    }
}

impl Pending {
    /// The next objects' work: the first to arrive and whatever else has meanwhile, up to
    /// [`BATCH_OBJECTS`]; `None` once every [`Handoff`] is gone.
    pub async fn next(&mut self) -> Option<Vec<Work>> {
        let first = self.rx.recv().await?;
        let mut objects = vec![first];
        while objects.len() < BATCH_OBJECTS {
            let Ok(more) = self.rx.try_recv() else { break };
            objects.push(more);
        }
        Some(objects)
    }

    /// `objects` (from [`Pending::next`]) are detected: their readings are let go.
    pub fn done(&self, objects: &[Work]) {
        let held = objects
            .iter()
            .filter_map(|o| o.1.as_ref())
            .map(|f| f.len())
            .sum();
        self.holding.fetch_sub(held, SeqCst);
    }
}
/// Objects detected in one batch at most (one transaction; a sensor written by several of them
/// is judged once, over the span they cover together).
pub const BATCH_OBJECTS: usize = 256;

/// Counts what one detection step did.
pub fn record(detected: &Detected) {
    for kind in &detected.opened {
        metrics::counter!(telemetry::ANOMALIES, "kind" => kind.as_str()).increment(1);
    }
    for kind in &detected.resolved {
        metrics::counter!(telemetry::ANOMALIES_RESOLVED, "kind" => kind.as_str()).increment(1);
    }
    for d in &detected.durations {
        metrics::histogram!(telemetry::DETECTION_SECONDS).record(d.as_secs_f64());
    }
}

/// An error with its causes (`db error: ERROR: canceling statement due to lock timeout`).
fn chain(e: &AlertError) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.ends_with(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

fn failed(stage: &'static str, e: &AlertError) {
    let error = chain(e);
    match stage {
        "detect" => warn!(%error, "anomaly detection failed; it is retried later"),
        _ => warn!(%error, "cannot publish anomaly changes yet; retrying later"),
    }
    metrics::counter!(telemetry::DETECTION_ERRORS, "stage" => stage).increment(1);
}

/// Runs detection (and publication) until `stop`.
pub async fn run_loop(alerts: Alerts, queue: Queue, mut work: Pending, stop: CancellationToken) {
    let mut sweep = tokio::time::interval(SWEEP);
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            objects = work.next() => match objects {
                // One object's work, with whatever else has arrived meanwhile, in one batch.
                Some(objects) => {
                    let detected = batch(&alerts, &objects).await;
                    work.done(&objects);
                    detected
                }
                None => return,
            },
            _ = sweep.tick() => step(&alerts, None, &stop).await,
        };
        match result {
            Ok(d) if d.sensors > 0 => info!(
                sensors = d.sensors,
                spans = d.spans,
                opened = d.opened.len(),
                resolved = d.resolved.len(),
                "anomaly detection done"
            ),
            Ok(_) => {}
            Err(e) => failed("detect", &e),
        }
        match alerts.publish_due(&queue).await {
            Ok(0) => {}
            Ok(n) => info!(messages = n, "anomaly changes published"),
            Err(e) => failed("publish", &e),
        }
    }
}

/// Detects the work of `objects` as one batch (see [`Alerts::detect_batch`]), counting it.
pub async fn batch(alerts: &Alerts, objects: &[Work]) -> Result<Detected, AlertError> {
    let ids: Vec<i64> = objects.iter().flat_map(|o| o.0.iter().copied()).collect();
    let fresh: Vec<&Held> = objects.iter().filter_map(|o| o.1.as_deref()).collect();
    let d = alerts.detect_batch(&ids, &fresh).await?;
    record(&d);
    Ok(d)
}

/// Detects the work rows `ids` (and the other queued rows of their sensors) with the objects'
/// readings at hand (`fresh`, see [`Alerts::detect_held`]), a few sensors per transaction, on
/// `parallel` connections at once (the rows a detection holds are skipped by the others), each
/// in a task of its own so that the detectors run on every core. What `ingest` does with the
/// work of objects that met stored readings, once every object is in: on one connection
/// PostgreSQL and the detector take turns on one core. (12 re-uploaded objects of 100,000
/// readings on 2 cores, reading them back: 2.2–2.4 s on one connection, 1.1–1.3 s on two,
/// 0.93–1.04 s on four; fed from memory, on four: 0.43–0.44 s one sensor per transaction,
/// 0.33–0.40 s eight. The four in one task kept the detector on one core, the other half idle:
/// about 0.3 s at half the machine; in four tasks about 0.25 s with both cores busy.)
pub async fn corrections(
    alerts: &Alerts,
    ids: Vec<i64>,
    fresh: Vec<std::sync::Arc<Held>>,
    parallel: usize,
) -> Result<Detected, AlertError> {
    let (ids, fresh) = (std::sync::Arc::new(ids), std::sync::Arc::new(fresh));
    let runs = (0..parallel.max(1)).map(|_| {
        let (alerts, ids, fresh) = (alerts.clone(), ids.clone(), fresh.clone());
        tokio::spawn(async move {
            let fresh: Vec<&Held> = fresh.iter().map(|f| &**f).collect();
            let d = alerts.detect_held(Some(&ids), &fresh).await?;
            record(&d);
            Ok::<_, AlertError>(d)
        })
    });
    let mut total = Detected::default();
    for result in futures_util::future::join_all(runs).await {
        total.absorb(joined(result)?);
    }
    Ok(total)
}

/// The result of a detection task; its panic, resumed.
fn joined<T>(result: Result<T, tokio::task::JoinError>) -> T {
    result.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// Detects due work sensor by sensor (stopping early on `stop`), counting each step.
async fn step(
    alerts: &Alerts,
    only: Option<&[i64]>,
    stop: &CancellationToken,
) -> Result<Detected, AlertError> {
    let mut total = Detected::default();
    while !stop.is_cancelled() {
        let Some(d) = alerts.detect_next(only).await? else {
            break;
        };
        record(&d);
        total.absorb(d);
    }
    Ok(total)
}

/// The key `detect --all` queues its work under (what an interrupted run resumes).
pub const HISTORY: &str = "(sensors-worker detect --all)";

/// `sensors-worker detect --all [--since T] [--publish]`: queues every sensor's stored readings
/// (unless an interrupted run left work to resume) and detects it here, `parallel` sensors at a
/// time, with a progress bar.
/// Without `--publish` the anomalies found are recorded as already published: history is not
/// news for the alert subscribers.
pub async fn history(
    alerts: &Alerts,
    since: Option<DateTime<Utc>>,
    publish: Option<&Queue>,
    parallel: usize,
) -> anyhow::Result<Detected> {
    match alerts.queue_history(since, HISTORY).await? {
        Some(n) => eprintln!("queued detection of {n} sensors"),
        None => eprintln!("resuming an interrupted run"),
    }
    let total = alerts.queued(Some(HISTORY)).await?;
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} sensors, {msg} ({eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    // `parallel` loops, each taking the next sensor nobody is detecting, each in a task of its
    // own so that the detectors run on every core.
    let opened = std::sync::Arc::new(AtomicUsize::new(0));
    let run = || {
        let (alerts, bar, opened) = (alerts.clone(), bar.clone(), opened.clone());
        tokio::spawn(async move {
            let mut done = Detected::default();
            while let Some(d) = alerts.detect_next(None).await? {
                opened.fetch_add(d.opened.len(), SeqCst);
                done.absorb(d);
                let left = alerts.queued(Some(HISTORY)).await?;
                bar.set_position(total.saturating_sub(left));
                bar.set_message(format!("{} anomalies", opened.load(SeqCst)));
            }
            Ok::<_, AlertError>(done)
        })
    };
    let mut done = Detected::default();
    for result in futures_util::future::join_all((0..parallel.max(1)).map(|_| run())).await {
        done.absorb(joined(result)?);
    }
    bar.finish_and_clear();
    match publish {
        Some(queue) => {
            alerts.publish_due(queue).await?;
        }
        None => {
            alerts.mark_published(HISTORY).await?;
        }
    }
    Ok(done)
}
