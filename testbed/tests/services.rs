//! The harness starts real services that answer on loopback.

use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn nats_server_runs_with_jetstream() {
    let nats = testbed::nats().await.unwrap();
    let addr = nats.url.trim_start_matches("nats://");
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut info = String::new();
    BufReader::new(stream).read_line(&mut info).await.unwrap();
    assert!(info.starts_with("INFO {"), "{info}");
    assert!(info.contains("\"jetstream\":true"), "{info}");
}

#[tokio::test]
async fn postgres_gives_each_test_its_own_database() {
    let pg = testbed::postgres().await.unwrap();
    let a = pg.create_database().await.unwrap();
    let b = pg.create_database().await.unwrap();
    assert_ne!(a, b);
    let client = testbed::connect(&a).await.unwrap();
    let db: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(a.ends_with(&db));
}

#[tokio::test]
async fn s3_server_stores_and_lists_objects() {
    let s3 = testbed::S3Server::start("bucket").await.unwrap();
    let etag = s3
        .put("timeseries/2013/plant A/Messung Nr. 7 (ü).csv", "x")
        .await
        .unwrap();
    assert_eq!(etag.len(), 32);
    s3.put("mapping/m.csv", "y").await.unwrap();
    let keys: Vec<String> = s3
        .store()
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(
        keys,
        vec![
            "mapping/m.csv",
            "timeseries/2013/plant A/Messung Nr. 7 (ü).csv"
        ]
    );
    let obj = s3.store().open("mapping/m.csv").await.unwrap();
    assert_eq!(obj.size, Some(1));
}

/// The MinIO stand-in announces PUT, multipart completion and copy exactly as MinIO would (one
/// notification each, key URL-encoded, ETag of the stored object), and nothing else.
#[tokio::test]
async fn s3_server_publishes_minio_notifications() {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    use futures_util::StreamExt;

    let env = testbed::TestEnv::with_events().await.unwrap();
    let events = env.events.clone().unwrap();
    let s3 = &env.s3;
    let c = s3.store().client();
    let bucket = &s3.bucket;

    let put_key = "timeseries/2013/plant A/Messung Nr. 7 (ü).csv";
    let put_etag = s3.put(put_key, "a;b\n").await.unwrap();
    let upload = c
        .create_multipart_upload()
        .bucket(bucket)
        .key("timeseries/multi.csv")
        .send()
        .await
        .unwrap();
    let id = upload.upload_id().unwrap();
    let part = c
        .upload_part()
        .bucket(bucket)
        .key("timeseries/multi.csv")
        .upload_id(id)
        .part_number(1)
        .body(b"x;y\n".to_vec().into())
        .send()
        .await
        .unwrap();
    c.complete_multipart_upload()
        .bucket(bucket)
        .key("timeseries/multi.csv")
        .upload_id(id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .parts(
                    CompletedPart::builder()
                        .part_number(1)
                        .e_tag(part.e_tag().unwrap())
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    c.copy_object()
        .bucket(bucket)
        .key("mapping/copy.csv")
        .copy_source(format!("{bucket}/timeseries/multi.csv"))
        .send()
        .await
        .unwrap();
    // Reads and deletes are not creations.
    s3.store().head(put_key).await.unwrap();
    s3.delete("mapping/copy.csv").await.unwrap();

    // The pipeline's own consumer (a work-queue stream allows only one unfiltered consumer).
    let consumer = sensor_pipeline::queue::Queue::connect(&events, "test")
        .await
        .unwrap()
        .consumer()
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .expires(std::time::Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Some(m) = batch.next().await {
        let m = m.unwrap();
        for e in sensor_pipeline::events::decode(&m.payload).unwrap() {
            seen.push((e.name, e.key, e.etag.is_some_and(|t| t.len() >= 32)));
        }
        let text = String::from_utf8_lossy(&m.payload).to_string();
        if text.contains("plant") {
            assert!(
                text.contains(
                    r#""key":"timeseries%2F2013%2Fplant+A%2FMessung+Nr.+7+%28%C3%BC%29.csv""#
                ),
                "{text}"
            );
            assert!(text.contains(&format!(r#""eTag":"{put_etag}""#)), "{text}");
        }
    }
    assert_eq!(
        seen,
        vec![
            (
                "s3:ObjectCreated:Put".to_string(),
                put_key.to_string(),
                true
            ),
            (
                "s3:ObjectCreated:CompleteMultipartUpload".into(),
                "timeseries/multi.csv".into(),
                true
            ),
            (
                "s3:ObjectCreated:Copy".into(),
                "mapping/copy.csv".into(),
                true
            ),
        ]
    );
}
