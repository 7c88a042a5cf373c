//! `sensors-worker`: migrates the databases and ingests sensor CSV objects.
//!
//! Exit codes: 0 success; 1 some object failed (its reason is in the summary and the ledger);
//! 2 a usage, configuration or infrastructure error (one line on stderr).

mod batch;
mod logging;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use sensor_pipeline::config::{
    ContractSettings, DatabaseSettings, Env, ObjectStoreSettings, WorkerSettings,
};
use sensor_pipeline::ingest::Ingestor;
use sensor_pipeline::object_store::ObjectStore;
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
                let table = match report.hypertable {
                    Some(true) => "; measurements is a TimescaleDB hypertable",
                    Some(false) => "; measurements is a plain table (TimescaleDB not available)",
                    None => "",
                };
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
    }
}

fn ingestor(env: &Env, connections: usize) -> anyhow::Result<Ingestor> {
    let store = ObjectStore::new(&ObjectStoreSettings::from_env(env)?);
    let dbs = Databases::connect(&DatabaseSettings::from_env(env)?, connections)?;
    Ok(Ingestor::new(store, dbs, ContractSettings::from_env(env)?))
}
