//! What the worker tests share: a test's services, worker processes and their logs, waiting on
//! conditions, reading metrics.
#![allow(dead_code)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use sensor_pipeline::queue::Queue;
use testbed::TestEnv;
use tokio::process::{Child, Command};

pub const SAMPLE_DATA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../pipeline/tests/fixtures/sample-data"
);
pub const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../pipeline/tests/fixtures");
pub const U1: &str = "cd613e30-d8f1-4adf-91b7-584a2265b1f5";

/// A test's services plus handles to look at them.
pub struct Pipeline {
    pub env: TestEnv,
    pub queue: Queue,
    pub db: tokio_postgres::Client,
    pub logs: tempfile::TempDir,
}

impl Pipeline {
    pub async fn new() -> Self {
        Self::from_env(TestEnv::with_events().await.unwrap()).await
    }

    /// A pipeline whose JetStream consumer is provisioned with `change`d settings (ack wait,
    /// deliveries, …), which the workers it starts are given too.
    pub async fn with_nats(
        change: impl FnOnce(&mut sensor_pipeline::config::NatsSettings),
    ) -> Self {
        Self::from_env_with_nats(TestEnv::with_events().await.unwrap(), change).await
    }

    /// [`Pipeline::with_nats`] on a given environment.
    pub async fn from_env_with_nats(
        mut env: TestEnv,
        change: impl FnOnce(&mut sensor_pipeline::config::NatsSettings),
    ) -> Self {
        change(env.events.as_mut().expect("an environment with events"));
        let p = Self::from_env(env).await;
        p.queue.provision().await.unwrap();
        p
    }

    pub async fn from_env(env: TestEnv) -> Self {
        sensor_pipeline::store::migrate::migrate(&env.database_settings())
            .await
            .unwrap();
        let queue = Queue::connect(env.events.as_ref().unwrap(), "test")
            .await
            .unwrap();
        let db = testbed::connect(&env.mapping_db).await.unwrap();
        Self {
            env,
            queue,
            db,
            logs: tempfile::tempdir().unwrap(),
        }
    }

    pub fn vars(&self) -> Vec<(String, String)> {
        self.env.vars()
    }

    /// Starts `sensors-worker run`; its log goes to a file in `logs` (printed if a wait fails).
    pub fn worker(&self, name: &str, extra: &[(&str, &str)]) -> Worker {
        let log = self.logs.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sensors-worker"))
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.vars())
            // Port 0: the worker binds a free port and logs which (see `Worker::metrics_addr`).
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("WORKER_CONCURRENCY", "2")
            .env("RUST_LOG", "info")
            .envs(extra.iter().copied())
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Worker { child, log }
    }

    pub async fn status(&self, key: &str) -> Option<(String, i64, i32)> {
        self.db
            .query_opt(
                "SELECT status, rows_ok, attempts FROM ingest_ledger WHERE object_key = $1 \
                 ORDER BY finished_at DESC LIMIT 1",
                &[&key],
            )
            .await
            .unwrap()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
    }

    pub async fn count(&self, sql: &str) -> i64 {
        testbed::scalar(&self.db, sql).await
    }

    /// Waits until `key`'s latest ledger entry has `status`.
    pub async fn settled(&self, key: &str, status: &str, workers: &[&Worker]) {
        let what = format!("{key} to be {status}");
        wait_for(&what, Duration::from_secs(60), workers, || async {
            self.status(key).await.is_some_and(|(s, ..)| s == status)
        })
        .await;
    }

    pub async fn dead_letters(&self) -> Vec<sensor_pipeline::queue::dead_letters::DeadLetter> {
        self.queue.dead_letters().await.unwrap()
    }

    pub async fn worker_cli(&self, args: &[&str]) -> std::process::Output {
        testbed::run_binary(env!("CARGO_BIN_EXE_sensors-worker"), &self.vars(), args).await
    }
}

pub struct Worker {
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Worker {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address the worker's metrics server bound, from its log line (waits for it).
    pub async fn metrics_addr(&self) -> String {
        let mut found = None;
        wait_for(
            "the metrics address in the log",
            Duration::from_secs(60),
            &[self],
            || {
                found = metrics_addr_in(&self.log());
                std::future::ready(found.is_some())
            },
        )
        .await;
        found.expect("found")
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub async fn exit_code(&mut self, limit: Duration) -> Option<i32> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("worker did not exit in {limit:?}:\n{}", self.log()))
            .unwrap()
            .code()
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(&self.metrics_addr().await, path).await
    }
}

/// Polls `ready` every 50 ms until it holds, or fails after `limit` showing the workers' logs.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, workers: &[&Worker], mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !ready().await {
        if start.elapsed() > limit {
            let logs: Vec<String> = workers.iter().map(|w| w.log()).collect();
            panic!(
                "timed out after {limit:?} waiting for {what}; worker logs:\n{}",
                logs.join("\n---\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `addr=` of the worker's "serving /metrics" log line (colours removed).
pub fn metrics_addr_in(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("serving /metrics"))?;
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An ANSI escape: skip to its final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let addr = plain.split("addr=").nth(1)?.split_whitespace().next()?;
    Some(addr.to_string())
}

/// A minimal HTTP/1.0 GET (status, body), retried until the endpoint listens.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = Instant::now();
    let mut stream = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(e) if start.elapsed() < Duration::from_secs(30) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{addr}: {e}"),
        }
    };
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one Prometheus sample line, e.g. `sensors_objects_total{outcome="done"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A clean measurement file of `rows` readings of sensor U1.
pub fn big_file(rows: usize) -> String {
    let mut s = String::with_capacity(rows * 70);
    s.push_str("timestamp;sensor_uuid;sensor_value\n");
    for i in 0..rows {
        let t = chrono::DateTime::from_timestamp(1_356_998_400 + i as i64, 0).unwrap();
        s.push_str(&format!(
            "{};{U1};{}.5\n",
            t.format("%Y-%m-%dT%H:%M:%SZ"),
            i % 1000
        ));
    }
    s
}

/// Waits until every event has been acknowledged.
pub async fn wait_drained(p: &Pipeline, workers: &[&Worker]) {
    wait_for(
        "every event to be acknowledged",
        Duration::from_secs(60),
        workers,
        || async { p.queue.pending().await.is_ok_and(|n| n == 0) },
    )
    .await;
}
