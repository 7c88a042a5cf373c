//! Benchmark (not a test): end-to-end `sensors-worker ingest --all` against `psql \copy` of the
//! same rows into a table with the same primary key, side by side on the same PostgreSQL.
//!
//! ```text
//! cargo build --release -p sensors-worker -p testbed
//! target/release/bench-ingest [--files 24] [--rows-per-file 100000] [--worker target/release/sensors-worker]
//! ```
//!
//! The rows are clean and in UTC (the baseline cannot validate or convert anything), spread over
//! 100 sensors at one-second steps, so every (sensor, timestamp) is unique.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

#[derive(clap::Parser)]
#[command(about = "ingest --all against psql \\copy of the same rows, side by side")]
struct Args {
    /// Objects to ingest.
    #[arg(long, default_value_t = 24)]
    files: usize,
    /// Readings per object.
    #[arg(long, default_value_t = 100_000)]
    rows_per_file: usize,
    /// The sensors-worker binary to time.
    #[arg(long, default_value = "target/release/sensors-worker")]
    worker: PathBuf,
    /// Runs of each side; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = <Args as clap::Parser>::parse();
    let worker = testbed::bench::binary(&a.worker, "sensors-worker")?;
    let env = testbed::TestEnv::new().await?;
    let dir = tempfile::tempdir()?;
    let baseline_file = dir.path().join("all.csv");
    let mut all = String::new();
    eprintln!(
        "generating and uploading {} files × {} rows",
        a.files, a.rows_per_file
    );
    for f in 0..a.files {
        let csv = testbed::bench::fleet_readings(f * a.rows_per_file, a.rows_per_file);
        env.s3
            .put(&format!("timeseries/bench/part-{f:04}.csv"), csv.clone())
            .await?;
        all.push_str(csv.split_once('\n').map_or("", |(_, rows)| rows));
    }
    std::fs::write(&baseline_file, &all)?;
    let total_rows = a.files * a.rows_per_file;
    drop(all);

    let pg = testbed::postgres().await?;
    let admin = testbed::connect(pg.admin_url()).await?;
    let mut copy_times = Vec::new();
    let mut ingest_times = Vec::new();
    for run in 0..a.runs {
        // Baseline: psql \copy into a fresh table with the same primary key.
        let db = pg.create_database().await?;
        let client = testbed::connect(&db).await?;
        client
            .batch_execute(
                "CREATE TABLE baseline (sensor_uuid uuid NOT NULL, ts timestamptz NOT NULL, \
                 value double precision NOT NULL, PRIMARY KEY (sensor_uuid, ts))",
            )
            .await?;
        admin.batch_execute("CHECKPOINT").await?;
        let t = Instant::now();
        let out = std::process::Command::new("psql")
            .arg(&db)
            .args(["-v", "ON_ERROR_STOP=1", "-c"])
            .arg(format!(
                "\\copy baseline (ts, sensor_uuid, value) FROM '{}' WITH (FORMAT csv, DELIMITER ';')",
                baseline_file.display()
            ))
            .output()
            .context("running psql")?;
        let copy = t.elapsed();
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let n: i64 = client
            .query_one("SELECT count(*) FROM baseline", &[])
            .await?
            .get(0);
        assert_eq!(n as usize, total_rows);

        // The pipeline: migrate a fresh database, then `ingest --all` end to end.
        let db = pg.create_database().await?;
        let mut vars = testbed::bench::with_database(&env.vars(), &db);
        if let Ok(c) = std::env::var("WORKER_CONCURRENCY") {
            vars.push(("WORKER_CONCURRENCY".into(), c));
        }
        let run_worker = |args: &[&str]| {
            std::process::Command::new(&worker)
                .args(args)
                .env_clear()
                .envs(vars.iter().map(|(k, v)| (k, v)))
                .current_dir(dir.path())
                .output()
        };
        let out = run_worker(&["migrate"])?;
        if !out.status.success() {
            bail!("migrate failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        admin.batch_execute("CHECKPOINT").await?;
        let t = Instant::now();
        let out = run_worker(&["ingest", "--all"])?;
        let ingest = t.elapsed();
        if !out.status.success() {
            bail!(
                "ingest failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let client = testbed::connect(&db).await?;
        let n: i64 = client
            .query_one("SELECT count(*) FROM measurements", &[])
            .await?
            .get(0);
        assert_eq!(n as usize, total_rows);
        eprintln!(
            "run {}: psql \\copy {:.2} s, ingest --all {:.2} s ({:.2}×)",
            run + 1,
            copy.as_secs_f64(),
            ingest.as_secs_f64(),
            ingest.as_secs_f64() / copy.as_secs_f64()
        );
        copy_times.push(copy);
        ingest_times.push(ingest);
    }
    let median = testbed::bench::median;
    let (copy, ingest) = (median(&copy_times), median(&ingest_times));
    println!(
        "{total_rows} rows in {} files: psql \\copy {:.2} s ({:.0} rows/s); ingest --all {:.2} s ({:.0} rows/s); ratio {:.2}",
        a.files,
        copy.as_secs_f64(),
        total_rows as f64 / copy.as_secs_f64(),
        ingest.as_secs_f64(),
        total_rows as f64 / ingest.as_secs_f64(),
        ingest.as_secs_f64() / copy.as_secs_f64()
    );
    Ok(())
}
