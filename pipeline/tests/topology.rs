//! The JetStream definitions in `nats/` (for operators and the `nats` CLI) say exactly what the
//! code provisions with the default settings, and provisioning is idempotent on a real server.

use sensor_pipeline::config::{AnomalySettings, Env, NatsSettings};
use sensor_pipeline::queue::{self, Queue};

const NATS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../nats");

fn defaults() -> NatsSettings {
    NatsSettings::from_env(&Env::from_map(Vec::<(String, String)>::new())).unwrap()
}

/// Every field of the file must equal the code's value for it.
fn assert_file_matches(file: &str, code: serde_json::Value) {
    let text = std::fs::read_to_string(format!("{NATS_DIR}/{file}")).unwrap();
    let wanted: serde_json::Value = serde_json::from_str(&text).unwrap();
    let wanted = wanted.as_object().unwrap();
    assert!(wanted.len() >= 5, "{file} is too sparse");
    for (field, value) in wanted {
        assert_eq!(
            code.get(field),
            Some(value),
            "{file}: field {field} differs from what the code provisions: {code:#}"
        );
    }
}

#[test]
fn nats_definitions_match_the_code() {
    if std::env::var_os("PRINT_NATS_CONFIG").is_some() {
        let s = defaults();
        println!(
            "{}",
            serde_json::to_string_pretty(&queue::events_stream_config(&s)).unwrap()
        );
        println!(
            "{}",
            serde_json::to_string_pretty(&queue::dead_letter_stream_config(&s)).unwrap()
        );
        println!(
            "{}",
            serde_json::to_string_pretty(&queue::consumer_config(&s)).unwrap()
        );
        println!(
            "{}",
            serde_json::to_string_pretty(&queue::stranded_stream_config(&s)).unwrap()
        );
        println!(
            "{}",
            serde_json::to_string_pretty(&queue::stranded_consumer_config(&s)).unwrap()
        );
    }
    let s = defaults();
    assert_file_matches(
        "stream-sensor-events.json",
        serde_json::to_value(queue::events_stream_config(&s)).unwrap(),
    );
    assert_file_matches(
        "stream-sensor-events-dlq.json",
        serde_json::to_value(queue::dead_letter_stream_config(&s)).unwrap(),
    );
    assert_file_matches(
        "consumer-sensor-ingest.json",
        serde_json::to_value(queue::consumer_config(&s)).unwrap(),
    );
    assert_file_matches(
        "stream-sensor-events-stranded.json",
        serde_json::to_value(queue::stranded_stream_config(&s)).unwrap(),
    );
    assert_file_matches(
        "consumer-sensor-ingest-stranded.json",
        serde_json::to_value(queue::stranded_consumer_config(&s)).unwrap(),
    );
    let anomalies =
        AnomalySettings::from_env(&Env::from_map(Vec::<(String, String)>::new())).unwrap();
    assert_file_matches(
        "stream-sensor-anomalies.json",
        serde_json::to_value(queue::anomaly_stream_config(&anomalies, 1)).unwrap(),
    );
}

#[tokio::test]
async fn provisioning_is_idempotent_and_picks_up_new_settings() {
    let env = testbed::TestEnv::with_events().await.unwrap();
    let mut settings = env.events.clone().unwrap();
    let q = Queue::connect(&settings, "test").await.unwrap();
    q.provision().await.unwrap();
    q.provision().await.unwrap();
    settings.ack_wait = std::time::Duration::from_secs(7);
    settings.max_deliver = 3;
    let q = Queue::connect(&settings, "test").await.unwrap();
    q.provision().await.unwrap();
    let mut consumer = q.consumer().await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.config.ack_wait, std::time::Duration::from_secs(7));
    assert_eq!(info.config.max_deliver, 3);
    assert_eq!(info.config.backoff.len(), 2);
    let mut stream = q.jetstream().get_stream(&settings.stream).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(
        info.config.retention,
        async_nats::jetstream::stream::RetentionPolicy::WorkQueue
    );
    assert_eq!(info.config.duplicate_window, queue::DUPLICATE_WINDOW);
}

/// Drift as the log and `provision --check` say it.
fn said(drift: Result<Vec<queue::provision::Drift>, queue::QueueError>) -> Vec<String> {
    drift.unwrap().iter().map(ToString::to_string).collect()
}

/// What exists is never changed by `ensure` (what workers run at start): an operator's or another
/// worker's settings are reported as drift and left; what is missing is created; `check` changes
/// nothing at all.
#[tokio::test]
async fn ensure_creates_what_is_missing_and_reports_what_differs_without_changing_it() {
    let env = testbed::TestEnv::with_events().await.unwrap();
    let ours = env.events.clone().unwrap();
    // Someone provisioned the consumer with a 7 s ack wait.
    let mut theirs = ours.clone();
    theirs.ack_wait = std::time::Duration::from_secs(7);
    Queue::connect(&theirs, "operator")
        .await
        .unwrap()
        .provision()
        .await
        .unwrap();
    let q = Queue::connect(&ours, "worker").await.unwrap();
    let drift: Vec<String> = said(q.ensure(None).await);
    let consumer = format!("consumer {} on stream {}", ours.consumer, ours.stream);
    assert_eq!(
        drift,
        vec![
            format!("{consumer}: ack_wait is 7000000000, this version provisions 2000000000"),
            format!(
                "{consumer}: backoff is [7000000000,14000000000,28000000000,56000000000], this \
                 version provisions [2000000000,4000000000,8000000000,16000000000]"
            ),
        ]
    );
    let mut consumer = q.consumer().await.unwrap();
    assert_eq!(
        consumer.info().await.unwrap().config.ack_wait,
        std::time::Duration::from_secs(7)
    );
    // The worker works with the consumer's limits, not its own settings.
    let adopted = q.clone().adopting_consumer_limits().await.unwrap();
    assert_eq!(
        adopted.settings().ack_wait,
        std::time::Duration::from_secs(7)
    );

    // A stream missing: `check` reports it, `ensure` creates it.
    q.jetstream()
        .delete_stream(ours.dlq_stream())
        .await
        .unwrap();
    let missing = format!("stream {}: missing", ours.dlq_stream());
    let checked: Vec<String> = said(q.check(None).await);
    assert!(checked.contains(&missing), "{checked:?}");
    assert!(q.jetstream().get_stream(ours.dlq_stream()).await.is_err());
    let ensured: Vec<String> = said(q.ensure(None).await);
    assert!(!ensured.contains(&missing), "{ensured:?}");
    assert!(q.jetstream().get_stream(ours.dlq_stream()).await.is_ok());

    // Three replicas asked of streams that have one: reported, not forced.
    let mut replicated = ours.clone();
    replicated.replicas = 3;
    let replicated = Queue::connect(&replicated, "worker").await.unwrap();
    let mut drift = said(replicated.check(None).await);
    drift.retain(|d| d.contains("num_replicas"));
    assert_eq!(
        drift,
        [
            ours.stream.clone(),
            ours.dlq_stream(),
            ours.stranded_stream()
        ]
        .iter()
        .map(|s| format!("stream {s}: num_replicas is 1, this version provisions 3"))
        .collect::<Vec<_>>()
    );
}
