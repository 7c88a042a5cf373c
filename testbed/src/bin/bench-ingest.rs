//! Benchmark (not a test): end-to-end `sensors-worker ingest --all` against `psql \copy` of the
//! same rows into a table with the same primary key, side by side on the same PostgreSQL.
//!
//! ```text
//! cargo build --release -p sensors-worker -p testbed
//! target/release/bench-ingest [--files 24] [--rows-per-file 100000] [--worker target/release/sensors-worker]
//!     [--sensors 100] [--interval 1] [--naive-share 0] [--shapes 100x1,20x60,200x420,200x12000]
//!     [--timescaledb] [--conflict]
//! ```
//!
//! The rows are clean (the baseline cannot validate anything), spread over `--sensors` sensors
//! each reading every `--interval` seconds, so every (sensor, timestamp) is unique: the fleet's
//! shape (`--sensors 20 --interval 60`: 83 days; `--sensors 200 --interval 12000`: 4.5 years;
//! `--shapes` runs several and prints the worst ratio over them last); in UTC, except the share
//! `--naive-share` written without an offset in Berlin time, which the worker converts
//! (`NAIVE_TIMEZONE`'s default) and `psql` reads with `PGTZ=Europe/Berlin`.
//!
//! `WORKER_CONCURRENCY` and `ANOMALY_DETECTION` (`on`, the default, or `off`) are passed on to
//! the worker: run it once with each to see what detection costs.
//!
//! `--conflict` adds the full-conflict case: after the files are ingested (untimed), a newer
//! version of every file — same rows, every value changed, under its own key — is ingested and
//! timed: every row conflicts with a stored one and takes it over. Its ratio is against the same
//! `psql \copy` baseline.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

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
    /// Also time a re-upload with every value changed (every row conflicts).
    #[arg(long)]
    conflict: bool,
    /// Sensors the readings are spread over.
    #[arg(long, default_value_t = 100)]
    sensors: usize,
    /// Share of the rows with naive timestamps (Berlin time, no offset), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    naive_share: f64,
    /// Seconds between two readings of one sensor: 1 puts 2.4 M readings of 100 sensors into
    /// seven hours; 60 with 20 sensors spans 83 days, 12,000 with 200 sensors 4.5 years.
    #[arg(long, default_value_t = 1)]
    interval: i64,
    /// On TimescaleDB (built and installed on this machine): the server preloads it, the
    /// pipeline's `measurements` is the hypertable its migrations make, and the baseline a
    /// hypertable of the same chunking (7 days).
    #[arg(long)]
    timescaledb: bool,
    /// Several shapes in one run, each `SENSORSxINTERVAL` (e.g. `100x1,20x60,200x420,200x12000`),
    /// instead of `--sensors`/`--interval`; the worst ratio over them is printed last.
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<Shape>,
}

/// A digest of every (sensor, instant, value) of `table`, in key order.
async fn fingerprint(client: &tokio_postgres::Client, table: &str) -> Result<String> {
    let sql = format!(
        "SELECT md5(string_agg(sensor_uuid::text || ' ' || extract(epoch FROM ts)::text || ' ' \
         || value::text, ',' ORDER BY sensor_uuid, ts)) FROM {table}"
    );
    Ok(client.query_one(&sql, &[]).await?.get(0))
}

/// The same readings with every value raised by 1000 (a correction of the whole file).
fn changed(csv: &str) -> String {
    let mut out = String::with_capacity(csv.len() + csv.len() / 8);
    let mut lines = csv.lines();
    if let Some(header) = lines.next() {
        out.push_str(header);
        out.push('\n');
    }
    for line in lines {
        let (rest, value) = line.rsplit_once(';').expect("three fields");
        let value: f64 = value.parse().expect("a number");
        out.push_str(rest);
        out.push(';');
        out.push_str(&(value + 1000.0).to_string());
        out.push('\n');
    }
    out
}

/// A fleet shape: sensors, and seconds between two readings of one sensor.
#[derive(Debug, Clone, Copy)]
struct Shape {
    sensors: usize,
    interval: i64,
}

impl std::str::FromStr for Shape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (sensors, interval) = s
            .split_once('x')
            .ok_or_else(|| format!("{s:?}: expected SENSORSxINTERVAL, e.g. 200x12000"))?;
        let sensors = sensors
            .parse()
            .map_err(|e| format!("{s:?}: sensors: {e}"))?;
        let interval = interval
            .parse()
            .map_err(|e| format!("{s:?}: interval: {e}"))?;
        if sensors == 0 || interval <= 0 {
            return Err(format!("{s:?}: sensors and interval must be positive"));
        }
        Ok(Self { sensors, interval })
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = <Args as clap::Parser>::parse();
    if a.timescaledb {
        // Read by the testbed when it starts its server, below, before any other thread.
        std::env::set_var("TESTBED_PRELOAD", "timescaledb");
    }
    let worker = testbed::bench::binary(&a.worker, "sensors-worker")?;
    let shapes = if a.shapes.is_empty() {
        vec![Shape {
            sensors: a.sensors,
            interval: a.interval,
        }]
    } else {
        a.shapes.clone()
    };
    let mut ratios = Vec::new();
    for shape in &shapes {
        ratios.push((measure(&a, &worker, *shape).await?, *shape));
    }
    if let Some((worst, shape)) = ratios
        .iter()
        .copied()
        .max_by(|x, y| x.0.total_cmp(&y.0))
        .filter(|_| ratios.len() > 1)
    {
        let best = ratios.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
        println!(
            "worst ratio over {} shapes: {worst:.2} ({} sensors every {} s); best {best:.2}",
            ratios.len(),
            shape.sensors,
            shape.interval
        );
    }
    Ok(())
}

/// One shape, both sides, `--runs` times: prints the medians; returns ingest's ratio to
/// `psql \copy`.
async fn measure(a: &Args, worker: &std::path::Path, shape: Shape) -> Result<f64> {
    let Shape { sensors, interval } = shape;
    let env = testbed::TestEnv::new().await?;
    let dir = tempfile::tempdir()?;
    let baseline_file = dir.path().join("all.csv");
    let mut all = String::new();
    eprintln!(
        "generating and uploading {} files × {} rows",
        a.files, a.rows_per_file
    );
    let (mut keys, mut conflict_keys) = (Vec::new(), Vec::new());
    // Written later than the originals whatever the clock does while uploading.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
    for f in 0..a.files {
        let csv = testbed::bench::fleet_readings_every(
            f * a.rows_per_file,
            a.rows_per_file,
            sensors,
            interval,
            a.naive_share,
        );
        let key = format!("timeseries/bench/part-{f:04}.csv");
        env.s3.put(&key, csv.clone()).await?;
        keys.push(key);
        if a.conflict {
            let key = format!("timeseries/bench-correction/part-{f:04}.csv");
            env.s3.put(&key, changed(&csv)).await?;
            env.s3.set_written_at(&key, later)?;
            conflict_keys.push(key);
        }
        all.push_str(csv.split_once('\n').map_or("", |(_, rows)| rows));
    }
    std::fs::write(&baseline_file, &all)?;
    let total_rows = a.files * a.rows_per_file;
    drop(all);

    let pg = testbed::postgres().await?;
    let admin = testbed::connect(pg.admin_url()).await?;
    let mut copy_times = Vec::new();
    let mut ingest_times = Vec::new();
    let mut conflict_times = Vec::new();
    for run in 0..a.runs {
        // Baseline: psql \copy into a fresh table with the same primary key.
        let db = pg.create_database().await?;
        let baseline_db = db.clone();
        let client = testbed::connect(&db).await?;
        client
            .batch_execute(
                "CREATE TABLE baseline (sensor_uuid uuid NOT NULL, ts timestamptz NOT NULL, \
                 value double precision NOT NULL, PRIMARY KEY (sensor_uuid, ts))",
            )
            .await?;
        if a.timescaledb {
            client
                .batch_execute(
                    "CREATE EXTENSION IF NOT EXISTS timescaledb;
                     SELECT create_hypertable('baseline', 'ts',
                                              chunk_time_interval => INTERVAL '7 days')",
                )
                .await?;
        }
        admin.batch_execute("CHECKPOINT").await?;
        let t = Instant::now();
        let out = std::process::Command::new("psql")
            .arg(&db)
            // Naive timestamps are Berlin time, as the worker's default NAIVE_TIMEZONE reads them.
            .env("PGTZ", "Europe/Berlin")
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
        let baseline = fingerprint(&client, "baseline").await?;

        // The pipeline: migrate a fresh database, then `ingest --all` end to end.
        let db = pg.create_database().await?;
        let mut vars = testbed::bench::with_database(&env.vars(), &db);
        for name in ["WORKER_CONCURRENCY", "ANOMALY_DETECTION"] {
            if let Ok(v) = std::env::var(name) {
                vars.push((name.into(), v));
            }
        }
        let run_worker = |args: &[&str]| {
            std::process::Command::new(worker)
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
        if a.timescaledb {
            // As `migrate` reports it.
            let report = String::from_utf8_lossy(&out.stdout);
            ensure!(
                report.contains("measurements is a TimescaleDB hypertable"),
                "the migrations did not make measurements a hypertable: {report}"
            );
        }
        admin.batch_execute("CHECKPOINT").await?;
        // `--all`, unless the corrections are in the bucket too: then the originals by name.
        let mut ingest_args = vec!["ingest"];
        if a.conflict {
            ingest_args.extend(keys.iter().map(String::as_str));
        } else {
            ingest_args.push("--all");
        }
        let t = Instant::now();
        let out = run_worker(&ingest_args)?;
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
        // The same readings, at the same instants, as the baseline stored.
        assert_eq!(fingerprint(&client, "measurements").await?, baseline);
        if a.conflict {
            admin.batch_execute("CHECKPOINT").await?;
            let mut args = vec!["ingest"];
            args.extend(conflict_keys.iter().map(String::as_str));
            let t = Instant::now();
            let out = run_worker(&args)?;
            let took = t.elapsed();
            if !out.status.success() {
                bail!(
                    "ingest of the changed versions failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let changed: i64 = client
                .query_one("SELECT count(*) FROM measurements WHERE value >= 1000", &[])
                .await?
                .get(0);
            assert_eq!(changed as usize, total_rows, "every row taken over");
            eprintln!(
                "run {}: every row conflicting: ingest {:.2} s ({:.2}× psql \\copy)",
                run + 1,
                took.as_secs_f64(),
                took.as_secs_f64() / copy.as_secs_f64()
            );
            conflict_times.push(took);
        }
        eprintln!(
            "run {}: psql \\copy {:.2} s, ingest --all {:.2} s ({:.2}×)",
            run + 1,
            copy.as_secs_f64(),
            ingest.as_secs_f64(),
            ingest.as_secs_f64() / copy.as_secs_f64()
        );
        copy_times.push(copy);
        ingest_times.push(ingest);
        // Gigabytes a run: not left on a server that outlives the benchmark (TEST_DATABASE_URL).
        drop(client);
        for url in [&baseline_db, &db] {
            let config: tokio_postgres::Config = url.parse()?;
            let name = config
                .get_dbname()
                .context("a database URL names its database")?;
            admin
                .batch_execute(&format!("DROP DATABASE \"{name}\" WITH (FORCE)"))
                .await?;
        }
    }
    let median = testbed::bench::median;
    let (copy, ingest) = (median(&copy_times), median(&ingest_times));
    println!(
        "shape: {} sensors, one reading every {} s each ({:.1} days in all)",
        sensors,
        interval,
        (total_rows / sensors.max(1)) as f64 * interval as f64 / 86_400.0
    );
    println!(
        "{total_rows} rows in {} files: psql \\copy {:.2} s ({:.0} rows/s); ingest --all {:.2} s ({:.0} rows/s); ratio {:.2}",
        a.files,
        copy.as_secs_f64(),
        total_rows as f64 / copy.as_secs_f64(),
        ingest.as_secs_f64(),
        total_rows as f64 / ingest.as_secs_f64(),
        ingest.as_secs_f64() / copy.as_secs_f64()
    );
    if a.conflict {
        let took = median(&conflict_times);
        println!(
            "every row conflicting (a newer version of every file, all values changed): {:.2} s ({:.0} rows/s); ratio {:.2}",
            took.as_secs_f64(),
            total_rows as f64 / took.as_secs_f64(),
            took.as_secs_f64() / copy.as_secs_f64()
        );
    }
    Ok(ingest.as_secs_f64() / copy.as_secs_f64())
}
