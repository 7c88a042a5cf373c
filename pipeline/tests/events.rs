//! MinIO notifications exactly as MinIO publishes them (fixtures captured from MinIO's NATS target).

use sensor_pipeline::events::{decode, ObjectEvent};

fn fixture(name: &str) -> Vec<ObjectEvent> {
    let path = format!(
        "{}/tests/fixtures/minio-events/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    decode(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn put() {
    assert_eq!(
        fixture("put.json"),
        vec![ObjectEvent {
            name: "s3:ObjectCreated:Put".into(),
            bucket: "code-challenge-data".into(),
            key: "timeseries/2013/01/part-0001.csv".into(),
            etag: Some("4d8c2b3a1f0e9d7c6b5a4f3e2d1c0b9a".into()),
            size: Some(48213),
        }]
    );
    assert!(fixture("put.json")[0].is_created());
}

#[test]
fn put_with_url_encoded_key() {
    let e = &fixture("put-encoded-key.json")[0];
    assert_eq!(e.key, "timeseries/2013/02/plant A/Messung Nr. 7 (ü).csv");
    assert_eq!(e.etag.as_deref(), Some("0cc175b9c0f1b6a831c399e269772661"));
}

#[test]
fn complete_multipart_upload() {
    let e = &fixture("complete-multipart.json")[0];
    assert!(e.is_created());
    assert_eq!(e.key, "timeseries/2013/big/part-0042.csv.gz");
    assert_eq!(
        e.etag.as_deref(),
        Some("9b2cf535f27731c974343645a3985328-14")
    );
    assert_eq!(e.size, Some(73_400_320));
}

#[test]
fn removed_is_not_a_creation() {
    let e = &fixture("removed.json")[0];
    assert_eq!(e.name, "s3:ObjectRemoved:Delete");
    assert!(!e.is_created());
    assert_eq!(e.etag, None);
}

#[test]
fn every_record_of_a_message() {
    let one = std::fs::read_to_string(format!(
        "{}/tests/fixtures/minio-events/put.json",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&one).unwrap();
    let mut second = v["Records"][0].clone();
    second["s3"]["object"]["key"] = "mapping%2Fm.csv".into();
    v["Records"].as_array_mut().unwrap().push(second);
    let events = decode(v.to_string().as_bytes()).unwrap();
    let keys: Vec<&str> = events.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        vec!["timeseries/2013/01/part-0001.csv", "mapping/m.csv"]
    );
}
