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
//!    processes, against `sensors-worker ingest --all` of the same files into a fresh database;
//!    objects/s, rows/s and the workers' peak RSS.
//!
//! Small objects (a fleet writing one file per device every few minutes), throughput only:
//!
//! ```text
//! target/release/bench-events --uploads 0 --files 20000 --rows-per-file 100 --per-device
//! ```
//!
//! (`--per-device`: each file holds one sensor's readings, as a device writes them; without it
//! every file spreads its rows over 100 sensors.)

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sensor_pipeline::queue::Queue;

#[derive(clap::Parser)]
#[command(about = "The event-driven path with real worker processes: latency and throughput")]
struct Args {
    /// Small uploads timed for the latency figures (0: skip the latency part).
    #[arg(long, default_value_t = 30)]
    uploads: usize,
    /// Objects of the throughput run.
    #[arg(long, default_value_t = 24)]
    files: usize,
    /// Readings per object of the throughput run.
    #[arg(long, default_value_t = 100_000)]
    rows_per_file: usize,
    /// One sensor per file (a device's upload) instead of 100 sensors per file.
    #[arg(long)]
    per_device: bool,
    /// Throughput runs (each mode once per run; the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The sensors-worker binary to time.
    #[arg(long, default_value = "target/release/sensors-worker")]
    worker: PathBuf,
    /// WORKER_CONCURRENCY of each event worker (default: the worker's own, the CPU count).
    #[arg(long)]
    worker_concurrency: Option<String>,
}

fn csv(offset: usize, rows: usize) -> String {
    testbed::bench::fleet_readings(offset, rows)
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

/// The peak resident set size of a running process, from `/proc` (Linux).
fn peak_rss_mib(child: &Child) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
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
    let a = <Args as clap::Parser>::parse();
    let worker = testbed::bench::binary(&a.worker, "sensors-worker")?;

    if a.uploads > 0 {
        latency(&worker, a.uploads).await?;
    }
    throughput(&worker, &a).await
}

/// Part 1, latency of one small upload with idle workers.
async fn latency(worker: &PathBuf, uploads: usize) -> Result<()> {
    let env = testbed::TestEnv::with_events().await?;
    sensor_pipeline::store::migrate::migrate(&env.database_settings()).await?;
    let db = testbed::connect(&env.mapping_db).await?;
    let vars = env.vars();
    let workers = spawn_workers(worker, &vars, 2)?;
    // Warm-up: the first object also waits for the workers to start.
    env.s3
        .put("timeseries/latency/warmup.csv", csv(0, 1000))
        .await?;
    while done_count(&db).await? < 1 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut latencies = Vec::new();
    for i in 0..uploads {
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
        uploads,
        ms(latencies[latencies.len() / 2]),
        ms(latencies[latencies.len() * 95 / 100]),
        ms(latencies[latencies.len() - 1])
    );
    Ok(())
}

/// Part 2, throughput: two worker processes vs `ingest --all`, same files, each on a fresh
/// database, alternating which goes first, median of `--runs`.
async fn throughput(worker: &PathBuf, a: &Args) -> Result<()> {
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    let env = testbed::TestEnv::with_events().await?;
    env.s3.mute(true)?;
    let keys: Vec<String> = (0..a.files)
        .map(|f| format!("timeseries/bench/part-{f:05}.csv"))
        .collect();
    stream::iter(keys.iter().enumerate())
        .map(|(f, key)| {
            let s3 = &env.s3;
            let body = if a.per_device {
                testbed::bench::device_readings(f, a.rows_per_file)
            } else {
                csv(f * a.rows_per_file, a.rows_per_file)
            };
            async move { s3.put(key, body).await }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await?;
    // The events as MinIO would publish them, made before anything is timed.
    let events: Vec<Vec<u8>> = stream::iter(&keys)
        .map(|key| {
            let s3 = &env.s3;
            async move {
                let head = s3.store().head(key).await?;
                anyhow::Ok(sensor_pipeline::events::object_created(
                    "s3:ObjectCreated:Put",
                    &s3.bucket,
                    key,
                    &head.etag,
                    head.size,
                ))
            }
        })
        .buffered(16)
        .try_collect()
        .await?;
    // Let the uploaded files reach the disk before anything is timed.
    Command::new("sync").status()?;
    let total = a.files * a.rows_per_file;
    let events_settings = env.events.clone().expect("events");
    let queue = Queue::connect(&events_settings, "bench").await?;
    let pg = testbed::postgres().await?;
    let vars_for = |db: &str| testbed::bench::with_database(&env.vars(), db);
    let (mut event_times, mut direct_times) = (Vec::new(), Vec::new());
    let mut peak_rss: f64 = 0.0;
    for run in 0..a.runs {
        for events_first in [run % 2 == 0, run % 2 != 0] {
            let db = pg.create_database().await?;
            let vars = vars_for(&db);
            let migrate = Command::new(worker)
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
                let workers = spawn_workers(worker, &event_vars, 2)?;
                let started = Instant::now();
                stream::iter(&events)
                    .map(|event| queue.publish_event(event.clone(), None))
                    .buffer_unordered(256)
                    .try_collect::<Vec<_>>()
                    .await?;
                // Every 100 ms: each look scans the ledger (5 ms of the server's CPU at 20,000
                // entries), which at 10 ms took a tenth of the machine from the workers timed.
                while done_count(&client).await? < a.files as i64 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                event_times.push(started.elapsed());
                for w in &workers.0 {
                    peak_rss = peak_rss.max(peak_rss_mib(w).unwrap_or(0.0));
                }
                drop(workers);
            } else {
                let started = Instant::now();
                let out = Command::new(worker)
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
    let median = testbed::bench::median;
    let (events, direct) = (median(&event_times), median(&direct_times));
    let line = |name: &str, d: Duration| {
        let secs = d.as_secs_f64();
        format!(
            "{name} {secs:.2} s ({:.0} objects/s, {:.0} rows/s)",
            a.files as f64 / secs,
            total as f64 / secs
        )
    };
    println!(
        "{total} rows in {} files of {} rows: {}; {}; worker peak RSS {peak_rss:.0} MiB",
        a.files,
        a.rows_per_file,
        line("two worker processes", events),
        line("ingest --all", direct),
    );
    Ok(())
}
