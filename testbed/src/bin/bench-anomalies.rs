//! Benchmark (not a test): `query-cli anomalies` and `plot` on labelled and on large data.
//!
//! ```text
//! cargo build --release -p sensors-worker -p query-cli -p testbed
//! target/release/bench-anomalies [--bench ../shared/anomaly-bench] [--skip-speed]
//! target/release/bench-anomalies --loco [--files] [--alarms FILE] [--bench ../shared/anomaly-bench]
//! target/release/bench-anomalies --loco --kinds [--files] [--alarms FILE] [--export DIR]
//! ```
//!
//! `--loco` runs only the discipline against tuning to the bench, in-process (no servers): every
//! setting of the grid below runs over every series; for each category with windows, the setting
//! that scores best on all the *other* series is chosen and the left-out category is scored with
//! it. It prints the four left-out scores, the whole bench tuned on everything, and what the
//! shipped default scores — the five figures a commit that touches detection reports. A change
//! that raises the whole bench while lowering the left-out mean is not kept. `--kinds` runs the
//! same protocol on generated series of kinds of sensor the bench does not hold
//! (`testbed::kinds`): a second yardstick, for what the bench cannot show.
//!
//! 1. Quality: every series of `<bench>/data/` (NAB files, `timestamp,value`, read as UTC) becomes
//!    one sensor named after its file, is uploaded as a CSV object and ingested with
//!    `sensors-worker ingest --all`; `query-cli anomalies --format json` runs per sensor over its
//!    whole range, and the `start`s go to `<bench>/score.py` (NAB's standard profile).
//! 2. Speed: the detector in-process over 10 M synthetic readings (readings/s); then, on readings
//!    stored directly (with the page index and hourly rollup the merge would keep, and the
//!    workers' verdicts from `sensors-worker detect --all`), `query-cli anomalies` over one sensor
//!    with 1 M readings and `plot` of one with 10 M (wall time, median of 3, and peak RSS — flat
//!    in the number of readings); the plot both from the rollup and the stored verdicts, and
//!    running the detector over every reading (another `--sensitivity`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

#[derive(clap::Parser)]
#[command(about = "query-cli anomalies: NAB score, detector speed, CLI wall times")]
struct Args {
    /// The anomaly bench: `data/` (labelled series) and `score.py`.
    #[arg(long, default_value = "../shared/anomaly-bench")]
    bench: PathBuf,
    #[arg(long, default_value = "target/release/sensors-worker")]
    worker: PathBuf,
    #[arg(long, default_value = "target/release/query-cli")]
    query_cli: PathBuf,
    /// Only the quality part.
    #[arg(long)]
    skip_speed: bool,
    /// Only the leave-one-category-out protocol, in-process (see the module doc).
    #[arg(long)]
    loco: bool,
    /// With `--loco`: also each series' windows hit and false alarms at the shipped setting.
    #[arg(long, requires = "loco")]
    files: bool,
    /// With `--loco`: write every series' anomalies at the shipped setting to this JSON file
    /// (`{"category/file.csv": [[start µs, end µs, "kind", score], …]}`), to look at them.
    #[arg(long, requires = "loco", value_name = "FILE")]
    alarms: Option<PathBuf>,
    /// With `--loco`: run it on the generated series of other kinds of sensor
    /// (`testbed::kinds`) instead of the bench.
    #[arg(long, requires = "loco")]
    kinds: bool,
    /// With `--kinds`: also write those series as a bench folder (`data/`, `windows.json`).
    #[arg(long, requires = "kinds", value_name = "DIR")]
    export: Option<PathBuf>,
    /// Also write a PNG per labelled series into this folder (`query-cli plot`).
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
}

/// A stable UUID per series name (FNV-1a, 128 bits).
fn sensor_of(name: &str) -> uuid::Uuid {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in name.bytes() {
        h ^= b as u128;
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    uuid::Builder::from_random_bytes(h.to_le_bytes()).into_uuid()
}

fn series_files(data: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    for dir in std::fs::read_dir(data).with_context(|| format!("reading {}", data.display()))? {
        let dir = dir?.path();
        if !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&dir)? {
            let f = f?.path();
            if f.extension().is_some_and(|e| e == "csv") {
                let name = format!(
                    "{}/{}",
                    dir.file_name().unwrap_or_default().to_string_lossy(),
                    f.file_name().unwrap_or_default().to_string_lossy()
                );
                files.push((name, f));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Runs a binary with `vars` only; its stdout, or the failure with stderr.
fn run(binary: &Path, vars: &[(String, String)], args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(binary)
        .args(args)
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .output()
        .with_context(|| format!("running {}", binary.display()))?;
    if !out.status.success() {
        bail!(
            "{} {args:?} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Wall time and peak RSS (MiB, from `/proc`, polled until exit) of one run.
fn measure(binary: &Path, vars: &[(String, String)], args: &[&str]) -> Result<(Duration, f64)> {
    let started = Instant::now();
    let mut child = std::process::Command::new(binary)
        .args(args)
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .spawn()?;
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0.0f64;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            if let Some(kib) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let took = started.elapsed();
    ensure!(
        status.success(),
        "{} {args:?} failed: {status}",
        binary.display()
    );
    Ok((took, peak_kib / 1024.0))
}

fn median_of(binary: &Path, vars: &[(String, String)], args: &[&str]) -> Result<(Duration, f64)> {
    let mut runs = Vec::new();
    let mut peak = 0.0f64;
    for _ in 0..3 {
        let (t, rss) = measure(binary, vars, args)?;
        runs.push(t);
        peak = peak.max(rss);
    }
    Ok((testbed::bench::median(&runs), peak))
}

/// The settings the protocol chooses among: the detector's one free constant is its threshold,
/// which `--sensitivity` divides (1 is what ships).
const GRID: [f64; 9] = [0.5, 0.6, 0.7, 0.85, 1.0, 1.2, 1.4, 1.7, 2.0];

/// Every series' tally for each setting of the grid (all cores, series split among them).
fn run_grid(series: &[testbed::nab::Series]) -> Vec<Vec<testbed::nab::Tally>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    GRID.iter()
        .map(|&sensitivity| {
            std::thread::scope(|scope| {
                let chunks = series.chunks(series.len().div_ceil(threads).max(1));
                let handles: Vec<_> = chunks
                    .map(|chunk| {
                        scope.spawn(move || {
                            chunk
                                .iter()
                                .map(|s| {
                                    let found = sensor_pipeline::anomaly::detect(
                                        s.readings.iter().copied(),
                                        sensitivity,
                                    );
                                    let alarms: Vec<i64> = found.iter().map(|a| a.start).collect();
                                    testbed::nab::score(s, &alarms)
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("detector thread"))
                    .collect()
            })
        })
        .collect()
}

/// The leave-one-category-out protocol (module doc).
fn loco(series: &[testbed::nab::Series], files: bool, alarms: Option<&Path>) -> Result<()> {
    use testbed::nab::{by_category, Tally};
    if let Some(path) = alarms {
        let all: BTreeMap<&str, Vec<(i64, i64, &str, f64)>> = series
            .iter()
            .map(|s| {
                let found = sensor_pipeline::anomaly::detect(s.readings.iter().copied(), 1.0);
                let found = found
                    .iter()
                    .map(|a| (a.start, a.end, a.kind.as_str(), a.score))
                    .collect();
                (s.name.as_str(), found)
            })
            .collect();
        std::fs::write(path, serde_json::to_vec(&all)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let started = Instant::now();
    let runs = run_grid(series);
    // The score over the series `keep` selects, for grid setting `g`.
    let score_of = |g: usize, keep: &dyn Fn(&str) -> bool| {
        let mut t = Tally::default();
        for (s, tally) in series.iter().zip(&runs[g]) {
            if keep(&s.category) {
                t.add(tally);
            }
        }
        t
    };
    let best = |keep: &dyn Fn(&str) -> bool| {
        (0..GRID.len())
            .map(|g| (g, score_of(g, keep).score().unwrap_or(f64::NEG_INFINITY)))
            .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
            .map_or(0, |(g, _)| g)
    };
    let shipped = GRID
        .iter()
        .position(|&s| s == 1.0)
        .context("1.0 in the grid")?;
    if files {
        for (s, t) in series.iter().zip(&runs[shipped]) {
            println!(
                "  {}: windows {}/{}, false alarms {}",
                s.name, t.hits, t.windows, t.false_alarms
            );
        }
    }
    let categories = by_category(series, &runs[shipped]);
    println!(
        "leave-one-category-out over sensitivity {GRID:?} ({} series, {:.1} s)",
        series.len(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "{:<24} {:>8} {:>7}   shipped (sensitivity 1)",
        "category", "left out", "chosen"
    );
    let mut left_out = Vec::new();
    for (category, shipped_tally) in categories.iter().filter(|(c, _)| **c != "all") {
        let Some(shipped_score) = shipped_tally.score() else {
            // No windows (artificialNoAnomaly): only its false alarms say anything.
            println!(
                "{category:<24} {:>8} {:>7}   {} false alarms",
                "-", "-", shipped_tally.false_alarms
            );
            continue;
        };
        let g = best(&|c: &str| c != *category);
        let held = score_of(g, &|c: &str| c == *category);
        left_out.push(held.score().unwrap_or_default());
        println!(
            "{category:<24} {:>8.1} {:>7}   {shipped_score:5.1} ({}/{} windows, {} false alarms)",
            held.score().unwrap_or_default(),
            GRID[g],
            shipped_tally.hits,
            shipped_tally.windows,
            shipped_tally.false_alarms
        );
    }
    let g = best(&|_: &str| true);
    let all = categories["all"];
    println!(
        "whole bench, tuned on all: {:.1} (sensitivity {}); shipped: {:.1} ({}/{} windows, {} false alarms)",
        score_of(g, &|_: &str| true).score().unwrap_or_default(),
        GRID[g],
        all.score().unwrap_or_default(),
        all.hits,
        all.windows,
        all.false_alarms
    );
    println!(
        "left-out mean: {:.1}",
        left_out.iter().sum::<f64>() / left_out.len().max(1) as f64
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = <Args as clap::Parser>::parse();
    if a.loco {
        let series = if a.kinds {
            let series = testbed::kinds::all();
            if let Some(dir) = &a.export {
                testbed::nab::export(&series, dir)?;
            }
            series
        } else {
            testbed::nab::load(&a.bench)?
        };
        return loco(&series, a.files, a.alarms.as_deref());
    }
    let worker = testbed::bench::binary(&a.worker, "sensors-worker")?;
    let cli = testbed::bench::binary(&a.query_cli, "query-cli")?;
    let env = testbed::TestEnv::new().await?;
    let vars = env.vars();
    run(&worker, &vars, &["migrate"])?;

    // 1. Quality on the labelled series.
    let files = series_files(&a.bench.join("data"))?;
    ensure!(
        !files.is_empty(),
        "no series in {}",
        a.bench.join("data").display()
    );
    let mut mapping = String::from("sensor_uuid;sensor_name\n");
    let mut ranges = Vec::new();
    for (name, path) in &files {
        let sensor = sensor_of(name);
        mapping.push_str(&format!("{sensor};{name}\n"));
        let text = std::fs::read_to_string(path)?;
        let mut csv = String::from("timestamp;sensor_uuid;sensor_value\n");
        let (mut first, mut last) = (String::new(), String::new());
        for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
            let (ts, value) = line.split_once(',').context("timestamp,value")?;
            let ts = format!("{}Z", ts.trim().replace(' ', "T"));
            csv.push_str(&format!("{ts};{sensor};{}\n", value.trim()));
            if first.is_empty() {
                first = ts.clone();
            }
            last = ts;
        }
        env.s3
            .put(&format!("timeseries/nab/{}", name.replace('/', "__")), csv)
            .await?;
        ranges.push((name.clone(), first, last));
    }
    env.s3.put("mapping/nab.csv", mapping).await?;
    let started = Instant::now();
    run(&worker, &vars, &["ingest", "--all"])?;
    eprintln!(
        "ingested {} series in {:.1} s",
        files.len(),
        started.elapsed().as_secs_f64()
    );
    let mut detections: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    for (name, first, last) in &ranges {
        // `query-cli COMMAND` over the series' range, then `extra`.
        let query = |command: &str, extra: &[&str]| {
            let mut args = vec![
                command,
                "--sensor-name",
                name,
                "--start-timestamp",
                first,
                "--end-timestamp",
                last,
            ];
            args.extend(extra);
            run(&cli, &vars, &args)
        };
        let out = query("anomalies", &["--format", "json"])?;
        if let Some(dir) = &a.plots {
            std::fs::create_dir_all(dir)?;
            let png = dir.join(format!("{}.png", name.replace('/', "__")));
            let png = png.to_string_lossy();
            query("plot", &["--output", &png])?;
        }
        let starts = detections.entry(name.clone()).or_default();
        for line in out.lines() {
            let v: serde_json::Value = serde_json::from_str(line)?;
            starts.push(v["start"].as_str().context("start")?.to_string());
            *kinds
                .entry(v["kind"].as_str().context("kind")?.to_string())
                .or_default() += 1;
        }
    }
    eprintln!(
        "query-cli anomalies over {} series in {:.1} s; found {kinds:?}",
        ranges.len(),
        started.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("detections.json");
    std::fs::write(&json, serde_json::to_string_pretty(&detections)?)?;
    let score = std::process::Command::new("python3")
        .arg(a.bench.join("score.py"))
        .arg(&json)
        .output()
        .context("running python3 score.py")?;
    ensure!(
        score.status.success(),
        "score.py failed: {}",
        String::from_utf8_lossy(&score.stderr)
    );
    print!("{}", String::from_utf8_lossy(&score.stdout));
    if a.skip_speed {
        return Ok(());
    }

    // 2. Speed.
    let n = 10_000_000usize;
    let readings: Vec<(i64, f64)> = (0..n)
        .map(|i| {
            let t = 1_356_998_400_000_000i64 + i as i64 * 1_000_000;
            let day = (i % 86_400) as f64 / 86_400.0 * std::f64::consts::TAU;
            let noise = ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as f64
                / (1u64 << 24) as f64
                - 0.5;
            (t, 20.0 + 5.0 * day.sin() + noise)
        })
        .collect();
    let started = Instant::now();
    let found = sensor_pipeline::anomaly::detect(readings.iter().copied(), 1.0);
    let took = started.elapsed();
    drop(readings);
    println!(
        "detector in-process: {n} readings in {:.2} s = {:.2} M readings/s ({} anomalies)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64() / 1e6,
        found.len()
    );
    let db = testbed::connect(&env.measurements_db).await?;
    eprintln!("storing 1 M and 10 M readings of two sensors");
    for (sensor, count) in [("speed_1m", 1_000_000), ("speed_10m", 10_000_000)] {
        let uuid = sensor_of(sensor);
        let mapping = testbed::connect(&env.mapping_db).await?;
        mapping
            .execute(
                "INSERT INTO sensors (sensor_uuid, sensor_name) VALUES ($1, $2)",
                &[&uuid, &sensor],
            )
            .await?;
        db.batch_execute(&format!(
            "INSERT INTO measurements (sensor_uuid, ts, value) \
             SELECT '{uuid}', timestamptz '2013-01-01T00:00:00Z' + make_interval(secs => i), \
                    20 + 5 * sin(i * 2 * pi() / 86400) + (i * 7919 % 1000) / 1000.0 \
                       + CASE WHEN i % 500000 = 250000 THEN 40 ELSE 0 END \
             FROM generate_series(0::bigint, {count} - 1) i"
        ))
        .await?;
    }
    // What the ingest merge keeps beside the rows it writes (these were written directly): the
    // page index and the hourly rollup.
    testbed::derive_from_rows(&db).await?;
    db.batch_execute("VACUUM ANALYZE measurements").await?;
    // What the workers do as data arrives: detect, and store the verdicts.
    let started = Instant::now();
    run(&worker, &vars, &["detect", "--all"])?;
    println!(
        "sensors-worker detect --all (every sensor's history, 11 M readings of the two): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let range = [
        "--start-timestamp",
        "2013-01-01",
        "--end-timestamp",
        "2014-01-01",
    ];
    // `query-cli COMMAND --sensor-name SENSOR EXTRA… <range>`: median wall time and peak RSS.
    let timed = |command: &str, sensor: &str, extra: &[&str]| {
        let mut args = vec![command, "--sensor-name", sensor];
        args.extend(extra);
        args.extend(range);
        median_of(&cli, &vars, &args)
    };
    let json = ["--format", "json"];
    let (t1, rss1) = timed("anomalies", "speed_1m", &json)?;
    let (t10, rss10) = timed("anomalies", "speed_10m", &json)?;
    println!(
        "query-cli anomalies, 1 M readings: {:.2} s wall, peak RSS {rss1:.1} MiB \
         (10 M readings: {:.2} s, {rss10:.1} MiB)",
        t1.as_secs_f64(),
        t10.as_secs_f64()
    );
    // The pictures go to --plots when given (to look at), else to the scratch folder.
    let folder = a.plots.clone().unwrap_or_else(|| dir.path().to_path_buf());
    let picture = |name: &str| folder.join(name).to_string_lossy().to_string();
    let (png10, png1, png_detector) = (
        picture("speed_10m.png"),
        picture("speed_1m.png"),
        picture("speed_10m_detector.png"),
    );
    let (tp, rssp) = timed("plot", "speed_10m", &["--output", &png10])?;
    let (tp1, rssp1) = timed("plot", "speed_1m", &["--output", &png1])?;
    // Another sensitivity than the workers': the detector runs over every reading.
    let (tpd, rsspd) = timed(
        "plot",
        "speed_10m",
        &["--output", &png_detector, "--sensitivity", "0.999"],
    )?;
    println!(
        "query-cli plot, 10 M readings: {:.2} s wall, peak RSS {rssp:.1} MiB \
         (1 M readings: {:.2} s, {rssp1:.1} MiB; 10 M running the detector: {:.2} s, \
         {rsspd:.1} MiB)",
        tp.as_secs_f64(),
        tp1.as_secs_f64(),
        tpd.as_secs_f64()
    );
    Ok(())
}
