//! MinIO's bucket notifications, as its NATS target publishes them (SPEC §4).
//!
//! A message is `{"EventName": …, "Key": "<bucket>/<key>", "Records": [<S3 event record>…]}`. In
//! each record, `s3.object.key` is URL-encoded the way Go's `url.QueryEscape` does it (`+` for a
//! space, `%XX` for everything but `A–Z a–z 0–9 - _ . ~`). Every record of a message is an event.
//! Backfill and the test harness publish the same format, so [`encode_key`] is here too.

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use thiserror::Error;

/// Bytes Go's `url.QueryEscape` leaves as they are (space aside, which becomes `+`).
const QUERY_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A message that is not a usable MinIO notification (a permanent failure: dead-letter it).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EventError {
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("payload is not a MinIO bucket notification: {0}")]
    NotMinioEvent(String),
    #[error("object key {0:?} is not valid URL encoding of UTF-8")]
    BadKey(String),
}

/// One S3 event of a notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectEvent {
    /// E.g. `s3:ObjectCreated:Put`.
    pub name: String,
    pub bucket: String,
    /// The decoded object key.
    pub key: String,
    /// Without quotes; absent on removals.
    pub etag: Option<String>,
    pub size: Option<i64>,
}

impl ObjectEvent {
    /// Put, Post, Copy, CompleteMultipartUpload…: a new object version to ingest.
    pub fn is_created(&self) -> bool {
        self.name.starts_with("s3:ObjectCreated:")
    }
}

#[derive(Deserialize)]
struct Message {
    #[serde(rename = "Records")]
    records: Vec<Record>,
}

#[derive(Deserialize)]
struct Record {
    #[serde(rename = "eventName")]
    event_name: String,
    s3: S3,
}

#[derive(Deserialize)]
struct S3 {
    bucket: Bucket,
    object: Object,
}

#[derive(Deserialize)]
struct Bucket {
    name: String,
}

#[derive(Deserialize)]
struct Object {
    key: String,
    #[serde(rename = "eTag")]
    etag: Option<String>,
    size: Option<i64>,
}

/// Decodes a notification into its events (at least one).
pub fn decode(payload: &[u8]) -> Result<Vec<ObjectEvent>, EventError> {
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| EventError::NotJson(e.to_string()))?;
    let message: Message =
        serde_json::from_value(value).map_err(|e| EventError::NotMinioEvent(e.to_string()))?;
    if message.records.is_empty() {
        return Err(EventError::NotMinioEvent("it has no Records".into()));
    }
    message
        .records
        .into_iter()
        .map(|r| {
            Ok(ObjectEvent {
                name: r.event_name,
                bucket: r.s3.bucket.name,
                key: decode_key(&r.s3.object.key)?,
                etag: r
                    .s3
                    .object
                    .etag
                    .map(|t| t.trim_matches('"').to_string())
                    .filter(|t| !t.is_empty()),
                size: r.s3.object.size,
            })
        })
        .collect()
}

/// Reverses Go's `url.QueryEscape`.
pub fn decode_key(encoded: &str) -> Result<String, EventError> {
    let spaced = encoded.replace('+', " ");
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|k| k.into_owned())
        .map_err(|_| EventError::BadKey(encoded.to_string()))
}

/// Encodes a key as Go's `url.QueryEscape` does (as MinIO puts it in a notification).
pub fn encode_key(key: &str) -> String {
    // A literal "%20" in the key is itself escaped to "%2520", so this replacement is exact.
    utf8_percent_encode(key, QUERY_ESCAPE)
        .to_string()
        .replace("%20", "+")
}

/// A notification in MinIO's format for one new object version, as MinIO's NATS target would
/// publish it (used by backfill and by the test harness's stand-in for MinIO).
pub fn object_created(event_name: &str, bucket: &str, key: &str, etag: &str, size: i64) -> Vec<u8> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    serde_json::json!({
        "EventName": event_name,
        "Key": format!("{bucket}/{key}"),
        "Records": [{
            "eventVersion": "2.0",
            "eventSource": "minio:s3",
            "awsRegion": "",
            "eventTime": now,
            "eventName": event_name,
            "userIdentity": {"principalId": "sensor-pipeline"},
            "requestParameters": {"principalId": "sensor-pipeline", "region": "", "sourceIPAddress": ""},
            "responseElements": {},
            "s3": {
                "s3SchemaVersion": "1.0",
                "configurationId": "Config",
                "bucket": {
                    "name": bucket,
                    "ownerIdentity": {"principalId": "sensor-pipeline"},
                    "arn": format!("arn:aws:s3:::{bucket}"),
                },
                "object": {
                    "key": encode_key(key),
                    "size": size,
                    "eTag": etag,
                    "contentType": "text/csv",
                    "userMetadata": {},
                    "sequencer": "",
                },
            },
            "source": {"host": "", "port": "", "userAgent": "sensor-pipeline"},
        }],
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_created_round_trips() {
        let key = "timeseries/2013/plant A/Messung Nr. 7 (ü).csv";
        let payload = object_created("s3:ObjectCreated:Put", "b", key, "abc", 913);
        let events = decode(&payload).unwrap();
        assert_eq!(
            events,
            vec![ObjectEvent {
                name: "s3:ObjectCreated:Put".into(),
                bucket: "b".into(),
                key: key.into(),
                etag: Some("abc".into()),
                size: Some(913),
            }]
        );
        let text = String::from_utf8(payload).unwrap();
        assert!(text
            .contains(r#""key":"timeseries%2F2013%2Fplant+A%2FMessung+Nr.+7+%28%C3%BC%29.csv""#));
    }

    #[test]
    fn go_query_escape_compatible() {
        let key = "timeseries/2013/02/plant A/Messung Nr. 7 (ü).csv";
        let encoded = "timeseries%2F2013%2F02%2Fplant+A%2FMessung+Nr.+7+%28%C3%BC%29.csv";
        assert_eq!(encode_key(key), encoded);
        assert_eq!(decode_key(encoded).unwrap(), key);
        assert_eq!(encode_key("a+b%20c~d"), "a%2Bb%2520c~d");
        assert_eq!(decode_key("a%2Bb%2520c~d").unwrap(), "a+b%20c~d");
        assert_eq!(decode_key("%FF"), Err(EventError::BadKey("%FF".into())));
    }

    #[test]
    fn poison_payloads() {
        assert!(matches!(decode(b"not json"), Err(EventError::NotJson(_))));
        assert!(matches!(
            decode(b"{\"hello\": 1}"),
            Err(EventError::NotMinioEvent(_))
        ));
        assert!(matches!(
            decode(b"{\"Records\": []}"),
            Err(EventError::NotMinioEvent(_))
        ));
        assert!(matches!(
            decode(b"[1,2]"),
            Err(EventError::NotMinioEvent(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn keys_round_trip(key in "\\PC{0,40}") {
            proptest::prop_assert_eq!(decode_key(&encode_key(&key)).unwrap(), key);
        }
    }
}
