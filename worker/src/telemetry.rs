//! Metrics and health for `sensors-worker run`: a Prometheus recorder and a small HTTP endpoint on
//! `METRICS_ADDR` serving `/metrics`, `/healthz` (the process is up) and `/readyz` (NATS and both
//! databases answer).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sensor_pipeline::ingest::{Disposition, Outcome};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const EVENTS: &str = "sensors_events_total";
pub const OBJECTS: &str = "sensors_objects_total";
pub const ROWS: &str = "sensors_rows_total";
pub const INGEST_SECONDS: &str = "sensors_ingest_duration_seconds";
pub const IN_FLIGHT: &str = "sensors_in_flight";
pub const CONSUMER_PENDING: &str = "sensors_consumer_pending";
pub const DEAD_LETTERS: &str = "sensors_dead_letters";

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

/// A readiness probe: Ok when every dependency answers, else what does not.
pub type Readiness =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Binds `addr` now (so a taken port is an error at start) and serves until `stop`. The address
/// bound is logged (port 0 picks a free port: the log line says which).
pub async fn serve(
    addr: SocketAddr,
    handle: PrometheusHandle,
    ready: Readiness,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding METRICS_ADDR {addr}"))?;
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok(tokio::spawn(async move {
        loop {
            let (socket, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
            };
            let (handle, ready) = (handle.clone(), ready.clone());
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (handle, ready) = (handle.clone(), ready.clone());
                async move { Ok::<_, Infallible>(respond(&req, &handle, &ready).await) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    }))
}

async fn respond<B>(
    req: &Request<B>,
    handle: &PrometheusHandle,
    ready: &Readiness,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = reply(StatusCode::OK, handle.render());
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        "/healthz" => reply(StatusCode::OK, "ok\n".into()),
        "/readyz" => match ready().await {
            Ok(()) => reply(StatusCode::OK, "ready\n".into()),
            Err(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz\n".into(),
        ),
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
