//! NATS JetStream: the events stream MinIO publishes to, the durable pull consumer every worker
//! shares, the dead-letter stream (SPEC §4), and the stream of the consumer's max-deliveries
//! advisories with its own shared consumer ([`stranded`]).
//!
//! [`Queue::provision`] creates or updates them all, idempotently; `sensors-worker run` calls it
//! at start and `sensors-worker provision` lets a deployment do it up front. The same definitions
//! are in `nats/` as JSON for the `nats` CLI; a test keeps the two in step.

pub mod dead_letters;
pub mod provision;
pub mod stranded;

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, message::PublishMessage as Publish, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use thiserror::Error;

use crate::config::{AnomalySettings, NatsSettings};

/// How long JetStream remembers message ids to drop duplicates (backfill publishes with ids).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(60 * 60);
/// How long dead letters are kept.
pub const DEAD_LETTER_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Events waiting for a worker this long are dropped by JetStream (a week of outage).
pub const EVENT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// NATS could not be reached or refused a request.
#[derive(Debug, Error)]
#[error("NATS: {what}: {source}")]
pub struct QueueError {
    pub what: String,
    #[source]
    pub source: async_nats::Error,
}

impl QueueError {
    pub fn new(what: impl Into<String>, source: impl Into<async_nats::Error>) -> Self {
        Self {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// A connection to NATS with the pipeline's JetStream names.
#[derive(Clone)]
pub struct Queue {
    client: async_nats::Client,
    js: jetstream::Context,
    settings: NatsSettings,
    last_error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

/// The servers of a `NATS_URL` (comma-separated).
pub fn server_addrs(url: &str) -> Result<Vec<async_nats::ServerAddr>, QueueError> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| u.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| QueueError::new("reading NATS_URL", e))
}

/// Connection options with `auth`'s credentials and TLS.
pub fn connect_options(
    auth: &crate::config::NatsAuth,
) -> Result<async_nats::ConnectOptions, QueueError> {
    let mut options = async_nats::ConnectOptions::new();
    if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
        options = options.user_and_password(user.clone(), password.expose().to_string());
    }
    if let Some(token) = &auth.token {
        options = options.token(token.expose().to_string());
    }
    if let Some(seed) = &auth.nkey_seed {
        options = options.nkey(seed.expose().to_string());
    }
    if let Some(creds) = &auth.creds {
        options = options
            .credentials(creds.expose())
            .map_err(|e| QueueError::new("reading NATS_CREDS", e))?;
    }
    if let Some(ca) = &auth.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&auth.tls_cert, &auth.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

impl Queue {
    /// Connects (waiting for the server if it is not up yet) and keeps reconnecting forever.
    pub async fn connect(settings: &NatsSettings, name: &str) -> Result<Self, QueueError> {
        let servers = server_addrs(settings.url.expose())?;
        let last_error = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let noted = last_error.clone();
        let client = connect_options(&settings.auth)?
            .name(name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |event| {
                let noted = noted.clone();
                async move {
                    let note = |text: Option<String>| {
                        if let Ok(mut last) = noted.lock() {
                            *last = text;
                        }
                    };
                    match event {
                        async_nats::Event::Connected => {
                            note(None);
                            tracing::info!("connected to NATS")
                        }
                        async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                        // Refused credentials, TLS failures: one line each, and what /readyz says.
                        async_nats::Event::ServerError(e) => {
                            tracing::warn!(error = %e, "NATS refused the connection");
                            note(Some(e.to_string()));
                        }
                        async_nats::Event::ClientError(e) => {
                            tracing::warn!(error = %e, "NATS connection failed");
                            note(Some(e.to_string()));
                        }
                        other => tracing::debug!(event = %other, "NATS"),
                    }
                }
            })
            .connect(servers)
            .await
            .map_err(|e| QueueError::new("connecting", e))?;
        let js = jetstream::new(client.clone());
        Ok(Self {
            client,
            js,
            settings: settings.clone(),
            last_error,
        })
    }

    /// Why the connection is down, when NATS or the client said (refused credentials, TLS).
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|l| l.clone())
    }

    pub fn settings(&self) -> &NatsSettings {
        &self.settings
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Whether the connection is up right now (for `/readyz`).
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Creates or updates the streams and consumers to this version's definitions, overwriting
    /// what differs (`sensors-worker provision --update`; tests). Workers use [`Queue::ensure`],
    /// which never changes what exists.
    pub async fn provision(&self) -> Result<(), QueueError> {
        for config in [
            events_stream_config(&self.settings),
            dead_letter_stream_config(&self.settings),
            stranded_stream_config(&self.settings),
        ] {
            let name = config.name.clone();
            self.js
                .create_or_update_stream(config)
                .await
                .map_err(|e| QueueError::new(format!("creating stream {name}"), e))?;
        }
        for (stream, config) in [
            (&self.settings.stream, consumer_config(&self.settings)),
            (
                &self.settings.stranded_stream(),
                stranded_consumer_config(&self.settings),
            ),
        ] {
            let name = config.durable_name.clone().unwrap_or_default();
            self.js
                .get_stream(stream)
                .await
                .map_err(|e| QueueError::new(format!("opening stream {stream}"), e))?
                .create_consumer(config)
                .await
                .map_err(|e| QueueError::new(format!("creating consumer {name}"), e))?;
        }
        Ok(())
    }

    /// This connection with the ack wait and deliveries the shared consumer really has (another
    /// worker or an operator may have provisioned it otherwise, and provisioning leaves it so):
    /// what the worker decides about last deliveries and in-progress acks must match the server.
    pub async fn adopting_consumer_limits(mut self) -> Result<Self, QueueError> {
        let mut consumer = self.consumer_handle().await?;
        let info = consumer
            .info()
            .await
            .map_err(|e| QueueError::new("reading consumer info", e))?;
        let (ack_wait, max_deliver) = (info.config.ack_wait, info.config.max_deliver);
        if ack_wait != self.settings.ack_wait || max_deliver != self.settings.max_deliver {
            tracing::warn!(
                ?ack_wait,
                max_deliver,
                configured_ack_wait = ?self.settings.ack_wait,
                configured_max_deliver = self.settings.max_deliver,
                "the consumer exists with other limits than NATS_ACK_WAIT_SECS / NATS_MAX_DELIVER; \
                 working with the consumer's (see `sensors-worker provision --check`)"
            );
            self.settings.ack_wait = ack_wait;
            if max_deliver > 0 {
                self.settings.max_deliver = max_deliver;
            }
        }
        Ok(self)
    }

    /// The shared consumer, as it is (see [`Queue::ensure`] for creating it).
    pub async fn consumer(&self) -> Result<jetstream::consumer::PullConsumer, QueueError> {
        self.consumer_handle().await
    }

    /// Publishes an event to the events subject and waits for JetStream to store it. With a
    /// message id, a repeat within the duplicate window is dropped; returns whether it was.
    pub async fn publish_event(
        &self,
        payload: Vec<u8>,
        message_id: Option<&str>,
    ) -> Result<bool, QueueError> {
        let mut publish = Publish::build().payload(Bytes::from(payload));
        if let Some(id) = message_id {
            publish = publish.message_id(id);
        }
        self.publish(self.settings.subject.clone(), publish).await
    }

    /// Publishes `payload` to `subject` with a message id and waits for JetStream to store it;
    /// returns whether it was a duplicate (dropped).
    pub async fn publish_with_id(
        &self,
        subject: String,
        payload: Bytes,
        message_id: &str,
    ) -> Result<bool, QueueError> {
        let publish = Publish::build().payload(payload).message_id(message_id);
        self.publish(subject, publish).await
    }

    /// Creates or updates the stream of anomaly messages to this version's definition
    /// (`provision --update`).
    pub async fn update_anomalies(&self, settings: &AnomalySettings) -> Result<(), QueueError> {
        let config = anomaly_stream_config(settings, self.settings.replicas);
        let name = config.name.clone();
        self.js
            .create_or_update_stream(config)
            .await
            .map_err(|e| QueueError::new(format!("updating stream {name}"), e))?;
        Ok(())
    }

    /// Creates the stream of anomaly messages if it is missing.
    pub async fn provision_anomalies(&self, settings: &AnomalySettings) -> Result<(), QueueError> {
        let config = anomaly_stream_config(settings, self.settings.replicas);
        let name = config.name.clone();
        if self.js.get_stream(&name).await.is_ok() {
            return Ok(()); // as it is (see `provision`)
        }
        self.js
            .create_stream(config)
            .await
            .map_err(|e| QueueError::new(format!("creating stream {name}"), e))?;
        Ok(())
    }

    async fn publish(&self, subject: String, publish: Publish) -> Result<bool, QueueError> {
        let ack = self
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|e| QueueError::new(format!("publishing to {subject}"), e))?
            .await
            .map_err(|e| QueueError::new(format!("publishing to {subject}"), e))?;
        Ok(ack.duplicate)
    }

    /// Messages waiting for a worker plus those being worked on (for metrics).
    pub async fn pending(&self) -> Result<u64, QueueError> {
        let mut consumer = self.consumer_handle().await?;
        let info = consumer
            .info()
            .await
            .map_err(|e| QueueError::new("reading consumer info", e))?;
        Ok(info.num_pending + info.num_ack_pending as u64)
    }

    async fn consumer_handle(&self) -> Result<jetstream::consumer::PullConsumer, QueueError> {
        self.js
            .get_consumer_from_stream(&self.settings.consumer, &self.settings.stream)
            .await
            .map_err(|e| QueueError::new("opening consumer", e))
    }
}

/// The events stream: work-queue retention (an acked event is gone), file storage, and a
/// duplicate window for the message ids backfill sets.
pub fn events_stream_config(settings: &NatsSettings) -> stream::Config {
    stream::Config {
        name: settings.stream.clone(),
        description: Some("MinIO object notifications for the sensor pipeline".into()),
        subjects: vec![settings.subject.clone()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        max_age: EVENT_MAX_AGE,
        discard: stream::DiscardPolicy::Old,
        num_replicas: settings.replicas,
        ..Default::default()
    }
}

/// The dead-letter stream: kept (limits retention) until replayed or aged out.
pub fn dead_letter_stream_config(settings: &NatsSettings) -> stream::Config {
    stream::Config {
        name: settings.dlq_stream(),
        description: Some("Sensor pipeline events that could not be ingested".into()),
        subjects: vec![settings.dlq_subject.clone()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(2 * 60),
        max_age: DEAD_LETTER_MAX_AGE,
        num_replicas: settings.replicas,
        ..Default::default()
    }
}

/// The stream that keeps the events consumer's max-deliveries advisories (work-queue retention:
/// an advisory is gone once a worker has dead-lettered the event it names), so that an event whose
/// last delivery went unsettled while no worker was listening is still dead-lettered later.
pub fn stranded_stream_config(settings: &NatsSettings) -> stream::Config {
    stream::Config {
        name: settings.stranded_stream(),
        description: Some("Sensor pipeline events whose last delivery went unsettled".into()),
        subjects: vec![settings.stranded_subject()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        max_age: EVENT_MAX_AGE,
        num_replicas: settings.replicas,
        ..Default::default()
    }
}

/// The consumer of [`stranded_stream_config`] every worker shares. Its own deliveries are not
/// limited: an advisory is retried until its event is filed.
pub fn stranded_consumer_config(settings: &NatsSettings) -> pull::Config {
    pull::Config {
        durable_name: Some(settings.stranded_consumer()),
        description: Some("Sensor pipeline workers: dead-letter stranded events".into()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_deliver: -1,
        ..Default::default()
    }
}

/// The stream of anomaly messages (`<prefix>.<kind>`, see `crate::alerts`): kept 30 days for
/// whoever consumes them (alert bridges), with a one-hour duplicate window for the message ids
/// that make a repeated publication a no-op.
pub fn anomaly_stream_config(settings: &AnomalySettings, replicas: usize) -> stream::Config {
    stream::Config {
        name: settings.stream.clone(),
        description: Some("Anomalies the sensor pipeline found (open and resolved)".into()),
        subjects: vec![format!("{}.>", settings.subject_prefix)],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        max_age: DEAD_LETTER_MAX_AGE,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// The durable pull consumer every worker shares. Redeliveries after a missed ack back off: the
/// n-th waits `ack_wait × 2^(n-1)` (the server's `backoff`, at most 4 steps, fewer than
/// `max_deliver`).
pub fn consumer_config(settings: &NatsSettings) -> pull::Config {
    let s = settings;
    let backoff = (0..(s.max_deliver - 1).clamp(0, 4))
        .map(|n| s.ack_wait * 2u32.pow(n as u32))
        .collect();
    pull::Config {
        durable_name: Some(s.consumer.clone()),
        description: Some("Sensor pipeline workers".into()),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: s.ack_wait,
        max_deliver: s.max_deliver,
        backoff,
        max_ack_pending: 1024,
        filter_subject: s.subject.clone(),
        ..Default::default()
    }
}

/// Header names and values as NATS carries them (values on one line).
pub(crate) fn header_value(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

pub(crate) fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in pairs {
        h.insert(*name, header_value(value).as_str());
    }
    h
}
