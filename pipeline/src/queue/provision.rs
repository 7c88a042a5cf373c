//! Provisioning that respects operators: what is missing is created; what exists is compared with
//! this version's definitions and left alone — a difference (replicas raised by an operator, an
//! ack wait tuned with the `nats` CLI, another worker's settings) is reported as [`Drift`], never
//! overwritten, so workers with different settings cannot fight over the consumer.
//! `sensors-worker run` logs the drift; `sensors-worker provision --check` prints it.
//!
//! Only the fields this code sets are compared (subjects, retention, storage, ages, windows,
//! replicas; ack policy, ack wait, deliveries, backoff, filter): the server fills in defaults for
//! the rest.

use std::fmt;

use async_nats::jetstream::{consumer::pull, stream};
use futures_util::TryStreamExt;
use serde::Serialize;

use super::{Queue, QueueError};
use crate::config::AnomalySettings;

/// One way in which what exists differs from what this version provisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// `stream X` or `consumer X on stream Y`.
    pub what: String,
    /// The field, or `exists` for something missing.
    pub field: String,
    pub found: String,
    pub wanted: String,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field == "exists" {
            write!(f, "{}: missing", self.what)
        } else {
            write!(
                f,
                "{}: {} is {}, this version provisions {}",
                self.what, self.field, self.found, self.wanted
            )
        }
    }
}

const STREAM_FIELDS: &[&str] = &[
    "subjects",
    "retention",
    "storage",
    "max_age",
    "duplicate_window",
    "num_replicas",
    "discard",
];
const CONSUMER_FIELDS: &[&str] = &[
    "ack_policy",
    "ack_wait",
    "max_deliver",
    "backoff",
    "max_ack_pending",
    "filter_subject",
    "deliver_policy",
];

/// The fields of `wanted` this code sets (not left at its default) whose value `found` does not
/// have.
fn differences(
    what: &str,
    wanted: &impl Serialize,
    found: &impl Serialize,
    fields: &[&str],
) -> Vec<Drift> {
    let (wanted, found) = (
        serde_json::to_value(wanted).unwrap_or_default(),
        serde_json::to_value(found).unwrap_or_default(),
    );
    let unset = |v: &serde_json::Value| match v {
        serde_json::Value::Null => true,
        serde_json::Value::Number(n) => n.as_i64() == Some(0),
        serde_json::Value::String(s) => s.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        _ => false,
    };
    let mut out = Vec::new();
    for field in fields {
        let w = wanted.get(field).cloned().unwrap_or_default();
        let f = found.get(field).cloned().unwrap_or_default();
        if unset(&w) && !matches!(*field, "backoff") {
            continue;
        }
        if w != f && !(unset(&w) && unset(&f)) {
            out.push(Drift {
                what: what.to_string(),
                field: field.to_string(),
                found: f.to_string(),
                wanted: w.to_string(),
            });
        }
    }
    out
}

impl Queue {
    /// The streams and consumers this version provisions, with the anomaly stream when
    /// `anomalies` is given.
    fn definitions(
        &self,
        anomalies: Option<&AnomalySettings>,
    ) -> (Vec<stream::Config>, Vec<(String, pull::Config)>) {
        let s = &self.settings;
        let mut streams = vec![
            super::events_stream_config(s),
            super::dead_letter_stream_config(s),
            super::stranded_stream_config(s),
        ];
        if let Some(a) = anomalies {
            streams.push(super::anomaly_stream_config(a, s.replicas));
        }
        let consumers = vec![
            (s.stream.clone(), super::consumer_config(s)),
            (s.stranded_stream(), super::stranded_consumer_config(s)),
        ];
        (streams, consumers)
    }

    /// Creates what is missing; returns how what exists differs from this version's definitions
    /// (left as it is).
    pub async fn ensure(
        &self,
        anomalies: Option<&AnomalySettings>,
    ) -> Result<Vec<Drift>, QueueError> {
        self.reconcile(anomalies, true).await
    }

    /// What is missing and how what exists differs, changing nothing (`provision --check`).
    pub async fn check(
        &self,
        anomalies: Option<&AnomalySettings>,
    ) -> Result<Vec<Drift>, QueueError> {
        self.reconcile(anomalies, false).await
    }

    async fn reconcile(
        &self,
        anomalies: Option<&AnomalySettings>,
        create: bool,
    ) -> Result<Vec<Drift>, QueueError> {
        let (streams, consumers) = self.definitions(anomalies);
        let existing: Vec<String> = self
            .js
            .stream_names()
            .try_collect()
            .await
            .map_err(|e| QueueError::new("listing streams", e))?;
        let mut drift = Vec::new();
        let mut present = std::collections::HashSet::new();
        for config in streams {
            let what = format!("stream {}", config.name);
            if existing.contains(&config.name) {
                let info = self
                    .js
                    .get_stream(&config.name)
                    .await
                    .map_err(|e| QueueError::new(format!("opening {what}"), e))?
                    .info()
                    .await
                    .map_err(|e| QueueError::new(format!("reading {what}"), e))?
                    .config
                    .clone();
                drift.extend(differences(&what, &config, &info, STREAM_FIELDS));
                present.insert(config.name.clone());
            } else if create {
                tracing::info!("creating {what}");
                self.js
                    .create_stream(config.clone())
                    .await
                    .map_err(|e| QueueError::new(format!("creating {what}"), e))?;
                present.insert(config.name.clone());
            } else {
                drift.push(missing(&what, &config));
            }
        }
        for (stream_name, config) in consumers {
            let name = config.durable_name.clone().unwrap_or_default();
            let what = format!("consumer {name} on stream {stream_name}");
            if !present.contains(&stream_name) {
                drift.push(missing(&what, &config));
                continue;
            }
            let stream = self
                .js
                .get_stream(&stream_name)
                .await
                .map_err(|e| QueueError::new(format!("opening stream {stream_name}"), e))?;
            let names: Vec<String> =
                stream.consumer_names().try_collect().await.map_err(|e| {
                    QueueError::new(format!("listing consumers of {stream_name}"), e)
                })?;
            if names.contains(&name) {
                let info = stream
                    .consumer_info(&name)
                    .await
                    .map_err(|e| QueueError::new(format!("reading {what}"), e))?;
                drift.extend(differences(&what, &config, &info.config, CONSUMER_FIELDS));
            } else if create {
                tracing::info!("creating {what}");
                stream
                    .create_consumer(config.clone())
                    .await
                    .map_err(|e| QueueError::new(format!("creating {what}"), e))?;
            } else {
                drift.push(missing(&what, &config));
            }
        }
        Ok(drift)
    }
}

fn missing(what: &str, wanted: &impl Serialize) -> Drift {
    Drift {
        what: what.to_string(),
        field: "exists".into(),
        found: "no".into(),
        wanted: serde_json::to_string(wanted).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fields_the_code_sets_are_compared() {
        let wanted =
            serde_json::json!({"max_age": 10, "num_replicas": 3, "max_msgs": 0, "backoff": []});
        let found = serde_json::json!({"max_age": 10, "num_replicas": 1, "max_msgs": -1});
        let d = differences(
            "stream S",
            &wanted,
            &found,
            &["max_age", "num_replicas", "max_msgs", "backoff"],
        );
        assert_eq!(
            d.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec!["stream S: num_replicas is 1, this version provisions 3"]
        );
    }
}
