//! Metrics for `sensors-worker run`: the metric names, the Prometheus recorder, what one object
//! counts, and a poller that keeps the queue gauges current. [`server`] serves them on
//! `METRICS_ADDR` with the health probes.

pub mod server;

pub use server::{serve, Readiness};

use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sensor_pipeline::ingest::{Disposition, Outcome};
use tokio_util::sync::CancellationToken;

pub const EVENTS: &str = "sensors_events_total";
pub const OBJECTS: &str = "sensors_objects_total";
pub const ROWS: &str = "sensors_rows_total";
pub const INGEST_SECONDS: &str = "sensors_ingest_duration_seconds";
pub const IN_FLIGHT: &str = "sensors_in_flight";
pub const CONSUMER_PENDING: &str = "sensors_consumer_pending";
pub const DEAD_LETTERS: &str = "sensors_dead_letters";
pub const ANOMALIES: &str = "sensors_anomalies_total";
pub const ANOMALIES_RESOLVED: &str = "sensors_anomalies_resolved_total";
pub const DETECTION_SECONDS: &str = "sensors_anomaly_detection_duration_seconds";
pub const DETECTION_ERRORS: &str = "sensors_anomaly_detection_errors_total";
pub const STRANDED: &str = "sensors_stranded_events_total";
pub const HELD: &str = "sensors_events_held";
pub const WAITED: &str = "sensors_dependency_wait_seconds_total";
pub const READY: &str = "sensors_ready";

/// Installs the process-wide recorder and describes every metric.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(INGEST_SECONDS.into()),
            &[
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ],
        )
        .context("configuring metrics")?
        .set_buckets_for_metric(
            Matcher::Full(DETECTION_SECONDS.into()),
            &[
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
            ],
        )
        .context("configuring metrics")?
        .install_recorder()
        .context("installing the metrics recorder")?;
    metrics::describe_counter!(EVENTS, "Object events received, by kind");
    metrics::describe_counter!(OBJECTS, "Object versions handled, by outcome");
    metrics::describe_counter!(
        ROWS,
        "CSV rows of ingested objects, by outcome (ok, rejected)"
    );
    metrics::describe_histogram!(
        INGEST_SECONDS,
        metrics::Unit::Seconds,
        "Time to ingest one object"
    );
    metrics::describe_gauge!(IN_FLIGHT, "Objects being ingested now");
    metrics::describe_gauge!(
        CONSUMER_PENDING,
        "Events waiting for or being worked on by a worker"
    );
    metrics::describe_gauge!(DEAD_LETTERS, "Events in the dead-letter stream");
    metrics::describe_counter!(ANOMALIES, "Anomalies opened (new or reopened), by kind");
    metrics::describe_counter!(
        ANOMALIES_RESOLVED,
        "Open anomalies resolved by newer readings, by kind"
    );
    metrics::describe_histogram!(
        DETECTION_SECONDS,
        metrics::Unit::Seconds,
        "Time to detect the work one object queued (or, in the sweep, one sensor's)"
    );
    metrics::describe_counter!(
        DETECTION_ERRORS,
        "Anomaly detections (stage detect) or publications (stage publish) that failed; retried later"
    );
    metrics::describe_counter!(
        STRANDED,
        "Events dead-lettered because their last delivery could not settle them, by path \
         (last_delivery: the worker filed it instead of handing it back; advisory: JetStream's \
         max-deliveries advisory named it after the worker holding it died)"
    );
    metrics::describe_gauge!(
        HELD,
        "Events held (in-progress acks) while a dependency they failed on is down"
    );
    metrics::describe_counter!(
        WAITED,
        metrics::Unit::Seconds,
        "Seconds spent waiting for a dependency to come back, by what waited (fetch: the \
         consumer, not fetching; event: a held event, summed over events)"
    );
    metrics::describe_gauge!(
        READY,
        "1 when the last check of the dependencies (NATS, both databases, the object store) passed, \
         0 when it failed: what /readyz answers"
    );
    Ok(handle)
}

/// Counts one ingestion outcome.
pub fn record(outcome: &Outcome) {
    metrics::counter!(OBJECTS, "outcome" => outcome.disposition.label()).increment(1);
    if outcome.disposition == Disposition::Done {
        metrics::counter!(ROWS, "outcome" => "ok").increment(outcome.rows_ok);
        metrics::counter!(ROWS, "outcome" => "rejected").increment(outcome.rows_rejected);
        metrics::histogram!(INGEST_SECONDS).record(outcome.elapsed.as_secs_f64());
    }
}

/// Keeps the queue gauges (consumer pending, dead letters) current until `stop`.
pub async fn observe(queue: sensor_pipeline::queue::Queue, stop: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        if let Ok(pending) = queue.pending().await {
            metrics::gauge!(CONSUMER_PENDING).set(pending as f64);
        }
        if let Ok(letters) = queue.dead_letter_count().await {
            metrics::gauge!(DEAD_LETTERS).set(letters as f64);
        }
    }
}
