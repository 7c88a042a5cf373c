//! Throwaway services for tests, benchmarks and the demo: PostgreSQL, NATS with JetStream, and an
//! S3 server (`s3s-fs`), all on free loopback ports.
//!
//! What this crate is: the project's local stack, for everything that runs the pipeline on one
//! machine without a deployment — the integration tests (as a dev-dependency), the `bench-*`
//! binaries, and `cargo xtask demo` (which links it to start the S3 stand-in and reuse the
//! PostgreSQL helpers). It is never a dependency of `sensors-worker` or `query-cli`, and it is not
//! in the container image; nothing here is meant for production.
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

pub mod bench;
pub mod data;
pub mod kinds;
pub mod nab;
pub mod nats_auth;
mod processes;
pub mod rng;
mod s3;
pub mod tls;

use std::sync::OnceLock;

use anyhow::{Context, Result};
use sensor_pipeline::config::{
    DatabaseSettings, Env, NatsAuth, NatsSettings, ObjectStoreSettings, Secret,
};

pub use processes::{
    database, find_pg_binary, free_port, init_cluster, is_root, nats, nats_server, owned_nats,
    owned_nats_cluster, owned_nats_with, owned_nats_with_env, owned_pgbouncer, owned_postgres,
    owned_postgres_tls, owned_postgres_with, postgres, postgres_command, wait_until,
    wait_until_async, which, Nats, OwnedServer, Postgres,
};
pub use s3::{NotifyTarget, S3Server};

/// A fresh, isolated set of services for one test: its own database(s), its own bucket, and with
/// [`TestEnv::with_events`] its own JetStream streams and consumer.
pub struct TestEnv {
    pub s3: S3Server,
    pub mapping_db: String,
    pub measurements_db: String,
    pub events: Option<NatsSettings>,
}

impl TestEnv {
    /// One database for mapping and measurements.
    pub async fn new() -> Result<Self> {
        let db = postgres().await?.create_database().await?;
        Ok(Self {
            s3: S3Server::start("code-challenge-data").await?,
            mapping_db: db.clone(),
            measurements_db: db,
            events: None,
        })
    }

    /// One database, NATS JetStream with the test's own stream, consumer and dead-letter names
    /// (provisioned), and an S3 server that publishes MinIO notifications to the stream.
    pub async fn with_events() -> Result<Self> {
        let db = postgres().await?.create_database().await?;
        Self::with_events_at(&nats().await?.url, db).await
    }

    /// [`TestEnv::with_events`] on a given NATS server and database.
    pub async fn with_events_at(nats_url: &str, database_url: String) -> Result<Self> {
        Self::with_events_replicated(nats_url, database_url, 1).await
    }

    /// [`TestEnv::with_events_at`] with streams of `replicas` replicas (a JetStream cluster);
    /// provisioning is retried for up to a minute while the cluster elects its leaders.
    pub async fn with_events_replicated(
        nats_url: &str,
        database_url: String,
        replicas: usize,
    ) -> Result<Self> {
        Self::with_events_as(nats_url, database_url, replicas, NatsAuth::default()).await
    }

    /// [`TestEnv::with_events_replicated`] with NATS credentials and TLS (passed on to the
    /// pipeline's binaries as `NATS_USER`, … and used by the S3 stand-in too).
    pub async fn with_events_as(
        nats_url: &str,
        database_url: String,
        replicas: usize,
        auth: NatsAuth,
    ) -> Result<Self> {
        let id = unique_name("e");
        let settings = NatsSettings {
            url: Secret::new(nats_url),
            subject: format!("{id}.minio"),
            stream: id.to_uppercase(),
            consumer: format!("{id}-ingest"),
            dlq_subject: format!("{id}.dlq"),
            ack_wait: std::time::Duration::from_secs(2),
            max_deliver: 5,
            replicas,
            auth: auth.clone(),
        };
        let queue = sensor_pipeline::queue::Queue::connect(&settings, "testbed").await?;
        let started = std::time::Instant::now();
        while let Err(e) = queue.provision().await {
            if started.elapsed() > std::time::Duration::from_secs(60) {
                return Err(e.into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let s3 = S3Server::start_notifying(
            "code-challenge-data",
            NotifyTarget {
                nats_url: nats_url.to_string(),
                subject: settings.subject.clone(),
                auth,
            },
        )
        .await?;
        Ok(Self {
            s3,
            mapping_db: database_url.clone(),
            measurements_db: database_url,
            events: Some(settings),
        })
    }

    /// Two databases: mapping and measurements apart.
    pub async fn with_two_databases() -> Result<Self> {
        let pg = postgres().await?;
        Ok(Self {
            s3: S3Server::start("code-challenge-data").await?,
            mapping_db: pg.create_database().await?,
            measurements_db: pg.create_database().await?,
            events: None,
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
        if let Some(e) = &self.events {
            v.extend([
                ("NATS_URL".to_string(), e.url.expose().to_string()),
                ("NATS_SUBJECT".into(), e.subject.clone()),
                ("NATS_STREAM".into(), e.stream.clone()),
                ("NATS_CONSUMER".into(), e.consumer.clone()),
                ("NATS_DLQ_SUBJECT".into(), e.dlq_subject.clone()),
                (
                    "NATS_ACK_WAIT_SECS".into(),
                    e.ack_wait.as_secs().to_string(),
                ),
                ("NATS_MAX_DELIVER".into(), e.max_deliver.to_string()),
            ]);
            let a = &e.auth;
            let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
            for (name, value) in [
                ("NATS_USER", a.user.clone()),
                (
                    "NATS_PASSWORD",
                    a.password.as_ref().map(|s| s.expose().to_string()),
                ),
                (
                    "NATS_TOKEN",
                    a.token.as_ref().map(|s| s.expose().to_string()),
                ),
                (
                    "NATS_NKEY_SEED",
                    a.nkey_seed.as_ref().map(|s| s.expose().to_string()),
                ),
                (
                    "NATS_CREDS",
                    a.creds.as_ref().map(|s| s.expose().to_string()),
                ),
                ("NATS_TLS_CA_FILE", path(&a.tls_ca)),
                ("NATS_TLS_CERT_FILE", path(&a.tls_cert)),
                ("NATS_TLS_KEY_FILE", path(&a.tls_key)),
            ] {
                if let Some(value) = value {
                    v.push((name.to_string(), value));
                }
            }
        }
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
            timeouts: Default::default(),
        }
    }
}

/// Connects to a database URL (for assertions), driving the connection in the background.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (config, tls) = sensor_pipeline::store::pg_config(url, "test")?;
    let (client, conn) = config
        .connect(tls)
        .await
        .with_context(|| "connecting to the test database")?;
    tokio::spawn(conn);
    Ok(client)
}

/// The aggregates of a bucket's readings a rollup row must agree with.
const AGGREGATE: &str = "count(*) AS n, min(value) AS low, max(value) AS high,
    sum(value) AS total, sum(abs(value)) AS magnitude,
    min(ts) AS first_at, (array_agg(value ORDER BY ts))[1] AS first,
    max(ts) AS last_at, (array_agg(value ORDER BY ts DESC))[1] AS last";

/// The derived tables the ingest merge keeps beside `measurements` — the page index
/// (`measurement_days`) and the hourly and daily rollups — compared with what the
/// stored rows say: each `(sensor, day or hour)` that differs, as text (empty when they agree).
/// Counts must be exact, and so must an hour's low, high, first and last reading when it is
/// marked exact, and its total up to the rounding of adding its values in another order (within
/// 10⁻¹² of the sum of their magnitudes); an hour not marked exact (left for detection to
/// settle) must have bounds around its readings'. The daily rollup (`measurement_day_values`)
/// is held to the same, and must be exact exactly when all its hours are. See
/// [`inexact_hours`].
pub async fn derived_drift(client: &tokio_postgres::Client) -> Result<Vec<String>> {
    // A rollup row `r` against the aggregate `c` of the readings it rolls up.
    let agrees = |r: &str| {
        format!(
            "CASE WHEN {r}.exact
                 THEN {r}.low = c.low AND {r}.high = c.high
                     AND {r}.first_at = c.first_at AND {r}.first_value = c.first
                     AND {r}.last_at = c.last_at AND {r}.last_value = c.last
                     AND abs({r}.total - c.total) <= 1e-12 * c.magnitude
                 ELSE {r}.low <= c.low AND {r}.high >= c.high END"
        )
    };
    let (h, d) = (agrees("h"), agrees("d"));
    // A rollup table's rows as `alias`, each described beside the readings' aggregate `c`.
    let described = |label: &str, table: &str, alias: &str, bucket: &str| {
        format!(
            "SELECT '{label} ' || coalesce({alias}.sensor_uuid, c.sensor_uuid)::text || ' '
                    || coalesce({alias}.{bucket}, c.{bucket})::text || ': '
                    || coalesce({alias}::text, '-') || ' rolled up, '
                    || coalesce(c::text, '-') || ' stored'
             FROM {table} {alias}"
        )
    };
    let hours = described("hour", "measurement_hours", "h", "hour");
    let days = described("day values", "measurement_day_values", "d", "day");
    let rows = client
        .query(
            &format!(
                "SELECT 'day ' || coalesce(d.sensor_uuid, c.sensor_uuid)::text || ' '
                    || coalesce(d.day, c.day)::text || ': ' || coalesce(d.readings::text, '-')
                    || ' indexed, ' || coalesce(c.n::text, '-') || ' stored'
             FROM measurement_days d
             FULL JOIN (SELECT sensor_uuid, date_trunc('day', ts, 'UTC') AS day, count(*) AS n
                        FROM measurements GROUP BY 1, 2) c USING (sensor_uuid, day)
             WHERE d.readings IS DISTINCT FROM c.n
             UNION ALL
             {hours}
             FULL JOIN (SELECT sensor_uuid, date_trunc('hour', ts, 'UTC') AS hour,
                               {AGGREGATE}
                        FROM measurements GROUP BY 1, 2) c USING (sensor_uuid, hour)
             WHERE coalesce(NOT (h.readings = c.n AND {h}), true)
             UNION ALL
             {days}
             FULL JOIN (SELECT sensor_uuid, date_trunc('day', ts, 'UTC') AS day,
                               {AGGREGATE},
                               bool_and(h.exact) AS exact_hours
                        FROM measurements
                        JOIN measurement_hours h USING (sensor_uuid)
                        WHERE h.hour = date_trunc('hour', ts, 'UTC')
                        GROUP BY 1, 2) c USING (sensor_uuid, day)
             WHERE coalesce(NOT (d.readings = c.n AND d.exact = c.exact_hours AND {d}), true)"
            ),
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Rebuilds the tables the ingest merge keeps beside `measurements` — the page index and the
/// hourly rollup (and so the daily one) — from the stored rows, for rows written directly (benchmarks, tests).
pub async fn derive_from_rows(client: &tokio_postgres::Client) -> Result<()> {
    client
        .batch_execute(
            "TRUNCATE measurement_days, measurement_hours, measurement_day_values;
             INSERT INTO measurement_days (sensor_uuid, day, readings)
             SELECT sensor_uuid, date_trunc('day', ts, 'UTC'), count(*) FROM measurements
             GROUP BY 1, 2;
             INSERT INTO measurement_hours (sensor_uuid, hour, exact, readings, low, high, total,
                                            first_at, first_value, last_at, last_value)
             SELECT sensor_uuid, date_trunc('hour', ts, 'UTC'), true, count(*), min(value),
                    max(value), sum(value), min(ts), (array_agg(value ORDER BY ts))[1],
                    max(ts), (array_agg(value ORDER BY ts DESC))[1]
             FROM measurements GROUP BY 1, 2",
        )
        .await?;
    Ok(())
}

/// Whether the server of `url` has the `timescaledb` extension installed (tests of what the
/// migrations make of `measurements` depend on it; CI's server has not).
pub async fn timescaledb_installed(url: &str) -> Result<bool> {
    Ok(connect(url)
        .await?
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')",
            &[],
        )
        .await?
        .get(0))
}

/// Whether the server at `url` (a superuser connection) preloads TimescaleDB.
pub async fn timescaledb_preloaded(url: &str) -> Result<bool> {
    Ok(connect(url)
        .await?
        .query_one(
            "SELECT current_setting('shared_preload_libraries') ~ 'timescaledb'",
            &[],
        )
        .await?
        .get(0))
}

/// A row of a test's query as a tuple of its columns ([`rows`]).
pub trait FromRow {
    fn from_row(row: &tokio_postgres::Row) -> Self;
}

macro_rules! from_row_for_tuples {
    ($(($($t:ident $i:tt),+)),+) => {$(
        impl<$($t: for<'a> tokio_postgres::types::FromSql<'a>),+> FromRow for ($($t,)+) {
            fn from_row(row: &tokio_postgres::Row) -> Self {
                ($(row.get($i),)+)
            }
        }
    )+};
}
from_row_for_tuples!(
    (A 0),
    (A 0, B 1),
    (A 0, B 1, C 2),
    (A 0, B 1, C 2, D 3),
    (A 0, B 1, C 2, D 3, E 4)
);

/// Every row `sql` (no parameters) returns, each as a tuple: panics on an error, as a test wants.
pub async fn rows<T: FromRow>(client: &tokio_postgres::Client, sql: &str) -> Vec<T> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(T::from_row)
        .collect()
}

/// The first column of every row `sql` returns.
pub async fn column<T>(client: &tokio_postgres::Client, sql: &str) -> Vec<T>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let rows: Vec<(T,)> = rows(client, sql).await;
    rows.into_iter().map(|(v,)| v).collect()
}

/// The first column of the one row `sql` returns (a count, a value): panics otherwise.
pub async fn scalar<T>(client: &tokio_postgres::Client, sql: &str) -> T
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    let mut values = column(client, sql).await;
    assert_eq!(values.len(), 1, "{sql}: one row");
    values.remove(0)
}

/// Hours of the rollup not marked exact.
pub async fn inexact_hours(client: &tokio_postgres::Client) -> Result<i64> {
    Ok(client
        .query_one(
            "SELECT count(*) FROM measurement_hours WHERE NOT exact",
            &[],
        )
        .await?
        .get(0))
}

/// A per-process unique, lowercase name with `prefix` (for databases, streams, buckets).
pub fn unique_name(prefix: &str) -> String {
    static PID: OnceLock<u32> = OnceLock::new();
    let pid = PID.get_or_init(std::process::id);
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{pid}_{}", &id[..12])
}

/// Runs one of the project's binaries as a user would: only `PATH` and `env` in its environment,
/// from an empty folder (so no `config/.env` is picked up), and returns its output.
pub async fn run_binary(
    program: &str,
    env: &[(String, String)],
    args: &[&str],
) -> std::process::Output {
    tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(std::env::temp_dir())
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}
