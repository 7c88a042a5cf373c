//! `sensors-worker run`: the wiring — settings, the metrics and health server, JetStream
//! provisioning (retried until NATS answers), the detection loop ([`crate::detect`], with
//! `ANOMALY_DETECTION=on`), the observer of stranded events ([`crate::stranded`]) — around the
//! consumer loop ([`crate::consumer`]), and a clean stop on SIGINT/SIGTERM.

use std::process::ExitCode;

use sensor_pipeline::alerts::Alerts;
use sensor_pipeline::config::{AnomalySettings, Env, WorkerSettings};
use sensor_pipeline::ingest::Grouper;
use sensor_pipeline::queue::Queue;
use tracing::warn;

use crate::consumer::Worker;
use crate::health::Health;
use crate::{detect, shutdown, stranded, telemetry};

/// `sensors-worker run`: the metrics server, JetStream provisioning of what is missing (retried
/// until NATS answers), the consumer loop, and a clean stop on SIGINT/SIGTERM.
pub async fn run(env: &Env) -> anyhow::Result<ExitCode> {
    let worker = WorkerSettings::from_env(env)?;
    let stop = shutdown::on_signal()?;
    let handle = telemetry::install()?;
    let ingestor = crate::ingestor(env, worker.pool_size)?;
    let anomalies = AnomalySettings::from_env(env)?;
    let queue = crate::queue(env).await?;
    let listening = stranded::Listening::default();
    let health = Health::new(&queue, &ingestor);
    let (probe, probe_listening) = (health.clone(), listening.clone());
    let ready: telemetry::Readiness = std::sync::Arc::new(move || {
        let probe = probe.clone();
        let listening = probe_listening.load(std::sync::atomic::Ordering::Relaxed);
        Box::pin(async move {
            probe.check().await?;
            if !listening {
                return Err(
                    "not reading the max-deliveries advisories yet (an event whose last \
                            delivery fails would not be dead-lettered)"
                        .to_string(),
                );
            }
            Ok(())
        })
    });
    let server = telemetry::serve(worker.metrics_addr, handle, ready, stop.clone()).await?;
    if !provision_with_retries(&queue, &anomalies, &stop).await? {
        tracing::info!("stopped before NATS was reachable");
        return Ok(ExitCode::SUCCESS);
    }
    let queue = queue.adopting_consumer_limits().await?;
    match ingestor.databases().spare_connections().await {
        Ok(spare) if worker.pool_size as i64 > spare => warn!(
            pool_size = worker.pool_size,
            spare,
            "DATABASE_POOL_SIZE is more than the database has connections left for: under load \
             this worker will meet \"too many clients\" (raise max_connections or lower \
             DATABASE_POOL_SIZE / WORKER_CONCURRENCY)"
        ),
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot check the database's max_connections"),
    }
    let observer = tokio::spawn(telemetry::observe(queue.clone(), stop.clone()));
    let advisories = tokio::spawn(stranded::run_loop(queue.clone(), listening, stop.clone()));
    let (detections, detector) = if anomalies.enabled {
        let alerts = Alerts::new(ingestor.databases().clone(), anomalies);
        let (tx, rx) = detect::handoff();
        let task = tokio::spawn(detect::run_loop(alerts, queue.clone(), rx, stop.clone()));
        (Some(tx), Some(task))
    } else {
        (None, None)
    };
    Worker {
        grouper: Grouper::new(ingestor.clone(), worker.concurrency),
        ingestor,
        queue,
        health,
        concurrency: worker.concurrency,
        grace: worker.shutdown_grace,
        detections,
    }
    .run(stop.clone())
    .await?;
    stop.cancel();
    let _ = tokio::join!(server, observer, advisories);
    if let Some(task) = detector {
        let _ = task.await;
    }
    Ok(ExitCode::SUCCESS)
}

/// NATS may come up after the worker: keep trying (with backoff) until it answers (true) or we
/// are told to stop (false).
async fn provision_with_retries(
    queue: &Queue,
    anomalies: &AnomalySettings,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<bool> {
    use backon::{ExponentialBuilder, Retryable};
    let attempt = || async {
        let drift = queue.ensure(anomalies.enabled.then_some(anomalies)).await?;
        for d in drift {
            warn!("JetStream {d}; left as it is (`sensors-worker provision --update` changes it)");
        }
        Ok::<_, sensor_pipeline::queue::QueueError>(())
    };
    let retried = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(std::time::Duration::from_millis(500))
                .with_max_delay(std::time::Duration::from_secs(10))
                .without_max_times(),
        )
        .notify(|e, delay| tracing::warn!(error = %e, retry_in = ?delay, "cannot provision JetStream yet"));
    tokio::select! {
        r = retried => r.map(|()| true).map_err(Into::into),
        _ = stop.cancelled() => Ok(false),
    }
}
