//! `query-cli`: reads readings, sensors and ingestion status back from the pipeline's databases.
//!
//! It shares the schema and the configuration with the worker, nothing else: sensor names are
//! resolved in the mapping database (`DATABASE_URL`), readings come from the measurement database
//! (`TIMESCALE_DATABASE_URL`, defaulting to `DATABASE_URL`).

mod anomalies;
mod buckets;
mod db;
mod output;
mod plot;
mod range;
mod readings;
mod sensors;
mod series;
mod status;

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use sensor_pipeline::config::{DatabaseSettings, EnvFile};

use crate::output::Format;

const EXIT_CODES: &str = "Exit codes:\n  \
    0  success (also a page past the end: no rows)\n  \
    1  nothing to show: unknown sensor, a name mapped to several UUIDs, unknown object\n  \
    2  usage error: bad or missing flag, unparsable timestamp, start after end, page below 1\n  \
    3  configuration or infrastructure error: missing setting, database unreachable";

#[derive(Debug, Parser)]
#[command(
    name = "query-cli",
    version,
    about = "Reads sensor readings, sensors and ingestion status from the pipeline's databases.",
    after_help = format!(
        "Configuration comes from the environment (DATABASE_URL, TIMESCALE_DATABASE_URL), \
         optionally loaded from config/.env (or --env-file). Secrets may be given as NAME_FILE.\n\n{EXIT_CODES}"
    )
)]
struct Cli {
    #[command(flatten)]
    env_file: EnvFile,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Readings of one sensor in [start, end] (both inclusive), in time order.
    ///
    /// Without page flags every reading in the range is streamed, in bounded memory. With
    /// --page-number P --page-size S, page P of size S (a page past the end prints no rows).
    ///
    /// Timestamps: YYYY-MM-DD (midnight), or YYYY-MM-DD then T or a space then HH:MM[:SS[.ffffff]],
    /// optionally followed by Z, ±HH, ±HHMM or ±HH:MM. Without an offset: UTC.
    #[command(after_help = format!(
        "Example:\n  query-cli readings --sensor-name sensor_00007 \
         --start-timestamp \"2012-12-31T23:07:00+00\" --end-timestamp \"2013-02-16T11:03:00+00\" \
         --page-number 2 --page-size 10\n\n{EXIT_CODES}"
    ))]
    Readings(readings::ReadingsArgs),
    /// Every sensor (mapped or not) with its reading count and first/last timestamp.
    #[command(after_help = format!("Example:\n  query-cli sensors --format csv\n\n{EXIT_CODES}"))]
    Sensors(FormatArg),
    /// Ingestion status per object version (key, ETag, status, rows, reason), with totals; or the
    /// rejected rows of one object (--object KEY).
    #[command(after_help = format!(
        "Examples:\n  query-cli status\n  query-cli status --failed\n  \
         query-cli status --object timeseries/2013/part-0000.csv\n\n{EXIT_CODES}"
    ))]
    Status(status::StatusArgs),
    /// Anomalies in one sensor's readings (or every sensor's, --all) whose first reading lies in
    /// [start, end]: spikes, level shifts, stuck values and gaps, in time order (SPEC §7).
    ///
    /// Detection is unsupervised: it adapts to each sensor's level, noise and sampling interval,
    /// and what a sensor does now and then (in two separate hours of the last five days) is not
    /// reported as news. It reads readings from before the start to warm up, so a window's
    /// anomalies do not depend on where the window begins.
    #[command(after_help = format!(
        "Examples:\n  query-cli anomalies --sensor-name sensor_00007 \
         --start-timestamp 2013-01-01 --end-timestamp 2013-02-01\n  \
         query-cli anomalies --all --start-timestamp 2013-01-01 --end-timestamp 2013-02-01 \
         --kind spike --format json\n\n{EXIT_CODES}"
    ))]
    Anomalies(anomalies::AnomaliesArgs),
    /// A line chart of sensors' readings in [start, end] with their anomalies marked, as SVG or
    /// PNG (by the extension of --output); several sensors are drawn one panel each.
    ///
    /// Millions of readings are reduced while streaming to the first, lowest, highest and last
    /// reading per pixel column, so every spike stays visible. Times on the axis are UTC.
    #[command(after_help = format!(
        "Example:\n  query-cli plot --sensor-name sensor_00007 --sensor-name sensor_00008 \
         --start-timestamp 2013-01-01 --end-timestamp 2013-02-01 --output sensors.png\n\n{EXIT_CODES}"
    ))]
    Plot(plot::PlotArgs),
}

#[derive(Debug, Args)]
struct FormatArg {
    /// Output format: an aligned table for people, CSV, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// What went wrong, and so which exit code.
#[derive(Debug)]
pub enum Failure {
    /// Nothing to show for the request (exit 1).
    NotFound(String),
    /// The command line is wrong (exit 2).
    Usage(String),
    /// Configuration or infrastructure (exit 3).
    Infrastructure(String),
    /// Writing to stdout failed; a closed pipe (`| head`) is not an error.
    Output(std::io::Error),
}

impl Failure {
    fn exit(self) -> ExitCode {
        let (code, message) = match self {
            Failure::NotFound(m) => (1, m),
            Failure::Usage(m) => (2, m),
            Failure::Infrastructure(m) => (3, m),
            Failure::Output(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                return ExitCode::SUCCESS
            }
            Failure::Output(e) => (3, format!("cannot write the output: {e}")),
        };
        eprintln!("error: {message}");
        ExitCode::from(code)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Output(e)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // `readings` reads and prints, nothing more: on one thread, the connection's task and the
    // printing hand rows over without waking another thread for each batch (which was half of
    // `readings --every 1d` over ten years). The others also compute (detection, drawing).
    let runtime = match &cli.command {
        Command::Readings(_) => tokio::runtime::Builder::new_current_thread(),
        _ => {
            let mut two = tokio::runtime::Builder::new_multi_thread();
            two.worker_threads(2);
            two
        }
    }
    .enable_all()
    .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => return Failure::Infrastructure(format!("cannot start the runtime: {e}")).exit(),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.exit(),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let settings = cli
        .env_file
        .load()
        .and_then(|env| DatabaseSettings::from_env(&env))
        .map_err(|e| Failure::Infrastructure(e.to_string()))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    match cli.command {
        Command::Readings(args) => {
            let request = args.request()?;
            readings::run(&settings, &request, &mut out).await?;
        }
        Command::Sensors(args) => sensors::run(&settings, args.format, &mut out).await?,
        Command::Status(args) => status::run(&settings, &args, &mut out).await?,
        Command::Anomalies(args) => anomalies::run(&settings, args, &mut out).await?,
        Command::Plot(args) => plot::run(&settings, args).await?,
    }
    out.flush()?;
    Ok(())
}

/// Help and version go to stdout with exit 0; anything else is one line on stderr, exit 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::from(2);
    }
    eprintln!("error: {} (see --help)", one_line(&e));
    ExitCode::from(2)
}

/// A usage error in one line, from clap's error kind and context (clap's own rendering spans
/// several lines: the error, a tip, the usage).
fn one_line(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let context = |kind, separator: &str| {
        e.get(kind).map(|v| match v {
            ContextValue::Strings(all) => all.join(separator),
            other => other.to_string(),
        })
    };
    let arg = context(ContextKind::InvalidArg, " ").unwrap_or_default();
    match e.kind() {
        ErrorKind::MissingRequiredArgument => {
            format!("the following required arguments were not provided: {arg}")
        }
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            let value = context(ContextKind::InvalidValue, " ").unwrap_or_default();
            let mut line = format!("invalid value '{value}' for '{arg}'");
            if let Some(why) = std::error::Error::source(e) {
                line.push_str(&format!(": {why}"));
            } else if let Some(valid) = context(ContextKind::ValidValue, ", ") {
                line.push_str(&format!(" (possible values: {valid})"));
            }
            line
        }
        ErrorKind::UnknownArgument => format!("unexpected argument '{arg}' found"),
        ErrorKind::InvalidSubcommand => format!(
            "unrecognized subcommand '{}'",
            context(ContextKind::InvalidSubcommand, " ").unwrap_or_default()
        ),
        kind if arg.is_empty() => kind.as_str().unwrap_or("invalid usage").to_string(),
        kind => format!("{}: {arg}", kind.as_str().unwrap_or("invalid usage")),
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn usage(args: &[&str]) -> String {
        let mut argv = vec!["query-cli"];
        argv.extend(args);
        one_line(&Cli::try_parse_from(argv).unwrap_err())
    }

    #[test]
    fn usage_errors_are_one_line_from_their_kind_and_context() {
        assert_eq!(
            usage(&["sensors", "--format", "xml"]),
            "invalid value 'xml' for '--format <FORMAT>' (possible values: table, csv, json)"
        );
        assert_eq!(
            usage(&["sensors", "--bogus"]),
            "unexpected argument '--bogus' found"
        );
        assert_eq!(usage(&["nope"]), "unrecognized subcommand 'nope'");
    }
}
