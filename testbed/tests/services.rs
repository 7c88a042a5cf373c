//! The harness starts real services that answer on loopback.

use std::io::{BufRead, BufReader};

#[test]
fn nats_server_runs_with_jetstream() {
    let nats = testbed::nats().unwrap();
    let addr = nats.url.trim_start_matches("nats://");
    let stream = std::net::TcpStream::connect(addr).unwrap();
    let mut info = String::new();
    BufReader::new(stream).read_line(&mut info).unwrap();
    assert!(info.starts_with("INFO {"), "{info}");
    assert!(info.contains("\"jetstream\":true"), "{info}");
}

#[tokio::test]
async fn postgres_gives_each_test_its_own_database() {
    let pg = testbed::postgres().unwrap();
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
