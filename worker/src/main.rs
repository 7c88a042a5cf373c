//! `sensors-worker`: migrates the databases, consumes MinIO events from NATS JetStream and ingests
//! sensor CSV objects, enqueues existing objects, and manages dead letters.
//!
//! Exit codes: 0 success; 1 some object failed (its reason is in the summary and the ledger);
//! 2 a usage, configuration or infrastructure error (one line on stderr).

mod backfill;
mod batch;
mod consumer;
mod detect;
mod dlq;
mod health;
mod logging;
mod run;
mod settle;
mod shutdown;
mod stranded;
mod telemetry;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sensor_pipeline::alerts::Alerts;
use sensor_pipeline::config::{
    AnomalySettings, ContractSettings, DatabaseSettings, Env, EnvFile, LimitSettings, NatsSettings,
    ObjectStoreSettings, WorkerSettings,
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
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    env_file: EnvFile,
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
    /// Creates what is missing of the JetStream topology first (never changes what exists; logs
    /// how it differs). Serves /metrics, /healthz and
    /// /readyz on METRICS_ADDR. On a signal: stops fetching, lets in-flight objects finish within
    /// SHUTDOWN_GRACE_SECS, hands back the rest, exits 0.
    ///
    /// Example: sensors-worker run
    Run,
    /// Create the JetStream streams and consumers that are missing, print how the existing ones
    /// differ from this version's definitions (left as they are), then exit.
    ///
    /// Examples:
    ///   sensors-worker provision
    ///   sensors-worker provision --check     # change nothing; exit 1 if anything differs
    ///   sensors-worker provision --update    # also change what differs to this version's
    Provision(ProvisionArgs),
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
    Dlq(dlq::DlqCommand),
    /// Fill the anomalies table from readings already stored (history), with a progress bar.
    ///
    /// Queues every sensor's readings (from --since) for detection and detects them here; an
    /// interrupted run is resumed by running the command again. The anomalies found are not
    /// published (history is not news) unless --publish is given.
    ///
    /// Examples:
    ///   sensors-worker detect --all
    ///   sensors-worker detect --all --since 2026-01-01T00:00:00Z --publish
    Detect(DetectArgs),
}

#[derive(Debug, Args)]
struct DetectArgs {
    /// Every sensor with stored readings (the only scope there is today; required for clarity).
    #[arg(long, required = true)]
    all: bool,
    /// Only readings from this instant on (RFC 3339), and the warm-up before it.
    #[arg(long, value_name = "T")]
    since: Option<chrono::DateTime<chrono::Utc>>,
    /// Publish the anomalies found to NATS like live ones.
    #[arg(long)]
    publish: bool,
}

#[derive(Debug, Args)]
#[group(multiple = false)]
struct ProvisionArgs {
    /// Change nothing: print what is missing or differs, exit 1 if anything does.
    #[arg(long)]
    check: bool,
    /// Also change what differs to this version's definitions (overrides operators' changes).
    #[arg(long)]
    update: bool,
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
    let env = cli.env_file.load()?;
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
            let ingestor = ingestor(&env, worker.pool_size)?;
            let anomalies = AnomalySettings::from_env(&env)?;
            let alerts = anomalies
                .enabled
                .then(|| Alerts::new(ingestor.databases().clone(), anomalies));
            let keys = match args.all {
                true => batch::Keys::listed(ingestor.store()).await?,
                false => batch::Keys::given(args.keys),
            };
            let summary =
                batch::ingest_all(&ingestor, alerts.as_ref(), keys, worker.concurrency).await;
            print!("{summary}");
            if let Some(error) = &summary.listing {
                anyhow::bail!("{error} (the objects listed before were ingested)");
            }
            Ok(if summary.all_settled_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Run => {
            logging::init(&env, "info")?;
            run::run(&env).await
        }
        Command::Provision(args) => {
            logging::init(&env, "warn")?;
            let queue = queue(&env).await?;
            let anomalies = AnomalySettings::from_env(&env)?;
            let alerts = anomalies.enabled.then_some(&anomalies);
            if args.update {
                queue.provision().await?;
                if let Some(a) = alerts {
                    queue.update_anomalies(a).await?;
                }
            }
            let drift = if args.check {
                queue.check(alerts).await?
            } else {
                queue.ensure(alerts).await?
            };
            for d in &drift {
                println!("differs: {d}");
            }
            let s = queue.settings();
            let anomaly_stream = match alerts {
                Some(a) => format!(
                    ", anomalies in stream {} ({}.>)",
                    a.stream, a.subject_prefix
                ),
                None => String::new(),
            };
            println!(
                "stream {} ({}), consumer {}, dead letters in stream {} ({}), stranded events in \
                 stream {}{anomaly_stream}: {}",
                s.stream,
                s.subject,
                s.consumer,
                s.dlq_stream(),
                s.dlq_subject,
                s.stranded_stream(),
                match (drift.len(), args.check) {
                    (0, _) => "as this version provisions them".to_string(),
                    (n, true) => format!("{n} differences"),
                    (n, false) => format!("{n} differences left as they are"),
                }
            );
            Ok(if args.check && !drift.is_empty() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Backfill(args) => {
            logging::init(&env, "warn")?;
            let ingestor = ingestor(&env, 4)?;
            let queue = queue(&env).await?;
            queue.ensure(None).await?;
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
        Command::Detect(args) => {
            logging::init(&env, "warn")?;
            let worker = WorkerSettings::from_env(&env)?;
            let dbs = Databases::connect(&DatabaseSettings::from_env(&env)?, worker.pool_size)?;
            let alerts = Alerts::new(dbs, AnomalySettings::from_env(&env)?);
            let queue = if args.publish {
                let queue = queue(&env).await?;
                queue.provision_anomalies(alerts.settings()).await?;
                Some(queue)
            } else {
                None
            };
            let _ = args.all;
            let done =
                detect::history(&alerts, args.since, queue.as_ref(), worker.concurrency).await?;
            println!(
                "{} sensors detected: {} anomalies opened, {} resolved",
                done.sensors,
                done.opened.len(),
                done.resolved.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq(command) => {
            logging::init(&env, "warn")?;
            let queue = queue(&env).await?;
            queue.ensure(None).await?;
            dlq::run(&queue, command).await
        }
    }
}

/// A NATS connection with the configured names.
pub(crate) async fn queue(env: &Env) -> anyhow::Result<Queue> {
    let settings = NatsSettings::from_env(env)?;
    Ok(Queue::connect(&settings, "sensors-worker").await?)
}

/// An ingestor for the configured bucket and databases, with up to `connections` per database.
pub(crate) fn ingestor(env: &Env, connections: usize) -> anyhow::Result<Ingestor> {
    let store = ObjectStore::new(&ObjectStoreSettings::from_env(env)?);
    let dbs = Databases::connect(&DatabaseSettings::from_env(env)?, connections)?;
    Ok(Ingestor::new(store, dbs, ContractSettings::from_env(env)?)
        .detect_anomalies(AnomalySettings::from_env(env)?.enabled)
        .limits(LimitSettings::from_env(env)?))
}
