//! Benchmark (not a test): the event-driven path with real worker processes.
//!
//! ```text
//! cargo build --release -p sensors-worker -p testbed
//! target/release/bench-events [--uploads 30] [--files 24] [--rows-per-file 100000]
//!     [--worker target/release/sensors-worker] [--worker-concurrency N]
//! ```
//!
//! 1. Latency: with two idle `sensors-worker run` processes, upload a 1,000-row file and time
//!    until its ledger entry says `done` (so its rows are queryable); p50/p95/max over `--uploads`.
//! 2. Throughput: 24 files × 100,000 rows, announced as MinIO events at once to two worker
//!    processes, against `sensors-worker ingest --all` of the same files into a fresh database.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sensor_pipeline::queue::Queue;

struct Args {
    uploads: usize,
    files: usize,
    rows_per_file: usize,
    worker: PathBuf,
    /// WORKER_CONCURRENCY of each event worker (default: the worker's own default, the CPU count).
    worker_concurrency: Option<String>,
}

fn args() -> Result<Args> {
    let mut a = Args {
        uploads: 30,
        files: 24,
        rows_per_file: 100_000,
        worker: PathBuf::from("target/release/sensors-worker"),
        worker_concurrency: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--uploads" => a.uploads = value.parse()?,
            "--files" => a.files = value.parse()?,
            "--rows-per-file" => a.rows_per_file = value.parse()?,
            "--worker" => a.worker = value.into(),
            "--worker-concurrency" => a.worker_concurrency = Some(value),
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(a)
}

/// `rows` clean readings over 100 sensors, starting `offset` seconds after 2013-01-01.
fn csv(offset: usize, rows: usize) -> String {
    let mut out = String::with_capacity(rows * 70);
    out.push_str("timestamp;sensor_uuid;sensor_value\n");
    for r in 0..rows {
        let i = offset + r;
        let sensor =
            uuid::Uuid::from_u128(0x5e50_0000_0000_4000_8000_0000_0000_0000 + (i % 100) as u128);
        let ts = chrono::DateTime::from_timestamp(1_356_998_400 + (i / 100) as i64, 0)
            .expect("in range");
        let value = 20.0 + ((i * 7919) % 10_000) as f64 / 1000.0;
        out.push_str(&format!(
            "{};{sensor};{value}\n",
            ts.format("%Y-%m-%dT%H:%M:%SZ")
        ));
    }
    out
}

struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_workers(worker: &PathBuf, vars: &[(String, String)], n: usize) -> Result<Workers> {
    let mut children = Vec::new();
    for _ in 0..n {
        let port = testbed::free_port()?;
        children.push(
            Command::new(worker)
                .arg("run")
                .env_clear()
                .envs(vars.iter().map(|(k, v)| (k, v)))
                .env("METRICS_ADDR", format!("127.0.0.1:{port}"))
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a worker")?,
        );
    }
    Ok(Workers(children))
}

async fn done_count(db: &tokio_postgres::Client) -> Result<i64> {
    Ok(db
        .query_one(
            "SELECT count(*) FROM ingest_ledger WHERE status = 'done'",
            &[],
        )
        .await?
        .get(0))
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = args()?;
    let worker = std::fs::canonicalize(&a.worker).with_context(|| {
        format!(
            "{} not found: cargo build --release -p sensors-worker",
            a.worker.display()
        )
    })?;

    // 1. Latency of one small upload with idle workers.
    let env = testbed::TestEnv::with_events().await?;
    sensor_pipeline::store::migrate::migrate(&env.database_settings()).await?;
    let db = testbed::connect(&env.mapping_db).await?;
    let vars = env.vars();
    let workers = spawn_workers(&worker, &vars, 2)?;
    // Warm-up: the first object also waits for the workers to start.
    env.s3
        .put("timeseries/latency/warmup.csv", csv(0, 1000))
        .await?;
    while done_count(&db).await? < 1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut latencies = Vec::new();
    for i in 0..a.uploads {
        let body = csv((i + 1) * 1000, 1000);
        let started = Instant::now();
        env.s3
            .put(&format!("timeseries/latency/{i:04}.csv"), body)
            .await?;
        while done_count(&db).await? < (i + 2) as i64 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(started.elapsed());
        // Idle workers between uploads.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(workers);
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "upload -> queryable, 1,000 rows, two idle workers ({} uploads): p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms",
        a.uploads,
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() * 95 / 100]),
        ms(latencies[latencies.len() - 1])
    );

    // 2. Throughput: two worker processes vs `ingest --all`, same files, each on a fresh
    // database, alternating which goes first, median of `RUNS`.
    const RUNS: usize = 3;
    let env = testbed::TestEnv::with_events().await?;
    env.s3.mute(true)?;
    let mut keys = Vec::new();
    for f in 0..a.files {
        let key = format!("timeseries/bench/part-{f:04}.csv");
        env.s3
            .put(&key, csv(f * a.rows_per_file, a.rows_per_file))
            .await?;
        keys.push(key);
    }
    // Let the uploaded files reach the disk before anything is timed.
    Command::new("sync").status()?;
    let total = a.files * a.rows_per_file;
    let events_settings = env.events.clone().expect("events");
    let queue = Queue::connect(&events_settings, "bench").await?;
    let pg = testbed::postgres()?;
    let vars_for = |db: &str| {
        let mut vars = env.vars();
        for (k, v) in vars.iter_mut() {
            if k == "DATABASE_URL" || k == "TIMESCALE_DATABASE_URL" {
                *v = db.to_string();
            }
        }
        vars
    };
    let (mut event_times, mut direct_times) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        for events_first in [run % 2 == 0, run % 2 != 0] {
            let db = pg.create_database().await?;
            let vars = vars_for(&db);
            let migrate = Command::new(&worker)
                .arg("migrate")
                .env_clear()
                .envs(vars.iter().map(|(k, v)| (k, v)))
                .output()?;
            if !migrate.status.success() {
                bail!(
                    "migrate failed: {}",
                    String::from_utf8_lossy(&migrate.stderr)
                );
            }
            if events_first {
                let client = testbed::connect(&db).await?;
                let mut event_vars = vars.clone();
                if let Some(c) = &a.worker_concurrency {
                    event_vars.push(("WORKER_CONCURRENCY".into(), c.clone()));
                }
                let workers = spawn_workers(&worker, &event_vars, 2)?;
                let started = Instant::now();
                for key in &keys {
                    let sensor_pipeline::object_store::ObjectHead { etag, size, .. } =
                        env.s3.store().head(key).await?;
                    let event = sensor_pipeline::events::object_created(
                        "s3:ObjectCreated:Put",
                        &env.s3.bucket,
                        key,
                        &etag,
                        size,
                    );
                    queue.publish_event(event, None).await?;
                }
                while done_count(&client).await? < a.files as i64 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                event_times.push(started.elapsed());
                drop(workers);
            } else {
                let started = Instant::now();
                let out = Command::new(&worker)
                    .args(["ingest", "--all"])
                    .env_clear()
                    .envs(vars.iter().map(|(k, v)| (k, v)))
                    .output()?;
                direct_times.push(started.elapsed());
                if !out.status.success() {
                    bail!(
                        "ingest --all failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        eprintln!(
            "run {}: two worker processes {:.2} s, ingest --all {:.2} s",
            run + 1,
            event_times[run].as_secs_f64(),
            direct_times[run].as_secs_f64()
        );
    }
    event_times.sort();
    direct_times.sort();
    let (events, direct) = (event_times[RUNS / 2], direct_times[RUNS / 2]);
    println!(
        "{total} rows in {} files: two worker processes {:.2} s ({:.0} rows/s); ingest --all {:.2} s ({:.0} rows/s)",
        a.files,
        events.as_secs_f64(),
        total as f64 / events.as_secs_f64(),
        direct.as_secs_f64(),
        total as f64 / direct.as_secs_f64()
    );
    Ok(())
}
