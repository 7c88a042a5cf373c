//! Throwaway services for tests, benchmarks and the demo: PostgreSQL, NATS with JetStream, and an
//! S3 server (`s3s-fs`), all on free loopback ports.
//!
//! PostgreSQL and NATS are started once per process (the first test that asks starts them) and
//! stopped when the process exits, however it exits: each runs under a small shell watchdog that
//! stops the server and deletes its data as soon as its stdin — a pipe held by this process —
//! closes. Every test then gets its own database ([`Postgres::create_database`]) and its own stream
//! names, so tests run in parallel. The S3 server runs inside the test's own runtime, one per test,
//! over a temporary folder.
//!
//! `TEST_DATABASE_URL` (a superuser connection to an existing server), `TEST_NATS_URL` and
//! `TEST_S3_ENDPOINT` (with `TEST_S3_ACCESS_KEY`/`TEST_S3_SECRET_KEY`) use existing services instead.

mod processes;
mod s3;

use std::sync::OnceLock;

use anyhow::{Context, Result};
use sensor_pipeline::config::{DatabaseSettings, Env, ObjectStoreSettings, Secret};

pub use processes::{free_port, nats, postgres, wait_until, Nats, Postgres};
pub use s3::S3Server;

/// A fresh, isolated set of services for one test: its own database(s), its own bucket.
pub struct TestEnv {
    pub s3: S3Server,
    pub mapping_db: String,
    pub measurements_db: String,
}

impl TestEnv {
    /// One database for mapping and measurements.
    pub async fn new() -> Result<Self> {
        let db = postgres()?.create_database().await?;
        Ok(Self {
            s3: S3Server::start("code-challenge-data").await?,
            mapping_db: db.clone(),
            measurements_db: db,
        })
    }

    /// Two databases: mapping and measurements apart.
    pub async fn with_two_databases() -> Result<Self> {
        let pg = postgres()?;
        Ok(Self {
            s3: S3Server::start("code-challenge-data").await?,
            mapping_db: pg.create_database().await?,
            measurements_db: pg.create_database().await?,
        })
    }

    /// The variables a pipeline binary needs to work against this environment.
    pub fn vars(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("MINIO_ENDPOINT".to_string(), self.s3.endpoint.clone()),
            ("MINIO_ACCESS_KEY".into(), self.s3.access_key.clone()),
            ("MINIO_SECRET_KEY".into(), self.s3.secret_key.clone()),
            ("MINIO_BUCKET".into(), self.s3.bucket.clone()),
            ("DATABASE_URL".into(), self.mapping_db.clone()),
            (
                "TIMESCALE_DATABASE_URL".into(),
                self.measurements_db.clone(),
            ),
            ("NAIVE_TIMEZONE".into(), "Europe/Berlin".into()),
        ];
        v.sort();
        v
    }

    pub fn env(&self) -> Env {
        Env::from_map(self.vars())
    }

    pub fn object_store_settings(&self) -> ObjectStoreSettings {
        ObjectStoreSettings::from_env(&self.env()).expect("testbed settings are complete")
    }

    pub fn database_settings(&self) -> DatabaseSettings {
        DatabaseSettings {
            mapping_url: Secret::new(self.mapping_db.clone()),
            measurements_url: Secret::new(self.measurements_db.clone()),
        }
    }
}

/// Connects to a database URL (for assertions), driving the connection in the background.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| "connecting to the test database")?;
    tokio::spawn(conn);
    Ok(client)
}

/// A per-process unique, lowercase name with `prefix` (for databases, streams, buckets).
pub fn unique_name(prefix: &str) -> String {
    static PID: OnceLock<u32> = OnceLock::new();
    let pid = PID.get_or_init(std::process::id);
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{pid}_{}", &id[..12])
}
