//! `sensors-worker`: migrates the databases, consumes MinIO events from NATS JetStream and ingests
//! sensor CSV objects, enqueues existing objects, and manages dead letters.
//!
//! Exit codes: 0 success; 1 some object failed (its reason is in the summary and the ledger);
//! 2 a usage, configuration or infrastructure error (one line on stderr).

mod backfill;
mod batch;
mod logging;
mod run;
mod shutdown;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sensor_pipeline::config::{
    ContractSettings, DatabaseSettings, Env, NatsSettings, ObjectStoreSettings, WorkerSettings,
};
use sensor_pipeline::ingest::Ingestor;
use sensor_pipeline::object_store::ObjectStore;
use sensor_pipeline::queue::Queue;
use sensor_pipeline::store::{migrate, Databases};

#[derive(Debug, Parser)]
#[command(
    name = "sensors-worker",
    version,
    about = "Ingests sensor CSV objects from MinIO/S3 into PostgreSQL/TimescaleDB.",
    after_help = "Configuration comes from the environment, optionally loaded from config/.env \
                  (or --env-file). Secrets may be given as NAME_FILE.\n\n\
                  Exit codes: 0 success; 1 an object failed; 2 usage, configuration or infrastructure error."
)]
struct Cli {
    /// Load settings from this file instead of config/.env (the environment still wins).
    #[arg(long, global = true, value_name = "PATH")]
    env_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply all migrations to both databases (idempotent).
    ///
    /// Example: sensors-worker migrate
    Migrate,
    /// Ingest objects directly from the bucket, without NATS.
    ///
    /// Mapping objects go first, then everything else, WORKER_CONCURRENCY at a time. Versions
    /// already ingested are skipped. Prints a summary; exits 1 if any object failed.
    ///
    /// Examples:
    ///   sensors-worker ingest --all
    ///   sensors-worker ingest mapping/mapping.csv timeseries/2013/part-0000.csv
    Ingest(IngestArgs),
    /// Consume object events from NATS JetStream and ingest them, until SIGINT/SIGTERM.
    ///
    /// Provisions the JetStream topology first (idempotent). Serves /metrics, /healthz and
    /// /readyz on METRICS_ADDR. On a signal: stops fetching, lets in-flight objects finish within
    /// SHUTDOWN_GRACE_SECS, hands back the rest, exits 0.
    ///
    /// Example: sensors-worker run
    Run,
    /// Create or update the JetStream streams and consumer (idempotent), then exit.
    ///
    /// Example: sensors-worker provision
    Provision,
    /// Enqueue an event for every existing object (or those under --prefix), mapping first.
    ///
    /// Repeated within the stream's duplicate window (1 hour), nothing is enqueued twice.
    ///
    /// Examples:
    ///   sensors-worker backfill --wait
    ///   sensors-worker backfill --prefix timeseries/2013/ --prefix mapping/
    Backfill(BackfillArgs),
    /// Dead letters: events the pipeline gave up on, with the reason.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Debug, Args)]
struct BackfillArgs {
    /// Only objects whose key starts with this (repeatable).
    #[arg(long = "prefix", value_name = "P")]
    prefixes: Vec<String>,
    /// Follow progress until every enqueued object is settled; exit 1 if any failed.
    #[arg(long)]
    wait: bool,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// List dead letters: id, when, attempts, objects and reason.
    ///
    /// Example: sensors-worker dlq list
    List {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back through the pipeline (after fixing the cause) and remove them.
    ///
    /// Examples:
    ///   sensors-worker dlq replay --all
    ///   sensors-worker dlq replay 3 7
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct ReplayArgs {
    /// Replay every dead letter.
    #[arg(long)]
    all: bool,
    /// Ids as `dlq list` shows them.
    #[arg(value_name = "ID")]
    ids: Vec<u64>,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct IngestArgs {
    /// Ingest every object in the bucket.
    #[arg(long)]
    all: bool,
    /// Object keys to ingest (as stored, not URL-encoded).
    #[arg(value_name = "KEY")]
    keys: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let env = Env::load(cli.env_file.as_deref())?;
    match cli.command {
        Command::Migrate => {
            logging::init(&env, "info")?;
            let db = DatabaseSettings::from_env(&env)?;
            for report in migrate::migrate(&db).await? {
                let applied = if report.applied.is_empty() {
                    "already up to date".to_string()
                } else {
                    format!("applied {}", report.applied.join(", "))
                };
                let table = report
                    .measurements
                    .map(|t| format!("; measurements is {t}"))
                    .unwrap_or_default();
                println!("{} database: {applied}{table}", report.database);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ingest(args) => {
            logging::init(&env, "warn")?;
            let worker = WorkerSettings::from_env(&env)?;
            let ingestor = ingestor(&env, worker.concurrency)?;
            let keys = if args.all {
                let listed = ingestor
                    .store()
                    .list(None)
                    .await
                    .context("listing the bucket")?;
                listed.into_iter().map(|o| o.key).collect()
            } else {
                args.keys
            };
            let summary = batch::ingest_all(&ingestor, keys, worker.concurrency).await;
            print!("{summary}");
            Ok(if summary.all_settled_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Run => {
            logging::init(&env, "info")?;
            run_worker(&env).await
        }
        Command::Provision => {
            logging::init(&env, "warn")?;
            let queue = queue(&env).await?;
            queue.provision().await?;
            let s = queue.settings();
            println!(
                "stream {} ({}), consumer {}, dead letters in stream {} ({})",
                s.stream,
                s.subject,
                s.consumer,
                s.dlq_stream(),
                s.dlq_subject
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Backfill(args) => {
            logging::init(&env, "warn")?;
            let ingestor = ingestor(&env, 4)?;
            let queue = queue(&env).await?;
            queue.provision().await?;
            let ok = backfill::backfill(
                ingestor.store(),
                &queue,
                ingestor.databases(),
                &args.prefixes,
                args.wait,
            )
            .await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Dlq(command) => {
            logging::init(&env, "warn")?;
            let queue = queue(&env).await?;
            queue.provision().await?;
            dead_letters(&queue, command).await
        }
    }
}

async fn dead_letters(queue: &Queue, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let letters = queue.dead_letters().await?;
    match command {
        DlqCommand::List { json } => {
            for l in &letters {
                let when = l
                    .failed_at
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                    .unwrap_or_default();
                if json {
                    let line = serde_json::json!({
                        "id": l.id, "failed_at": when, "attempts": l.attempts,
                        "keys": l.keys, "reason": l.reason,
                        "payload": String::from_utf8_lossy(&l.payload),
                    });
                    println!("{line}");
                } else {
                    let keys = if l.keys.is_empty() {
                        "-".to_string()
                    } else {
                        l.keys.join(", ")
                    };
                    println!(
                        "{:>6}  {when}  attempts {}  {keys}  {}",
                        l.id, l.attempts, l.reason
                    );
                }
            }
            if !json {
                println!("{} dead letters", letters.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay(args) => {
            let ids: Vec<u64> = if args.all {
                letters.iter().map(|l| l.id).collect()
            } else {
                args.ids
            };
            let mut missing = Vec::new();
            for id in &ids {
                if !queue.replay(*id).await? {
                    missing.push(id.to_string());
                }
            }
            println!("replayed {} dead letters", ids.len() - missing.len());
            if missing.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("error: no dead letter with id {}", missing.join(", "));
                Ok(ExitCode::from(1))
            }
        }
    }
}

async fn queue(env: &Env) -> anyhow::Result<Queue> {
    let settings = NatsSettings::from_env(env)?;
    Ok(Queue::connect(&settings, "sensors-worker").await?)
}

async fn run_worker(env: &Env) -> anyhow::Result<ExitCode> {
    let worker = WorkerSettings::from_env(env)?;
    let stop = shutdown::on_signal()?;
    let handle = telemetry::install()?;
    let ingestor = ingestor(env, worker.concurrency + 2)?;
    let queue = queue(env).await?;
    let (probe_queue, probe_dbs) = (queue.clone(), ingestor.databases().clone());
    let ready: telemetry::Readiness = std::sync::Arc::new(move || {
        let (q, dbs) = (probe_queue.clone(), probe_dbs.clone());
        Box::pin(async move {
            if !q.is_connected() {
                return Err("NATS is not connected".to_string());
            }
            dbs.ping().await.map_err(|e| e.to_string())
        })
    });
    let server = telemetry::serve(worker.metrics_addr, handle, ready, stop.clone()).await?;
    if !provision_with_retries(&queue, &stop).await? {
        tracing::info!("stopped before NATS was reachable");
        return Ok(ExitCode::SUCCESS);
    }
    let observer = tokio::spawn(telemetry::observe(queue.clone(), stop.clone()));
    run::Worker {
        ingestor,
        queue,
        concurrency: worker.concurrency,
        grace: worker.shutdown_grace,
    }
    .run(stop.clone())
    .await?;
    stop.cancel();
    let _ = tokio::join!(server, observer);
    Ok(ExitCode::SUCCESS)
}

/// NATS may come up after the worker: keep trying (with backoff) until it answers (true) or we
/// are told to stop (false).
async fn provision_with_retries(
    queue: &Queue,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<bool> {
    use backon::{ExponentialBuilder, Retryable};
    let attempt = || async { queue.provision().await };
    let retried = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(std::time::Duration::from_millis(500))
                .with_max_delay(std::time::Duration::from_secs(10))
                .without_max_times(),
        )
        .notify(|e, delay| tracing::warn!(error = %e, retry_in = ?delay, "cannot provision JetStream yet"));
    tokio::select! {
        r = retried => r.map(|()| true).map_err(Into::into),
        _ = stop.cancelled() => Ok(false),
    }
}

fn ingestor(env: &Env, connections: usize) -> anyhow::Result<Ingestor> {
    let store = ObjectStore::new(&ObjectStoreSettings::from_env(env)?);
    let dbs = Databases::connect(&DatabaseSettings::from_env(env)?, connections)?;
    Ok(Ingestor::new(store, dbs, ContractSettings::from_env(env)?))
}
