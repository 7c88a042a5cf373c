//! Stranded events: an event whose last delivery (`NATS_MAX_DELIVER`) ended without an ack — the
//! worker holding it was killed, ran out of memory, or could not file the dead letter — is never
//! delivered again, and would sit in the events stream until its max age deletes it, in no
//! metric and no ledger. JetStream says so on the consumer's max-deliveries advisory subject; the
//! `_STRANDED` stream keeps those advisories (so one published while no worker listens is not
//! lost) and every worker reads them through one shared consumer: the event the advisory names is
//! dead-lettered with the reason and removed from the events stream.
//!
//! The dead letter's message id is the event's sequence, as on the worker's own path: an event
//! the worker did file at its last delivery, and whose ack was lost, is not filed twice.

use bytes::Bytes;
use serde::Deserialize;

use super::dead_letters::Filing;
use super::{Queue, QueueError};
use crate::events;

/// What JetStream's `io.nats.jetstream.advisory.v1.max_deliver` advisory says.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Advisory {
    /// The event's sequence in the events stream.
    pub stream_seq: u64,
    /// How many deliveries were made.
    pub deliveries: i64,
}

impl Advisory {
    pub fn parse(payload: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

/// What became of a stranded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stranded {
    /// Dead-lettered (and removed from the events stream), naming these object keys.
    Filed(Vec<String>),
    /// No longer in the events stream: a late ack settled it after all, or it aged out.
    Gone,
}

impl Queue {
    /// The shared consumer of the max-deliveries advisories, as it is.
    pub async fn stranded_consumer(
        &self,
    ) -> Result<async_nats::jetstream::consumer::PullConsumer, QueueError> {
        self.js
            .get_consumer_from_stream(
                self.settings.stranded_consumer(),
                self.settings.stranded_stream(),
            )
            .await
            .map_err(|e| {
                QueueError::new(
                    format!("opening consumer {}", self.settings.stranded_consumer()),
                    e,
                )
            })
    }

    /// Dead-letters the event an advisory names and removes it from the events stream.
    pub async fn file_stranded(&self, advisory: &Advisory) -> Result<Stranded, QueueError> {
        use async_nats::jetstream::stream::RawMessageErrorKind;
        let seq = advisory.stream_seq;
        let stream = self
            .js
            .get_stream(&self.settings.stream)
            .await
            .map_err(|e| QueueError::new(format!("opening stream {}", self.settings.stream), e))?;
        let payload: Bytes = match stream.get_raw_message(seq).await {
            Ok(m) => m.payload,
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(Stranded::Gone),
            Err(e) => return Err(QueueError::new(format!("reading event {seq}"), e)),
        };
        let keys: Vec<String> = events::decode(&payload)
            .map(|evs| evs.into_iter().map(|e| e.key).collect())
            .unwrap_or_default();
        let reason = format!(
            "stranded: its last delivery ({} of NATS_MAX_DELIVER {}) ended without an ack \
             (the worker holding it stopped, crashed or could not file it)",
            advisory.deliveries, self.settings.max_deliver
        );
        self.dead_letter(&Filing {
            payload: &payload,
            reason: &reason,
            keys: &keys,
            attempts: advisory.deliveries,
            event_sequence: seq,
        })
        .await?;
        match stream.delete_message(seq).await {
            Ok(_) => {}
            // Settled by a late ack meanwhile, or removed by another worker: filed all the same
            // (a replay of a version already done is a no-op).
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::jetstream::stream::DeleteMessageErrorKind::JetStream(_)
                ) =>
            {
                tracing::debug!(error = %e, seq, "stranded event already gone");
            }
            Err(e) => return Err(QueueError::new(format!("removing event {seq}"), e)),
        }
        Ok(Stranded::Filed(keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advisory_names_the_event_and_its_deliveries() {
        let text = br#"{"type":"io.nats.jetstream.advisory.v1.max_deliver",
            "id":"Vnzy4jFuFCmSEBdNxhUYeX","timestamp":"2026-11-28T10:00:00.000Z",
            "stream":"SENSOR_EVENTS","consumer":"sensor-ingest","stream_seq":42,"deliveries":5}"#;
        assert_eq!(
            Advisory::parse(text).unwrap(),
            Advisory {
                stream_seq: 42,
                deliveries: 5
            }
        );
        assert!(Advisory::parse(b"{}").is_err());
    }
}
