//! Typed settings, read from the environment (SPEC §5).
//!
//! Every binary reads only the groups it needs: `query-cli` never asks for MinIO credentials, and
//! the worker's `migrate` never asks for NATS. Values come from the process environment, optionally
//! seeded from an env file (`config/.env` by default; variables already set in the environment
//! win). A secret may be given as `NAME_FILE`, the path of a file holding it. Secrets are wrapped in
//! [`Secret`], whose `Debug` and `Display` never show the value.
//!
//! `env` is where values are looked up, `setting` the one table of every variable; each other
//! file is one group of settings and how it is read and checked.

mod anomaly;
mod contract;
mod database;
mod env;
mod nats;
mod object_store;
mod setting;
mod worker;

use std::path::PathBuf;

use thiserror::Error;

pub use anomaly::AnomalySettings;
pub use contract::ContractSettings;
pub use database::{split_tls, DatabaseSettings, DatabaseTimeouts, TlsMode, TlsParams};
pub use env::{Env, EnvFile, Secret};
pub use nats::{NatsAuth, NatsSettings};
pub use object_store::ObjectStoreSettings;
pub use setting::Setting;
pub use worker::{LimitSettings, WorkerSettings};

/// The env file read when no `--env-file` is given, if it exists.
pub const DEFAULT_ENV_FILE: &str = "config/.env";

/// What went wrong while reading configuration; every variant names the variable or file.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error(
        "missing required setting {0}: set it in the environment, in config/.env, or as {0}_FILE"
    )]
    Missing(&'static str),
    #[error("invalid value for {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("both {0} and {0}_FILE are set: set only one")]
    Ambiguous(&'static str),
    #[error("cannot read {name}_FILE ({path}): {source}")]
    SecretFile {
        name: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read env file {path}: {reason}")]
    EnvFile { path: PathBuf, reason: String },
}

/// A positive number of seconds.
pub(crate) fn seconds(
    env: &Env,
    setting: Setting,
    default: u64,
) -> Result<std::time::Duration, ConfigError> {
    positive(env, setting, default).map(std::time::Duration::from_secs)
}

pub(crate) fn positive(env: &Env, setting: Setting, default: u64) -> Result<u64, ConfigError> {
    match env.parsed(setting, default)? {
        0 => Err(ConfigError::Invalid {
            name: setting.name(),
            reason: "must be at least 1".into(),
        }),
        n => Ok(n),
    }
}

#[cfg(test)]
mod tests;
