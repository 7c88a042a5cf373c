//! `sensors-worker dlq`: the dead letters — events the pipeline gave up on, with the reason —
//! listed, and replayed after the cause is fixed (see `pipeline/src/queue/dead_letters.rs`).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use sensor_pipeline::queue::Queue;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
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
pub struct ReplayArgs {
    /// Replay every dead letter.
    #[arg(long)]
    all: bool,
    /// Ids as `dlq list` shows them.
    #[arg(value_name = "ID")]
    ids: Vec<u64>,
}

/// Runs a `dlq` subcommand.
pub async fn run(queue: &Queue, command: DlqCommand) -> anyhow::Result<ExitCode> {
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
