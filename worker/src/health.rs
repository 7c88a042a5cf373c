//! Whether the worker's dependencies answer: NATS connected, both databases answering a query,
//! the object store answering a request. `/readyz` reports it; the consumer stops fetching while it
//! fails, and an event whose ingestion failed because of it is held (in-progress acks) until it
//! passes again instead of being nak'ed: an outage must not use up an event's deliveries, however
//! long it lasts.

use std::time::Duration;

use sensor_pipeline::ingest::Ingestor;
use sensor_pipeline::object_store::ObjectStore;
use sensor_pipeline::queue::Queue;
use sensor_pipeline::store::Databases;

/// How long one check may take before the dependencies count as down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Health {
    queue: Queue,
    dbs: Databases,
    store: ObjectStore,
}

impl Health {
    pub fn new(queue: &Queue, ingestor: &Ingestor) -> Self {
        Self {
            queue: queue.clone(),
            dbs: ingestor.databases().clone(),
            store: ingestor.store().clone(),
        }
    }

    /// `Err` with what is down. Every check also sets the `sensors_ready` gauge (1 or 0), so
    /// Prometheus sees what `/readyz` answers.
    pub async fn check(&self) -> Result<(), String> {
        let check = async {
            if !self.queue.is_connected() {
                return Err(match self.queue.last_error() {
                    Some(why) => format!("NATS is not connected: {why}"),
                    None => "NATS is not connected".to_string(),
                });
            }
            self.dbs.ping().await.map_err(|e| e.to_string())?;
            self.store.ping().await.map_err(|e| e.to_string())
        };
        let result = tokio::time::timeout(CHECK_TIMEOUT, check)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {CHECK_TIMEOUT:?}")));
        metrics::gauge!(crate::telemetry::READY).set(if result.is_ok() { 1.0 } else { 0.0 });
        result
    }
}
