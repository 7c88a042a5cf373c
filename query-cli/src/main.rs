//! `query-cli`: reads readings, sensors and ingestion status back from the pipeline's databases.
//!
//! Not built yet: the commands of SPEC §5 (`readings`, `sensors`, `status`) land with their own
//! issue. Until then the binary says so instead of pretending to succeed.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "error: query-cli is not available yet (readings, sensors and status are being built)"
    );
    ExitCode::from(2)
}
