//! Structured logs on stderr: human-readable text, or JSON lines with `LOG_FORMAT=json`.
//! `RUST_LOG` overrides the default level.

use sensor_pipeline::config::{ConfigError, Env, Setting};
use tracing_subscriber::EnvFilter;

pub fn init(env: &Env, default_level: &str) -> Result<(), ConfigError> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match env.optional(Setting::LogFormat).as_deref() {
        None | Some("text") => builder.init(),
        Some("json") => builder.json().init(),
        Some(other) => {
            return Err(ConfigError::Invalid {
                name: Setting::LogFormat.name(),
                reason: format!("{other:?}: expected text or json"),
            })
        }
    }
    Ok(())
}
