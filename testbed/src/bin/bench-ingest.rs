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

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

struct Args {
    files: usize,
    rows_per_file: usize,
    worker: PathBuf,
    runs: usize,
}

fn args() -> Result<Args> {
    let mut a = Args {
        files: 24,
        rows_per_file: 100_000,
        worker: PathBuf::from("target/release/sensors-worker"),
        runs: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--files" => a.files = value.parse()?,
            "--rows-per-file" => a.rows_per_file = value.parse()?,
            "--worker" => a.worker = value.into(),
            "--runs" => a.runs = value.parse()?,
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(a)
}

/// Deterministic readings: file `f`, row `r`.
fn file_csv(f: usize, rows: usize, sensors: &[uuid::Uuid]) -> String {
    let base = 1_356_998_400i64; // 2013-01-01T00:00:00Z
    let mut out = String::with_capacity(rows * 70);
    out.push_str("timestamp;sensor_uuid;sensor_value\n");
    for r in 0..rows {
        let i = f * rows + r;
        let sensor = &sensors[i % sensors.len()];
        let t = base + (i / sensors.len()) as i64;
        let ts = chrono::DateTime::from_timestamp(t, 0).expect("in range");
        let value = 20.0 + ((i * 7919) % 10_000) as f64 / 1000.0;
        let _ = writeln!(out, "{};{sensor};{value}", ts.format("%Y-%m-%dT%H:%M:%SZ"));
    }
    out
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
    let sensors: Vec<uuid::Uuid> = (0..100u128)
        .map(|i| uuid::Uuid::from_u128(0x5e50_0000_0000_4000_8000_0000_0000_0000 + i))
        .collect();
    let env = testbed::TestEnv::new().await?;
    let dir = tempfile::tempdir()?;
    let baseline_file = dir.path().join("all.csv");
    let mut all = String::new();
    eprintln!(
        "generating and uploading {} files × {} rows",
        a.files, a.rows_per_file
    );
    for f in 0..a.files {
        let csv = file_csv(f, a.rows_per_file, &sensors);
        env.s3
            .put(&format!("timeseries/bench/part-{f:04}.csv"), csv.clone())
            .await?;
        all.push_str(csv.split_once('\n').map_or("", |(_, rows)| rows));
    }
    std::fs::write(&baseline_file, &all)?;
    let total_rows = a.files * a.rows_per_file;
    drop(all);

    let pg = testbed::postgres()?;
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
        let mut vars = env.vars();
        for (k, v) in vars.iter_mut() {
            if k == "DATABASE_URL" || k == "TIMESCALE_DATABASE_URL" {
                *v = db.clone();
            }
        }
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
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (copy, ingest) = (median(&mut copy_times), median(&mut ingest_times));
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
