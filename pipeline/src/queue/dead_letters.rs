//! Dead letters: events the pipeline gave up on, kept with the reason so an operator can read
//! them and, after fixing the cause, send them back through the pipeline.
//!
//! A dead letter is the original event payload, byte for byte (so a replay publishes exactly what
//! MinIO sent), with headers saying why: `Sensors-Reason`, `Sensors-Keys` (the object keys
//! concerned, URL-encoded, comma-separated), `Sensors-Attempts`, `Sensors-Failed-At` and
//! `Sensors-Event-Sequence` (the event's sequence in the events stream, which also makes the
//! dead-letter message id: a crash between dead-lettering and acking cannot file it twice).

use async_nats::jetstream::message::PublishMessage as Publish;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use super::{headers, Queue, QueueError};
use crate::events::{decode_key, encode_key};

pub const REASON: &str = "Sensors-Reason";
pub const KEYS: &str = "Sensors-Keys";
pub const ATTEMPTS: &str = "Sensors-Attempts";
pub const FAILED_AT: &str = "Sensors-Failed-At";
pub const EVENT_SEQUENCE: &str = "Sensors-Event-Sequence";

/// One dead letter as stored.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its sequence in the dead-letter stream: the id `dlq replay` takes.
    pub id: u64,
    pub reason: String,
    /// Object keys the event concerned (empty when the payload could not be decoded).
    pub keys: Vec<String>,
    pub attempts: i64,
    pub failed_at: Option<DateTime<Utc>>,
    /// The original event payload.
    pub payload: Bytes,
}

/// The most of a reason a dead letter carries in its header: a reason can echo input (a header of
/// up to 1 MiB, escaped), and a message over the server's `max_payload` (1 MB by default) cannot be
/// published at all, which would leave the event looping. The ledger keeps the whole reason.
pub const MAX_REASON_BYTES: usize = 4096;

/// `reason` cut to at most [`MAX_REASON_BYTES`] (on a character boundary), saying so.
pub fn bounded_reason(reason: &str) -> std::borrow::Cow<'_, str> {
    const MARK: &str = " … (truncated; the object's ledger entry has the whole reason)";
    if reason.len() <= MAX_REASON_BYTES {
        return reason.into();
    }
    let mut cut = MAX_REASON_BYTES - MARK.len();
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{MARK}", &reason[..cut]).into()
}

/// The dead letter's message id: from the event's sequence in the events stream (the same event
/// filed twice within the duplicate window is stored once), or unique when the sequence is not
/// known (`0`: the message's metadata could not be read) — two such letters must both be kept.
pub fn dead_letter_id(stream: &str, event_sequence: u64) -> String {
    if event_sequence == 0 {
        format!("dlq-{stream}-unknown-{}", uuid::Uuid::new_v4())
    } else {
        format!("dlq-{stream}-{event_sequence}")
    }
}

/// Why an event is being dead-lettered, and what it was.
pub struct Filing<'a> {
    pub payload: &'a [u8],
    pub reason: &'a str,
    pub keys: &'a [String],
    pub attempts: i64,
    pub event_sequence: u64,
}

impl Queue {
    /// Files an event in the dead-letter stream and waits until JetStream has stored it.
    pub async fn dead_letter(&self, filing: &Filing<'_>) -> Result<(), QueueError> {
        let keys: Vec<String> = filing.keys.iter().map(|k| encode_key(k)).collect();
        let headers = headers(&[
            (REASON, bounded_reason(filing.reason).into_owned()),
            (KEYS, keys.join(",")),
            (ATTEMPTS, filing.attempts.to_string()),
            (FAILED_AT, Utc::now().to_rfc3339()),
            (EVENT_SEQUENCE, filing.event_sequence.to_string()),
        ]);
        let publish = Publish::build()
            .payload(Bytes::copy_from_slice(filing.payload))
            .headers(headers)
            .message_id(dead_letter_id(&self.settings.stream, filing.event_sequence));
        self.publish(self.settings.dlq_subject.clone(), publish)
            .await
            .map(|_| ())
    }

    async fn dead_letter_stream(
        &self,
    ) -> Result<async_nats::jetstream::stream::Stream, QueueError> {
        self.js
            .get_stream(self.settings.dlq_stream())
            .await
            .map_err(|e| QueueError::new("opening the dead-letter stream", e))
    }

    /// How many dead letters there are.
    pub async fn dead_letter_count(&self) -> Result<u64, QueueError> {
        let mut stream = self.dead_letter_stream().await?;
        let info = stream
            .info()
            .await
            .map_err(|e| QueueError::new("reading the dead-letter stream", e))?;
        Ok(info.state.messages)
    }

    /// Every dead letter, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, QueueError> {
        let mut stream = self.dead_letter_stream().await?;
        let state = stream
            .info()
            .await
            .map_err(|e| QueueError::new("reading the dead-letter stream", e))?
            .state
            .clone();
        let mut letters = Vec::new();
        if state.messages == 0 {
            return Ok(letters);
        }
        for seq in state.first_sequence..=state.last_sequence {
            match stream.get_raw_message(seq).await {
                Ok(m) => letters.push(read(seq, &m.headers, m.payload)),
                // Replayed (deleted) letters leave gaps in the sequence.
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(QueueError::new(format!("reading dead letter {seq}"), e)),
            }
        }
        Ok(letters)
    }

    /// Publishes dead letter `id`'s original event to the events subject again and removes the
    /// letter. Returns false when there is no such letter.
    pub async fn replay(&self, id: u64) -> Result<bool, QueueError> {
        let stream = self.dead_letter_stream().await?;
        let message = match stream.get_raw_message(id).await {
            Ok(m) => m,
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                return Ok(false)
            }
            Err(e) => return Err(QueueError::new(format!("reading dead letter {id}"), e)),
        };
        self.publish_event(message.payload.to_vec(), None).await?;
        stream
            .delete_message(id)
            .await
            .map_err(|e| QueueError::new(format!("removing dead letter {id}"), e))?;
        Ok(true)
    }
}

fn read(id: u64, headers: &async_nats::HeaderMap, payload: Bytes) -> DeadLetter {
    let get = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
    DeadLetter {
        id,
        reason: get(REASON).unwrap_or_default(),
        keys: get(KEYS)
            .filter(|k| !k.is_empty())
            .map(|k| {
                k.split(',')
                    .map(|e| decode_key(e).unwrap_or_else(|_| e.to_string()))
                    .collect()
            })
            .unwrap_or_default(),
        attempts: get(ATTEMPTS).and_then(|a| a.parse().ok()).unwrap_or(0),
        failed_at: get(FAILED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.to_utc()),
        payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_ids_are_the_event_sequence_or_unique() {
        assert_eq!(dead_letter_id("S", 7), "dlq-S-7");
        assert_eq!(dead_letter_id("S", 7), dead_letter_id("S", 7));
        let (a, b) = (dead_letter_id("S", 0), dead_letter_id("S", 0));
        assert_ne!(a, b);
        assert!(a.starts_with("dlq-S-unknown-"), "{a}");
    }

    #[test]
    fn reasons_are_bounded_on_a_character_boundary() {
        assert_eq!(bounded_reason("short"), "short");
        let exact = "x".repeat(MAX_REASON_BYTES);
        assert_eq!(bounded_reason(&exact), exact);
        let long = "é".repeat(MAX_REASON_BYTES);
        let cut = bounded_reason(&long);
        assert!(cut.len() <= MAX_REASON_BYTES, "{}", cut.len());
        assert!(
            cut.ends_with(" … (truncated; the object's ledger entry has the whole reason)"),
            "{cut}"
        );
        assert!(cut.starts_with("éé"));
    }
}
