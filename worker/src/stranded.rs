//! Beside the consumer, every `run` worker reads the max-deliveries advisories of the events
//! consumer (`sensor_pipeline::queue::stranded`) and dead-letters the events they name: an event
//! whose last delivery ended without an ack (the worker was killed or ran out of memory at its
//! last attempt, or could not file the dead letter) is never delivered again, and without this it
//! would be deleted by the stream's max age with no trace.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use sensor_pipeline::queue::stranded::{Advisory, Stranded};
use sensor_pipeline::queue::Queue;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::telemetry;

/// Whether this worker is reading the advisories (for `/readyz`).
pub type Listening = Arc<std::sync::atomic::AtomicBool>;

/// Reads advisories until `stop`; survives NATS outages (re-opens its consumer).
pub async fn run_loop(queue: Queue, listening: Listening, stop: CancellationToken) {
    use std::sync::atomic::Ordering;
    while !stop.is_cancelled() {
        let consumer = match queue.stranded_consumer().await {
            Ok(c) => c,
            Err(e) => {
                listening.store(false, Ordering::Relaxed);
                warn!(error = %e, "cannot read max-deliveries advisories yet; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                }
            }
        };
        listening.store(true, Ordering::Relaxed);
        while !stop.is_cancelled() {
            let batch = consumer
                .fetch()
                .max_messages(16)
                .expires(Duration::from_secs(1))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    listening.store(false, Ordering::Relaxed);
                    warn!(error = %e, "cannot fetch max-deliveries advisories; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => break,
                    }
                }
            };
            while let Some(Ok(message)) = batch.next().await {
                handle(&queue, &message).await;
            }
        }
    }
}

async fn handle(queue: &Queue, message: &async_nats::jetstream::Message) {
    use async_nats::jetstream::AckKind;
    let advisory = match Advisory::parse(&message.payload) {
        Ok(a) => a,
        Err(e) => {
            // Not ours to keep: only JetStream publishes on the subject.
            warn!(error = %e, "ignoring an unreadable max-deliveries advisory");
            let _ = message.ack().await;
            return;
        }
    };
    match queue.file_stranded(&advisory).await {
        Ok(Stranded::Filed(keys)) => {
            warn!(
                seq = advisory.stream_seq,
                deliveries = advisory.deliveries,
                ?keys,
                "event stranded after its last delivery: dead-lettered"
            );
            metrics::counter!(telemetry::STRANDED, "path" => "advisory").increment(1);
            metrics::counter!(telemetry::OBJECTS, "outcome" => "dead_lettered").increment(1);
        }
        Ok(Stranded::Gone) => {}
        Err(e) => {
            warn!(error = %e, seq = advisory.stream_seq, "cannot dead-letter a stranded event; retrying");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                .await;
            return;
        }
    }
    if let Err(e) = message.double_ack().await {
        warn!(error = %e, "advisory ack not confirmed; it may come again (and then be a no-op)");
    }
}
