//! The HTTP endpoint on `METRICS_ADDR`: `/metrics` (Prometheus text), `/healthz` (the process is
//! up) and `/readyz` (NATS connected and both databases answer).
//!
//! Written on hyper directly, on purpose: the exporter's own listener
//! (`metrics-exporter-prometheus`'s `http-listener`) serves `/metrics` only, not probes that run
//! our own checks, and a router crate (axum and its tower stack) would add far more to the build
//! than these three GET routes need. hyper is in the tree already (the S3 client).

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
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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
