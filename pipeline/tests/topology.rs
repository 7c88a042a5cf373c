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
        serde_json::to_value(queue::anomaly_stream_config(&anomalies)).unwrap(),
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
