//! Benchmark (not a test): `query-cli` against 10 million stored readings.
//!
//! ```text
//! cargo build --release -p query-cli -p testbed
//! target/release/bench-query [--sensors 10] [--readings-per-sensor 1000000] [--query-cli target/release/query-cli]
//! ```
//!
//! Measures, as a user sees it (median of `--runs`): a page of 100 at page 1 and at page 10,000,
//! with the process start (`query-cli --version`) reported apart so it can be subtracted, and the
//! same pages through a PgBouncer in session mode when `pgbouncer` is on PATH (a warm backend
//! instead of a freshly forked one: most of a one-shot client's milliseconds); and the
//! full-range CSV stream of one sensor to /dev/null in rows/s, against `psql \copy (…) TO` of the
//! same rows; and downsampled reads of a sensor
//! with 5-minute readings over ten years (`--every 1h` over a year, `--every 1d` over the ten),
//! next to the same aggregates by a plain SQL over its rows.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

/// Readings of the sensor `decade`: every 5 minutes for ten years, besides the others.
const DECADE: i64 = 10 * 365 * 288 + 2 * 288;

#[derive(clap::Parser)]
#[command(about = "query-cli as a user sees it: pages, a whole range, memory")]
struct Args {
    /// Sensors to store.
    #[arg(long, default_value_t = 10)]
    sensors: i64,
    /// Readings per sensor.
    #[arg(long = "readings-per-sensor", default_value_t = 1_000_000)]
    per_sensor: i64,
    /// The query-cli binary to time.
    #[arg(long, default_value = "target/release/query-cli")]
    query_cli: PathBuf,
    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// After measuring, print the environment and keep the databases until stdin closes, to
    /// run `query-cli` against them by hand.
    #[arg(long)]
    hold: bool,
}

/// Runs the CLI `runs` times with stdout to /dev/null; the median wall time.
async fn time(
    cli: &PathBuf,
    vars: &[(String, String)],
    args: &[&str],
    runs: usize,
) -> Result<Duration> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let status = tokio::process::Command::new(cli)
            .args(args)
            .env_clear()
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .status()
            .await?;
        times.push(started.elapsed());
        ensure!(status.success(), "query-cli {args:?} failed: {status}");
    }
    Ok(testbed::bench::median(&times))
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = <Args as clap::Parser>::parse();
    let cli = testbed::bench::binary(&a.query_cli, "query-cli")?;
    let env = testbed::TestEnv::new().await?;
    sensor_pipeline::store::migrate::migrate(&env.database_settings()).await?;
    let db = testbed::connect(&env.measurements_db).await?;
    let total = a.sensors * a.per_sensor + DECADE;
    eprintln!(
        "storing {total} readings ({} sensors × {})",
        a.sensors, a.per_sensor
    );
    let started = Instant::now();
    db.batch_execute(&format!(
        "INSERT INTO sensors SELECT ('5e500000-0000-4000-8000-' || lpad(s::text, 12, '0'))::uuid, \
                'sensor_' || lpad(s::text, 5, '0') FROM generate_series(1, {s}) s;
         INSERT INTO measurements \
         SELECT ('5e500000-0000-4000-8000-' || lpad(s::text, 12, '0'))::uuid, \
                timestamptz '2013-01-01T00:00:00Z' + make_interval(mins => i::int), \
                20 + (i % 1000) / 100.0 \
         FROM generate_series(1, {s}) s, generate_series(0, {n} - 1) i;
         INSERT INTO sensors VALUES ('5e500000-0000-4000-8000-decade000000', 'decade');
         INSERT INTO measurements \
         SELECT '5e500000-0000-4000-8000-decade000000', \
                timestamptz '2013-01-01T00:00:00Z' + make_interval(mins => 5 * i::int), \
                20 + 5 * sin(i / 288.0 * 2 * pi()) + (i * 7919 % 1000) / 1000.0 \
         FROM generate_series(0::bigint, {decade} - 1) i",
        s = a.sensors,
        n = a.per_sensor,
        decade = DECADE,
    ))
    .await?;
    // Rows written directly, not by ingestion: the page index and rollup from them.
    testbed::derive_from_rows(&db).await?;
    // Statistics, as autovacuum would gather on a live database (VACUUM cannot run inside a
    // multi-statement batch).
    db.batch_execute("VACUUM ANALYZE measurements").await?;
    db.batch_execute("VACUUM ANALYZE measurement_days").await?;
    db.batch_execute("VACUUM ANALYZE measurement_hours").await?;
    eprintln!("stored in {:.1} s", started.elapsed().as_secs_f64());

    let vars = env.vars();
    let start = "2013-01-01";
    let end = "2100-01-01";
    let base = testbed::data::readings_args("sensor_00003", start, end, &[]);
    let page = |n: &'static str| {
        let mut v = base.to_vec();
        v.extend(["--page-number", n, "--page-size", "100"]);
        v
    };
    let startup = time(&cli, &vars, &["--version"], a.runs).await?;
    let page1 = time(&cli, &vars, &page("1"), a.runs).await?;
    let page10k = time(&cli, &vars, &page("10000"), a.runs).await?;
    // The same pages through a pooler, when PgBouncer is installed: a warm backend instead of a
    // forked one (its first client forks it, so one page is read before timing).
    let pooled = match testbed::owned_pgbouncer(&env.measurements_db).await? {
        Some((server, url)) => {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| match k.as_str() {
                    "DATABASE_URL" | "TIMESCALE_DATABASE_URL" => (k.clone(), url.clone()),
                    _ => (k.clone(), v.clone()),
                })
                .collect();
            time(&cli, &vars, &page("1"), 1).await?;
            let page1 = time(&cli, &vars, &page("1"), a.runs).await?;
            let page10k = time(&cli, &vars, &page("10000"), a.runs).await?;
            drop(server);
            Some((page1, page10k))
        }
        None => None,
    };
    let full = time(&cli, &vars, &base, 3).await?;
    // The baseline: psql's own `\copy (…) TO` of the same range, process start included.
    let psql_full = {
        let copy = format!(
            "\\copy (SELECT ts, value FROM measurements \
             WHERE sensor_uuid = '5e500000-0000-4000-8000-000000000003' \
             AND ts >= '{start}T00:00:00Z' AND ts <= '{end}T00:00:00Z' ORDER BY ts) \
             TO '/dev/null' WITH (FORMAT csv, HEADER)"
        );
        let mut times = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            let out = tokio::process::Command::new("psql")
                .args([
                    env.measurements_db.as_str(),
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                ])
                .arg(&copy)
                .output()
                .await?;
            times.push(started.elapsed());
            ensure!(
                out.status.success(),
                "psql failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        testbed::bench::median(&times)
    };
    let bucketed = |every: &'static str, end: &'static str| {
        testbed::data::readings_args("decade", "2013-01-01", end, &["--every", every])
    };
    let hourly = time(&cli, &vars, &bucketed("1h", "2013-12-31T23:59:59"), a.runs).await?;
    let daily = time(&cli, &vars, &bucketed("1d", "2022-12-31T23:59:59"), a.runs).await?;
    let by_sql = |bucket: &'static str, end: &'static str| {
        format!(
            "SELECT date_trunc('{bucket}', ts, 'UTC') AS b, count(*), avg(value), min(value),
                    max(value), (array_agg(value ORDER BY ts))[1],
                    (array_agg(value ORDER BY ts DESC))[1]
             FROM measurements
             WHERE sensor_uuid = '5e500000-0000-4000-8000-decade000000'
                 AND ts >= '2013-01-01Z' AND ts <= '{end}Z'
             GROUP BY 1 ORDER BY 1"
        )
    };
    let hourly_sql = sql_time(&db, &by_sql("hour", "2013-12-31T23:59:59"), a.runs).await?;
    let daily_sql = sql_time(&db, &by_sql("day", "2022-12-31T23:59:59"), a.runs).await?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("readings stored:           {total}");
    println!("process start (--version): {:.1} ms", ms(startup));
    println!(
        "page 1 of 100:             {:.1} ms end to end ({:.1} ms without process start)",
        ms(page1),
        ms(page1 - startup)
    );
    println!(
        "page 10,000 of 100:        {:.1} ms end to end ({:.1} ms without process start)",
        ms(page10k),
        ms(page10k - startup)
    );
    match pooled {
        Some((page1, page10k)) => println!(
            "through PgBouncer (session mode, warm backends): page 1 {:.1} ms, page 10,000 \
             {:.1} ms end to end",
            ms(page1),
            ms(page10k)
        ),
        None => println!("through PgBouncer: not measured (pgbouncer is not on PATH)"),
    }
    println!(
        "full range, one sensor:    {} rows in {:.2} s = {:.0} rows/s (CSV to /dev/null); \
         psql \\copy (…) TO {:.2} s: {:.2}×",
        a.per_sensor,
        full.as_secs_f64(),
        a.per_sensor as f64 / full.as_secs_f64(),
        psql_full.as_secs_f64(),
        full.as_secs_f64() / psql_full.as_secs_f64()
    );
    println!(
        "--every 1h, a year of 5-minute readings (105,120): {:.1} ms end to end \
         ({:.1} ms without process start); plain SQL over the rows: {:.1} ms",
        ms(hourly),
        ms(hourly - startup),
        ms(hourly_sql)
    );
    println!(
        "--every 1d, ten years of 5-minute readings ({DECADE}): {:.1} ms end to end \
         ({:.1} ms without process start); plain SQL over the rows: {:.1} ms",
        ms(daily),
        ms(daily - startup),
        ms(daily_sql)
    );
    if a.hold {
        for (name, value) in &vars {
            println!("export {name}='{value}'");
        }
        let mut line = String::new();
        while std::io::stdin().read_line(&mut line)? > 0 {}
    }
    Ok(())
}

/// Runs `sql` `runs` times on `db` (rows fetched); the median wall time.
async fn sql_time(db: &tokio_postgres::Client, sql: &str, runs: usize) -> Result<Duration> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        db.query(sql, &[]).await?;
        times.push(started.elapsed());
    }
    Ok(testbed::bench::median(&times))
}
