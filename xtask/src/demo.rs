//! `cargo xtask demo`: the whole pipeline on one machine, no Docker.
//!
//! Everything lives under `./.demo/`: PostgreSQL (its own cluster), NATS with JetStream, the
//! test harness's S3 server publishing MinIO-format notifications (real MinIO is not needed), two
//! `sensors-worker run` processes, logs, the generated data and `.demo/env` (the settings, for
//! `--env-file`). Services run in the background, detached from the terminal, until
//! `cargo xtask demo --down`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sensor_pipeline::config::ObjectStoreSettings;
use sensor_pipeline::object_store::ObjectStore;

use crate::gen::{self, GenArgs};

const BUCKET: &str = "code-challenge-data";
const SUBJECT: &str = "minio.events";

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Stop everything the demo started and remove ./.demo.
    #[arg(long)]
    down: bool,
    #[command(flatten)]
    data: GenArgs,
}

#[derive(Debug, clap::Args)]
pub struct S3ServeArgs {
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    port: u16,
    #[arg(long)]
    nats_url: String,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn demo_dir() -> PathBuf {
    repo_root().join(".demo")
}

pub async fn run(args: DemoArgs) -> Result<()> {
    if args.down {
        return down();
    }
    let dir = demo_dir();
    if dir.join("pids").exists() {
        bail!("a demo is already running (see .demo/): stop it with `cargo xtask demo --down`");
    }
    let tools = Tools::find()?;
    let bin = build_binaries()?;
    std::fs::create_dir_all(dir.join("logs"))?;
    let mut pids = Pids::new(dir.join("pids"));

    step("starting PostgreSQL");
    let pg_port = free_port()?;
    tools.start_postgres(&dir, pg_port)?;
    pids.add("postgres", 0)?;
    let database_url = format!("postgres://postgres@127.0.0.1:{pg_port}/sensors");
    let admin =
        testbed::connect(&format!("postgres://postgres@127.0.0.1:{pg_port}/postgres")).await?;
    admin.batch_execute("CREATE DATABASE sensors").await?;

    step("starting NATS JetStream");
    let nats_port = free_port()?;
    let nats_url = format!("nats://127.0.0.1:{nats_port}");
    let nats = detached(
        Command::new(&tools.nats_server)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &nats_port.to_string(),
                "-sd",
            ])
            .arg(dir.join("nats")),
        &dir.join("logs/nats.log"),
    )?;
    pids.add("nats-server", nats)?;
    wait_port(nats_port, "NATS")?;

    step("starting the S3 server (MinIO stand-in with NATS notifications)");
    let s3_port = free_port()?;
    let s3 = detached(
        Command::new(std::env::current_exe()?)
            .arg("s3-serve")
            .arg("--root")
            .arg(dir.join("s3"))
            .args(["--port", &s3_port.to_string(), "--nats-url", &nats_url]),
        &dir.join("logs/s3.log"),
    )?;
    pids.add("s3-server", s3)?;
    wait_port(s3_port, "the S3 server")?;

    let env_file = dir.join("env");
    std::fs::write(
        &env_file,
        format!(
            "# Settings of the running demo: --env-file .demo/env, or `set -a; . .demo/env; set +a`.\n\
             MINIO_ENDPOINT=127.0.0.1:{s3_port}\n\
             MINIO_ACCESS_KEY={}\n\
             MINIO_SECRET_KEY={}\n\
             MINIO_BUCKET={BUCKET}\n\
             DATABASE_URL={database_url}\n\
             NATS_URL={nats_url}\n\
             NATS_SUBJECT={SUBJECT}\n\
             NAIVE_TIMEZONE=Europe/Berlin\n",
            testbed::S3Server::ACCESS_KEY,
            testbed::S3Server::SECRET_KEY,
        ),
    )?;

    step("migrating and provisioning");
    // Says what the measurements table is (a TimescaleDB hypertable or a plain table, and why).
    print!("{}", bin.worker(&env_file, &["migrate"])?);
    bin.worker(&env_file, &["provision"])?;

    step("generating the dataset");
    let mut data = args.data.clone();
    if data.out == Path::new(".demo/data") {
        data.out = dir.join("data");
    }
    let generated = gen::generate(&data)?;
    println!(
        "  {} files: {} readings, {} repeated lines, {} bad rows",
        generated.files.len(),
        generated.readings,
        generated.duplicates,
        generated.bad_rows
    );

    step("starting two workers");
    let mut metrics = Vec::new();
    for n in 1..=2 {
        let port = free_port()?;
        let pid = detached(
            Command::new(&bin.worker)
                .arg("--env-file")
                .arg(&env_file)
                .arg("run")
                .env("METRICS_ADDR", format!("127.0.0.1:{port}")),
            &dir.join(format!("logs/worker-{n}.log")),
        )?;
        pids.add(&format!("worker-{n}"), pid)?;
        metrics.push(format!("http://127.0.0.1:{port}/metrics"));
    }

    step("uploading through the S3 API (the notifications drive ingestion)");
    let store = ObjectStore::new(&ObjectStoreSettings::plain(
        &format!("127.0.0.1:{s3_port}"),
        testbed::S3Server::ACCESS_KEY,
        testbed::S3Server::SECRET_KEY,
        BUCKET,
    ));
    for (key, path) in &generated.files {
        store
            .client()
            .put_object()
            .bucket(BUCKET)
            .key(key)
            .body(std::fs::read(path)?.into())
            .send()
            .await
            .with_context(|| format!("uploading {key}"))?;
    }

    step("waiting for the workers");
    let db = testbed::connect(&database_url).await?;
    let total = generated.files.len() as u64;
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("  {bar:40} {pos}/{len} objects ingested  {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    loop {
        let settled: i64 = db
            .query_one("SELECT count(*) FROM ingest_ledger", &[])
            .await?
            .get(0);
        bar.set_position(settled as u64);
        if settled as u64 >= total {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("not everything was ingested after 10 minutes: see .demo/logs/worker-*.log");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();

    let status = bin.query(&env_file, &["status"])?;
    let totals = status.lines().last().unwrap_or_default();
    println!("\n{totals}");
    let example = testbed::data::EXAMPLE_QUERY;
    let answer = bin.query(&env_file, &example)?;
    println!(
        "\n$ query-cli {}\n{answer}",
        example
            .iter()
            .map(|a| if a.contains('+') {
                format!("\"{a}\"")
            } else {
                a.to_string()
            })
            .collect::<Vec<_>>()
            .join(" ")
    );
    check_page(&answer)?;

    // Task 4: what the detector finds in one sensor, against what the generator injected.
    let range_end = (data.start + chrono::Duration::days(data.days)).to_rfc3339();
    let range_start = data.start.to_rfc3339();
    let anomalies = [
        "anomalies",
        "--sensor-name",
        "sensor_00007",
        "--start-timestamp",
        range_start.as_str(),
        "--end-timestamp",
        range_end.as_str(),
    ];
    let answer = bin.query(&env_file, &anomalies)?;
    let injected = generated
        .truth
        .as_ref()
        .and_then(|t| std::fs::read_to_string(t).ok())
        .map_or(0, |t| t.matches("\"sensor_00007\"").count());
    println!(
        "\n$ query-cli {}\n{answer}({} found; the generator injected {injected}, listed in {})",
        anomalies.join(" "),
        answer.lines().count().saturating_sub(1),
        data.out.join("anomalies.json").display()
    );
    let picture = dir.join("sensor_00007.png");
    let picture_arg = picture.display().to_string();
    let mut plot = vec![
        "plot",
        "--sensor-name",
        "sensor_00007",
        "--sensor-name",
        "sensor_00003",
    ];
    plot.extend(&anomalies[3..]);
    plot.extend(["--output", picture_arg.as_str()]);
    bin.query(&env_file, &plot)?;
    println!(
        "Readings with their anomalies marked: {}",
        picture.display()
    );

    let bin_dir = bin.dir.display();
    println!(
        "The pipeline is running. Keep exploring:\n\n  \
         {bin_dir}/query-cli --env-file .demo/env sensors\n  \
         {bin_dir}/query-cli --env-file .demo/env status --failed\n  \
         {bin_dir}/query-cli --env-file .demo/env readings --sensor-name sensor_00001 --start-timestamp 2013-01-01 --end-timestamp 2013-01-02 --format csv\n  \
         {bin_dir}/query-cli --env-file .demo/env anomalies --all --start-timestamp 2012-12-01 --end-timestamp 2013-03-01\n  \
         {bin_dir}/query-cli --env-file .demo/env plot --sensor-name sensor_00001 --start-timestamp 2013-01-01 --end-timestamp 2013-01-08 --output .demo/week.svg\n  \
         {bin_dir}/sensors-worker --env-file .demo/env dlq list\n  \
         curl -s {}\n\n\
         Upload more files with any S3 client (endpoint http://127.0.0.1:{s3_port}, keys in .demo/env); \
         logs are in .demo/logs/.\nStop everything: cargo xtask demo --down",
        metrics[0]
    );
    Ok(())
}

/// The example page must be 10 readings in time order inside the range.
fn check_page(answer: &str) -> Result<()> {
    let rows: Vec<&str> = answer.lines().skip(1).collect();
    if rows.len() != 10 {
        bail!(
            "the example query returned {} readings instead of 10",
            rows.len()
        );
    }
    let stamps: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.split_whitespace().next())
        .collect();
    let sorted = stamps.windows(2).all(|w| w[0] < w[1]);
    let inside = stamps
        .iter()
        .all(|t| *t >= "2012-12-31T23:07:00Z" && *t <= "2013-02-16T11:03:00Z");
    if !sorted || !inside {
        bail!("the example query's page is not in time order inside the range:\n{answer}");
    }
    Ok(())
}

/// Stops what the demo started (workers first, PostgreSQL last) and removes `.demo`.
fn down() -> Result<()> {
    let dir = demo_dir();
    let pids_file = dir.join("pids");
    if !pids_file.exists() {
        if dir.exists() {
            remove_outside_pg_dir(&dir)?;
            std::fs::remove_dir_all(&dir)?;
        }
        println!("no demo is running");
        return Ok(());
    }
    let text = std::fs::read_to_string(&pids_file)?;
    let mut entries: Vec<(&str, u32)> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter_map(|(n, p)| p.parse().ok().map(|p| (n, p)))
        .collect();
    entries.reverse();
    for (name, pid) in entries {
        if name == "postgres" {
            let tools = Tools::find()?;
            tools.stop_postgres(&dir)?;
        } else if pid > 0 {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let start = Instant::now();
            while alive(pid) && start.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        println!("stopped {name}");
    }
    remove_outside_pg_dir(&dir)?;
    std::fs::remove_dir_all(&dir)?;
    println!("removed .demo/");
    Ok(())
}

/// Where the demo's PostgreSQL keeps its cluster: `.demo/pg`, or — as root, when the server runs
/// as `postgres`, who may not enter the clone (a home folder or a `mktemp -d` is mode 700) — a
/// folder of its own under the system's temporary folder, which `.demo/pg` links to (and `--down`
/// removes).
fn make_pg_dir(dir: &Path) -> Result<PathBuf> {
    let link = dir.join("pg");
    if !testbed::is_root() {
        std::fs::create_dir_all(&link)?;
        return Ok(link);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let outside =
        std::env::temp_dir().join(format!("sensor-demo-pg-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&outside).with_context(|| format!("creating {}", outside.display()))?;
    std::os::unix::fs::symlink(&outside, &link)
        .with_context(|| format!("linking {} to {}", link.display(), outside.display()))?;
    Ok(outside)
}

/// Removes the folder [`make_pg_dir`] made outside `.demo` (if it did).
fn remove_outside_pg_dir(dir: &Path) -> Result<()> {
    let pg = pg_dir(dir);
    if !pg.starts_with(dir) && pg.exists() {
        std::fs::remove_dir_all(&pg)
            .with_context(|| format!("removing PostgreSQL's folder {}", pg.display()))?;
    }
    Ok(())
}

/// The folder [`make_pg_dir`] made.
fn pg_dir(dir: &Path) -> PathBuf {
    let link = dir.join("pg");
    std::fs::read_link(&link).unwrap_or(link)
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// `cargo xtask s3-serve`: runs until killed.
pub async fn s3_serve(args: S3ServeArgs) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    let _server = testbed::S3Server::serve_folder(
        &args.root,
        listener,
        BUCKET,
        Some(testbed::NotifyTarget {
            nats_url: args.nats_url,
            subject: SUBJECT.into(),
            auth: Default::default(),
        }),
    )
    .await?;
    std::future::pending::<()>().await;
    Ok(())
}

fn step(what: &str) {
    println!("• {what}");
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

fn wait_port(port: u16, what: &str) -> Result<()> {
    testbed::wait_until(Duration::from_secs(30), what, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
}

/// Starts a process in its own process group (Ctrl-C in this terminal does not reach it), with
/// output to `log`; returns its pid.
fn detached(cmd: &mut Command, log: &Path) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    Ok(child.id())
}

/// Started services, recorded as they start so `--down` can stop them even after a failure.
struct Pids(PathBuf);

impl Pids {
    fn new(path: PathBuf) -> Self {
        Self(path)
    }

    fn add(&mut self, name: &str, pid: u32) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.0)?;
        writeln!(f, "{name} {pid}")?;
        Ok(())
    }
}

/// The pipeline's binaries, built with the same profile as this tool.
struct Binaries {
    dir: PathBuf,
    worker: PathBuf,
    query: PathBuf,
}

impl Binaries {
    fn worker(&self, env_file: &Path, args: &[&str]) -> Result<String> {
        output_of(
            Command::new(&self.worker)
                .arg("--env-file")
                .arg(env_file)
                .args(args),
        )
    }

    fn query(&self, env_file: &Path, args: &[&str]) -> Result<String> {
        output_of(
            Command::new(&self.query)
                .arg("--env-file")
                .arg(env_file)
                .args(args),
        )
    }
}

fn output_of(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}{}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn build_binaries() -> Result<Binaries> {
    step("building sensors-worker and query-cli");
    let dir = std::env::current_exe()?
        .parent()
        .ok_or_else(|| anyhow!("no folder for the current executable"))?
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "sensors-worker",
        "-p",
        "query-cli",
    ])
    .current_dir(repo_root());
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let status = cmd.status()?;
    if !status.success() {
        bail!("cargo build failed");
    }
    Ok(Binaries {
        worker: dir.join("sensors-worker"),
        query: dir.join("query-cli"),
        dir,
    })
}

/// The server binaries the demo needs (found the way the test harness finds them).
struct Tools {
    pg_ctl: PathBuf,
    nats_server: PathBuf,
}

impl Tools {
    fn find() -> Result<Self> {
        let missing = "PostgreSQL server binaries (initdb, pg_ctl) not found: install PostgreSQL \
                       (apt-get install postgresql) or use `docker compose up` instead";
        if testbed::find_pg_binary("initdb").is_none() {
            bail!(missing);
        }
        Ok(Self {
            pg_ctl: testbed::find_pg_binary("pg_ctl").ok_or_else(|| anyhow!(missing))?,
            nats_server: testbed::nats_server()?,
        })
    }

    fn start_postgres(&self, dir: &Path, port: u16) -> Result<()> {
        let pg_dir = make_pg_dir(dir)?;
        let data = testbed::init_cluster(&pg_dir)?;
        output_of(
            testbed::postgres_command(&self.pg_ctl)
                .arg("-D")
                .arg(&data)
                .arg("-o")
                .arg(format!(
                    "-p {port} -h 127.0.0.1 -k {} -c fsync=off -c synchronous_commit=off",
                    pg_dir.display()
                ))
                .arg("-l")
                .arg(pg_dir.join("postgres.log"))
                .args(["-w", "start"]),
        )?;
        Ok(())
    }

    fn stop_postgres(&self, dir: &Path) -> Result<()> {
        let data = pg_dir(dir).join("data");
        if data.join("postmaster.pid").exists() {
            output_of(
                testbed::postgres_command(&self.pg_ctl)
                    .arg("-D")
                    .arg(&data)
                    .args(["-m", "fast", "-w", "stop"]),
            )?;
        }
        Ok(())
    }
}
