//! The worker process and what one object may cost.

use std::net::SocketAddr;

use super::{positive, seconds, ConfigError, Env, Setting};

/// Worker process settings.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Objects ingested at once, `WORKER_CONCURRENCY`, default the number of CPUs.
    pub concurrency: usize,
    /// Prometheus endpoint, `METRICS_ADDR`.
    pub metrics_addr: SocketAddr,
    /// How long `run` lets in-flight objects finish after SIGTERM, `SHUTDOWN_GRACE_SECS`, default 25.
    pub shutdown_grace: std::time::Duration,
    /// Connections per database, `DATABASE_POOL_SIZE`, default `concurrency + 2` (the objects
    /// in flight, anomaly detection, the health probe).
    pub pool_size: usize,
}

/// What one object may cost before it fails with the reason (ledger `failed`, a dead letter), so
/// that one bad upload cannot exhaust the worker or the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSettings {
    /// `MAX_OBJECT_BYTES`, default 10 GiB: bigger objects fail before a row is read.
    pub max_object_bytes: u64,
    /// `MAX_DECOMPRESSION_RATIO`, default 200: a gzip object whose data grows past this many
    /// times its compressed size fails (a gzip bomb; CSV compresses 5–20×).
    pub max_decompression_ratio: u64,
    /// `MAX_REJECTED_ROWS`, default 100,000: an object with more rejected rows fails (nothing of
    /// it is stored; the quarantine keeps up to 1 MiB per rejected row).
    pub max_rejected_rows: u64,
    /// `OBJECT_DEADLINE_SECS`, default 3600: an object not ingested by then fails (a hung
    /// stream or a statement waiting forever cannot hold its event for ever).
    pub object_deadline: std::time::Duration,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_object_bytes: 10 << 30,
            max_decompression_ratio: 200,
            max_rejected_rows: 100_000,
            object_deadline: std::time::Duration::from_secs(3600),
        }
    }
}

impl LimitSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let d = Self::default();
        Ok(Self {
            max_object_bytes: positive(env, Setting::MaxObjectBytes, d.max_object_bytes)?,
            max_decompression_ratio: positive(
                env,
                Setting::MaxDecompressionRatio,
                d.max_decompression_ratio,
            )?,
            max_rejected_rows: env.parsed(Setting::MaxRejectedRows, d.max_rejected_rows)?,
            object_deadline: seconds(
                env,
                Setting::ObjectDeadlineSecs,
                d.object_deadline.as_secs(),
            )?,
        })
    }
}

impl WorkerSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let concurrency = env.parsed(Setting::WorkerConcurrency, cpus)?;
        if concurrency == 0 {
            return Err(ConfigError::Invalid {
                name: Setting::WorkerConcurrency.name(),
                reason: "must be at least 1".into(),
            });
        }
        let default_addr: SocketAddr = ([127, 0, 0, 1], 9184).into();
        Ok(Self {
            concurrency,
            metrics_addr: env.parsed(Setting::MetricsAddr, default_addr)?,
            shutdown_grace: std::time::Duration::from_secs(
                env.parsed(Setting::ShutdownGraceSecs, 25)?,
            ),
            pool_size: positive(env, Setting::DatabasePoolSize, concurrency as u64 + 2)? as usize,
        })
    }
}
