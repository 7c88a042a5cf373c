//! `sensors-worker ingest`: ingest a list of objects directly, concurrently, with a progress bar and
//! a summary. Mapping objects are ingested before all others so names exist when readings land
//! (readings never depend on it: unmapped sensors are kept).

use std::fmt;
use std::time::{Duration, Instant};

use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sensor_pipeline::alerts::Alerts;
use sensor_pipeline::ingest::{Disposition, Grouper, IngestError, Ingestor, Outcome};
use sensor_pipeline::object_store::ObjectStore;
use tracing::warn;

/// Transient failures (database, object store, network) are retried this way before the object is
/// reported as an error.
fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_max_times(6)
        .with_jitter()
}

/// What `ingest` ingests: the mapping objects, all of them before the others, and the others as
/// they are listed (a listing's error ends them).
pub struct Keys {
    pub mapping: Vec<(String, Option<i64>)>,
    pub rest: futures_util::stream::BoxStream<'static, anyhow::Result<(String, Option<i64>)>>,
}

impl Keys {
    /// Keys given on the command line (no sizes known): the mapping ones first.
    pub fn given(keys: Vec<String>) -> Self {
        let (mapping, rest): (Vec<_>, Vec<_>) = keys
            .into_iter()
            .map(|k| (k, None))
            .partition(|k| is_mapping(&k.0));
        Self {
            mapping,
            rest: stream::iter(rest).map(Ok).boxed(),
        }
    }

    /// Every object of the bucket: the mapping objects listed first, then the whole bucket
    /// page by page (its mapping objects left out).
    pub async fn listed(store: &ObjectStore) -> anyhow::Result<Self> {
        let mapping = store
            .list(Some(MAPPING_PREFIX))
            .await
            .context("listing the bucket")?
            .into_iter()
            .map(|o| (o.key, Some(o.size)))
            .collect();
        let rest = store
            .list_pages(None)
            .map(|page| -> anyhow::Result<_> {
                let page = page.context("listing the bucket")?;
                let rest = page.into_iter().filter(|o| !is_mapping(&o.key));
                Ok(stream::iter(rest.map(|o| Ok((o.key, Some(o.size))))))
            })
            .try_flatten()
            .boxed();
        Ok(Self { mapping, rest })
    }
}

/// Where mapping objects are: ingested before all others.
const MAPPING_PREFIX: &str = "mapping/";

fn is_mapping(key: &str) -> bool {
    key.starts_with(MAPPING_PREFIX)
}

/// What an `ingest` run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub done: u64,
    pub already_done: u64,
    pub ignored: u64,
    /// (key, reason) of failed objects.
    pub failed: Vec<(String, String)>,
    /// (key, error) of objects that could not be settled (transient errors, retries exhausted).
    pub errors: Vec<(String, String)>,
    pub rows_ok: u64,
    pub rows_rejected: u64,
    /// Anomalies opened by the detection of what was ingested (when detection is on), and
    /// detections that failed (their work stays queued for the workers).
    pub anomalies: Option<u64>,
    pub detection_errors: u64,
    /// Why listing the bucket stopped part of the way (the objects after were not ingested).
    pub listing: Option<String>,
    pub elapsed: Duration,
}

impl Summary {
    pub fn all_settled_ok(&self) -> bool {
        self.failed.is_empty() && self.errors.is_empty()
    }

    fn add(&mut self, key: &str, result: Result<Outcome, IngestError>) {
        match result {
            Ok(o) => {
                self.rows_ok += o.rows_ok;
                self.rows_rejected += o.rows_rejected;
                match o.disposition {
                    Disposition::Done => self.done += 1,
                    Disposition::AlreadyDone => self.already_done += 1,
                    Disposition::Ignored(_) => self.ignored += 1,
                    Disposition::Failed(reason) => self.failed.push((key.to_string(), reason)),
                }
            }
            Err(e) => self.errors.push((key.to_string(), format!("{e}"))),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.rows_ok as f64 / secs
        } else {
            0.0
        };
        writeln!(
            f,
            "objects: {} done, {} already done, {} failed, {} ignored, {} errors",
            self.done,
            self.already_done,
            self.failed.len(),
            self.ignored,
            self.errors.len()
        )?;
        writeln!(
            f,
            "rows:    {} ok, {} rejected",
            self.rows_ok, self.rows_rejected
        )?;
        if let Some(n) = self.anomalies {
            write!(f, "anomalies: {n} opened")?;
            if self.detection_errors > 0 {
                write!(
                    f,
                    " ({} detections failed; the workers retry them)",
                    self.detection_errors
                )?;
            }
            writeln!(f)?;
        }
        writeln!(f, "time:    {secs:.2} s ({rate:.0} rows/s)")?;
        for (key, reason) in &self.failed {
            writeln!(f, "failed:  {key}: {reason}")?;
        }
        for (key, error) in &self.errors {
            writeln!(f, "error:   {key}: {error}")?;
        }
        Ok(())
    }
}

/// Ingests `keys` (mapping objects first), `concurrency` at a time; with `alerts`, detects the
/// anomalies of what each object changed after it commits — in a task of its own, so that the
/// next objects are ingested meanwhile. Objects that committed while a detection ran are detected
/// together in the next batch (a sensor several of them wrote is judged once); up to
/// [`crate::detect::WAITING`] readings of theirs are kept for it. Objects whose readings met
/// stored ones (corrections, re-uploads) are detected after the last object, with their
/// readings, on `2 × concurrency` connections ([`crate::detect::corrections`]).
///
/// `keys` are (key, listed size) as a listing gives them, page by page: objects are ingested while
/// the next page is listed. A listing that fails part of the way ends the run after what was
/// listed; its error is [`Summary::listing`].
pub async fn ingest_all(
    ingestor: &Ingestor,
    alerts: Option<&Alerts>,
    keys: Keys,
    concurrency: usize,
) -> Summary {
    let t0 = Instant::now();
    let Keys { mapping, rest } = keys;
    // Small objects (by the listed size) are ingested in groups, `concurrency` transactions at
    // once; enough of them are in flight for the groups to form.
    let grouper = Grouper::new(ingestor.clone(), concurrency);
    let in_flight = grouper.in_flight();
    // Its length grows as keys are listed.
    let bar = progress_bar(0);
    let listing = std::cell::RefCell::new(None);
    let mut summary = Summary {
        anomalies: alerts.map(|_| 0),
        ..Summary::default()
    };
    let (work, detection) = match alerts {
        Some(alerts) => {
            let (to, pending) = crate::detect::handoff();
            let task = detect_in_order(alerts.clone(), pending);
            (Some(to), Some(tokio::spawn(task)))
        }
        None => (None, None),
    };
    // The work of objects that met stored readings waits for the end: detecting one reads on to
    // each sensor's newest readings, so a re-upload of many objects of the same sensors would
    // read the data after each of them again; together they read it once.
    // Their readings are kept for it too, up to [`crate::detect::WAITING`] of them.
    let mut corrections: Vec<Vec<i64>> = Vec::new();
    let mut corrected: Vec<std::sync::Arc<sensor_pipeline::readings::Held>> = Vec::new();
    let mut keeping = 0;
    let mapping = stream::iter(mapping).map(Ok).boxed();
    for phase in [mapping, rest] {
        let grouper = &grouper;
        let mut results = phase
            .take_while(|listed| {
                let go = match listed {
                    Ok(_) => true,
                    Err(e) => {
                        *listing.borrow_mut() = Some(format!("{e:#}"));
                        false
                    }
                };
                std::future::ready(go)
            })
            .filter_map(|listed| std::future::ready(listed.ok()))
            .inspect(|_| bar.inc_length(1))
            .map(|(key, size)| async move {
                let result = (|| grouper.ingest(&key, None, size, None))
                    .retry(retry_policy())
                    .notify(|e, wait| warn!(%key, error = %e, "transient failure, retrying in {wait:?}"))
                    .await;
                (key, result)
            })
            .buffer_unordered(in_flight);
        while let Some((key, result)) = results.next().await {
            if let (Some(to), Ok(o)) = (&work, &result) {
                if o.met_stored {
                    corrections.push(o.anomaly_work.clone());
                    if let Some(f) = o.fresh.as_ref() {
                        if keeping + f.len() <= crate::detect::WAITING {
                            keeping += f.len();
                            corrected.push(f.clone());
                        }
                    }
                } else if !o.anomaly_work.is_empty() {
                    // Only fails if the detection task is gone; its work stays queued.
                    to.send(o.anomaly_work.clone(), o.fresh.clone());
                }
            }
            summary.add(&key, result);
            bar.inc(1);
            bar.set_message(format!("{} rows", summary.rows_ok));
        }
    }
    summary.listing = listing.into_inner();
    drop(work);
    if let Some(task) = detection {
        bar.set_message(format!("{} rows, detecting anomalies", summary.rows_ok));
        if let Ok((opened, failed)) = task.await {
            summary.anomalies = Some(opened);
            summary.detection_errors = failed;
        }
    }
    if let (Some(alerts), false) = (alerts, corrections.is_empty()) {
        // Two connections per object slot: no object is in flight any more, and each sensor's
        // detection waits on round trips between its steps (12 re-uploaded objects of 100,000
        // readings on 2 cores, read back: 1.10–1.27 s on 2 connections, 0.93–1.04 s on 4).
        let ids: Vec<i64> = corrections.iter().flatten().copied().collect();
        match crate::detect::corrections(alerts, ids, corrected, concurrency * 2).await {
            Ok(d) => *summary.anomalies.get_or_insert(0) += d.opened.len() as u64,
            Err(e) => {
                warn!(objects = corrections.len(), error = %e, "anomaly detection failed; the workers retry it");
                summary.detection_errors += corrections.len() as u64;
            }
        }
    }
    bar.finish_and_clear();
    summary.elapsed = t0.elapsed();
    summary
}

/// Detects what `pending` brings: everything that arrived during the previous batch (up to
/// [`crate::detect::BATCH_OBJECTS`] objects) as one batch; returns the anomalies opened and the
/// objects whose detection failed (their work stays queued for the workers).
async fn detect_in_order(alerts: Alerts, mut pending: crate::detect::Pending) -> (u64, u64) {
    let (mut opened, mut failed) = (0, 0);
    while let Some(objects) = pending.next().await {
        match crate::detect::batch(&alerts, &objects).await {
            Ok(d) => opened += d.opened.len() as u64,
            Err(e) => {
                warn!(objects = objects.len(), error = %e, "anomaly detection failed; the workers retry it");
                failed += objects.len() as u64;
            }
        }
        pending.done(&objects);
    }
    (opened, failed)
}

/// A bar on a terminal (stderr); nothing otherwise.
fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} objects, {msg} ({eta})",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
