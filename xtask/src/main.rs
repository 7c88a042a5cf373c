//! `cargo xtask`: the project's own tooling.
//!
//! - `cargo xtask demo` — the whole pipeline on this machine, no Docker (`--down` stops it).
//! - `cargo xtask gen` — a realistic, deterministic dataset in the bucket layout.
//! - `cargo xtask s3-serve` — the S3 stand-in the demo runs in the background (internal).

mod demo;
mod gen;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Project tooling: the local demo and the dataset generator."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start PostgreSQL, NATS JetStream, an S3 server that notifies like MinIO, and two workers
    /// under ./.demo/; upload a generated dataset; wait until it is ingested; answer a query.
    Demo(demo::DemoArgs),
    /// Generate a dataset (mapping and measurement files) in the bucket layout.
    Gen(gen::GenArgs),
    /// Serve a folder over S3 with MinIO-format notifications (used by the demo).
    #[command(hide = true)]
    S3Serve(demo::S3ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Demo(args) => demo::run(args).await,
            Command::Gen(args) => {
                let g = gen::generate(&args)?;
                println!(
                    "wrote {} files to {}: {} readings, {} repeated lines, {} bad rows",
                    g.files.len(),
                    args.out.display(),
                    g.readings,
                    g.duplicates,
                    g.bad_rows
                );
                Ok(())
            }
            Command::S3Serve(args) => demo::s3_serve(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
