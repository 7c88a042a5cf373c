//! Typed settings, read from the environment (SPEC §5).
//!
//! Every binary reads only the groups it needs: `query-cli` never asks for MinIO credentials, and
//! the worker's `migrate` never asks for NATS. Values come from the process environment, optionally
//! seeded from an env file (`config/.env` by default; variables already set in the environment
//! win). A secret may be given as `NAME_FILE`, the path of a file holding it. Secrets are wrapped in
//! [`Secret`], whose `Debug` and `Display` never show the value.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use thiserror::Error;

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

/// A value that must never be printed: `Debug`/`Display` show `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must hand it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Where settings are looked up: the process environment, or a fixed map (tests).
#[derive(Debug, Clone, Default)]
pub struct Env {
    fixed: Option<HashMap<String, String>>,
}

impl Env {
    /// The process environment, after loading `env_file` (or `config/.env` if present).
    ///
    /// An explicitly named file must exist; the default one is optional. Variables already set in
    /// the environment are not overridden by the file.
    pub fn load(env_file: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match env_file {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_ENV_FILE), false),
        };
        if required || path.exists() {
            dotenvy::from_path(&path).map_err(|e| ConfigError::EnvFile {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
        Ok(Self { fixed: None })
    }

    /// A fixed set of variables, ignoring the process environment.
    pub fn from_map<K: Into<String>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            fixed: Some(
                vars.into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
        }
    }

    fn raw(&self, name: &str) -> Option<String> {
        match &self.fixed {
            Some(map) => map.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
    }

    /// A plain setting; empty counts as unset.
    pub fn optional(&self, setting: Setting) -> Option<String> {
        self.raw(setting.name()).filter(|v| !v.is_empty())
    }

    pub fn required(&self, setting: Setting) -> Result<String, ConfigError> {
        self.optional(setting)
            .ok_or(ConfigError::Missing(setting.name()))
    }

    /// A setting that may also be given as `NAME_FILE` (a path whose content is the value; one
    /// trailing newline is removed).
    pub fn optional_secret(&self, setting: Setting) -> Result<Option<Secret>, ConfigError> {
        let name = setting.name();
        let file_var = format!("{name}_FILE");
        let direct = self.optional(setting);
        let file = self.raw(&file_var).filter(|v| !v.is_empty());
        match (direct, file) {
            (Some(_), Some(_)) => Err(ConfigError::Ambiguous(name)),
            (Some(v), None) => Ok(Some(Secret(v))),
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                let mut value = std::fs::read_to_string(&path)
                    .map_err(|source| ConfigError::SecretFile { name, path, source })?;
                if value.ends_with('\n') {
                    value.pop();
                    if value.ends_with('\r') {
                        value.pop();
                    }
                }
                Ok(Some(Secret(value)))
            }
            (None, None) => Ok(None),
        }
    }

    pub fn required_secret(&self, setting: Setting) -> Result<Secret, ConfigError> {
        self.optional_secret(setting)?
            .ok_or(ConfigError::Missing(setting.name()))
    }

    fn parsed<T>(&self, setting: Setting, default: T) -> Result<T, ConfigError>
    where
        T: std::str::FromStr,
        T::Err: fmt::Display,
    {
        let name = setting.name();
        match self.optional(setting) {
            None => Ok(default),
            Some(v) => v.trim().parse().map_err(|e: T::Err| ConfigError::Invalid {
                name,
                reason: format!("{v:?}: {e}"),
            }),
        }
    }

    fn flag(&self, setting: Setting, default: bool) -> Result<bool, ConfigError> {
        let name = setting.name();
        match self.optional(setting).as_deref().map(str::trim) {
            None => Ok(default),
            Some(v)
                if v.eq_ignore_ascii_case("true") || v == "1" || v.eq_ignore_ascii_case("yes") =>
            {
                Ok(true)
            }
            Some(v)
                if v.eq_ignore_ascii_case("false") || v == "0" || v.eq_ignore_ascii_case("no") =>
            {
                Ok(false)
            }
            Some(v) => Err(ConfigError::Invalid {
                name,
                reason: format!("{v:?} is not true or false"),
            }),
        }
    }
}

/// The S3-compatible object store (MinIO).
#[derive(Debug, Clone)]
pub struct ObjectStoreSettings {
    /// `host:port`, no scheme.
    pub endpoint: String,
    pub access_key: Secret,
    pub secret_key: Secret,
    pub https: bool,
    pub bucket: String,
    /// Connecting may take this long, `MINIO_CONNECT_TIMEOUT_SECS`, default 10.
    pub connect_timeout: std::time::Duration,
    /// The store may keep a request waiting for its response this long,
    /// `MINIO_READ_TIMEOUT_SECS`, default 60.
    pub read_timeout: std::time::Duration,
    /// One request with its retries (up to the response, not the streamed body: the per-object
    /// deadline bounds that), `MINIO_OPERATION_TIMEOUT_SECS`, default 300.
    pub operation_timeout: std::time::Duration,
}

impl ObjectStoreSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let endpoint = env.required(Setting::MinioEndpoint)?.trim().to_string();
        if endpoint.contains("://") {
            return Err(ConfigError::Invalid {
                name: Setting::MinioEndpoint.name(),
                reason: format!("{endpoint:?}: give host:port without a scheme (use MINIO_HTTPS_PROTOCOL for https)"),
            });
        }
        Ok(Self {
            endpoint,
            access_key: env.required_secret(Setting::MinioAccessKey)?,
            secret_key: env.required_secret(Setting::MinioSecretKey)?,
            https: env.flag(Setting::MinioHttpsProtocol, false)?,
            bucket: env
                .optional(Setting::MinioBucket)
                .unwrap_or_else(|| "code-challenge-data".into()),
            connect_timeout: seconds(env, Setting::MinioConnectTimeoutSecs, 10)?,
            read_timeout: seconds(env, Setting::MinioReadTimeoutSecs, 60)?,
            operation_timeout: seconds(env, Setting::MinioOperationTimeoutSecs, 300)?,
        })
    }

    /// Plain HTTP to `endpoint` with the default timeouts (tools and tests).
    pub fn plain(endpoint: &str, access_key: &str, secret_key: &str, bucket: &str) -> Self {
        Self {
            endpoint: endpoint.to_string(),
            access_key: Secret::new(access_key),
            secret_key: Secret::new(secret_key),
            https: false,
            bucket: bucket.to_string(),
            connect_timeout: std::time::Duration::from_secs(10),
            read_timeout: std::time::Duration::from_secs(60),
            operation_timeout: std::time::Duration::from_secs(300),
        }
    }

    /// The endpoint as a URL for the S3 client.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.endpoint)
    }
}

/// The two databases: the mapping database and the measurement database (which may be the same).
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub mapping_url: Secret,
    pub measurements_url: Secret,
    /// Session limits of the worker's connections.
    pub timeouts: DatabaseTimeouts,
}

/// Session limits the worker's connections run with (not the migrations': a migration of a large
/// table may take long, and not `query-cli`'s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseTimeouts {
    /// `statement_timeout`, `DATABASE_STATEMENT_TIMEOUT_SECS`, default 1800 (the `COPY` of a
    /// large object is one statement).
    pub statement: std::time::Duration,
    /// `lock_timeout`, `DATABASE_LOCK_TIMEOUT_SECS`, default 60.
    pub lock: std::time::Duration,
    /// `idle_in_transaction_session_timeout`, `DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECS`,
    /// default 300.
    pub idle_in_transaction: std::time::Duration,
}

impl Default for DatabaseTimeouts {
    fn default() -> Self {
        Self {
            statement: std::time::Duration::from_secs(1800),
            lock: std::time::Duration::from_secs(60),
            idle_in_transaction: std::time::Duration::from_secs(300),
        }
    }
}

impl DatabaseTimeouts {
    /// The `options` startup parameter that sets them.
    pub fn options(&self) -> String {
        format!(
            "-c statement_timeout={}ms -c lock_timeout={}ms -c idle_in_transaction_session_timeout={}ms",
            self.statement.as_millis(),
            self.lock.as_millis(),
            self.idle_in_transaction.as_millis()
        )
    }
}

impl DatabaseSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let mapping_url = env.required_secret(Setting::DatabaseUrl)?;
        let measurements_url = env
            .optional_secret(Setting::TimescaleDatabaseUrl)?
            .unwrap_or_else(|| mapping_url.clone());
        for (setting, url) in [
            (Setting::DatabaseUrl, &mapping_url),
            (Setting::TimescaleDatabaseUrl, &measurements_url),
        ] {
            let (rest, _) =
                crate::store::tls::split(url.expose()).map_err(|reason| ConfigError::Invalid {
                    name: setting.name(),
                    reason,
                })?;
            rest.parse::<tokio_postgres::Config>()
                .map_err(|e| ConfigError::Invalid {
                    name: setting.name(),
                    reason: format!("not a PostgreSQL connection string ({e})"),
                })?;
        }
        let d = DatabaseTimeouts::default();
        Ok(Self {
            mapping_url,
            measurements_url,
            timeouts: DatabaseTimeouts {
                statement: seconds(
                    env,
                    Setting::DatabaseStatementTimeoutSecs,
                    d.statement.as_secs(),
                )?,
                lock: seconds(env, Setting::DatabaseLockTimeoutSecs, d.lock.as_secs())?,
                idle_in_transaction: seconds(
                    env,
                    Setting::DatabaseIdleInTransactionTimeoutSecs,
                    d.idle_in_transaction.as_secs(),
                )?,
            },
        })
    }

    /// Whether both URLs name the same database.
    pub fn same_database(&self) -> bool {
        self.mapping_url == self.measurements_url
    }
}

/// Every setting the binaries read. The code reads settings only through these names ([`Env`]
/// takes a `Setting`), so the list that deployment files are checked against cannot fall behind
/// what the code reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Setting {
    MinioEndpoint,
    MinioAccessKey,
    MinioSecretKey,
    MinioHttpsProtocol,
    MinioBucket,
    DatabaseUrl,
    TimescaleDatabaseUrl,
    NatsUrl,
    NatsSubject,
    NatsStream,
    NatsConsumer,
    NatsDlqSubject,
    NatsAckWaitSecs,
    NatsMaxDeliver,
    NatsStreamReplicas,
    NatsUser,
    NatsPassword,
    NatsToken,
    NatsNkeySeed,
    NatsCreds,
    NatsTlsCaFile,
    NatsTlsCertFile,
    NatsTlsKeyFile,
    WorkerConcurrency,
    NaiveTimezone,
    CsvDelimiter,
    MetricsAddr,
    ShutdownGraceSecs,
    LogFormat,
    AnomalyDetection,
    AnomalySubjectPrefix,
    AnomalyStream,
    AnomalyLockTimeoutMs,
    MinioConnectTimeoutSecs,
    MinioReadTimeoutSecs,
    MinioOperationTimeoutSecs,
    DatabaseStatementTimeoutSecs,
    DatabaseLockTimeoutSecs,
    DatabaseIdleInTransactionTimeoutSecs,
    DatabasePoolSize,
    MaxObjectBytes,
    MaxDecompressionRatio,
    MaxRejectedRows,
    ObjectDeadlineSecs,
    /// Read by the log filter (`tracing-subscriber`) from the process environment, which an env
    /// file also fills.
    RustLog,
}

impl Setting {
    pub const ALL: [Setting; 45] = [
        Setting::MinioEndpoint,
        Setting::MinioAccessKey,
        Setting::MinioSecretKey,
        Setting::MinioHttpsProtocol,
        Setting::MinioBucket,
        Setting::DatabaseUrl,
        Setting::TimescaleDatabaseUrl,
        Setting::NatsUrl,
        Setting::NatsSubject,
        Setting::NatsStream,
        Setting::NatsConsumer,
        Setting::NatsDlqSubject,
        Setting::NatsAckWaitSecs,
        Setting::NatsMaxDeliver,
        Setting::NatsStreamReplicas,
        Setting::NatsUser,
        Setting::NatsPassword,
        Setting::NatsToken,
        Setting::NatsNkeySeed,
        Setting::NatsCreds,
        Setting::NatsTlsCaFile,
        Setting::NatsTlsCertFile,
        Setting::NatsTlsKeyFile,
        Setting::WorkerConcurrency,
        Setting::NaiveTimezone,
        Setting::CsvDelimiter,
        Setting::MetricsAddr,
        Setting::ShutdownGraceSecs,
        Setting::LogFormat,
        Setting::AnomalyDetection,
        Setting::AnomalySubjectPrefix,
        Setting::AnomalyStream,
        Setting::AnomalyLockTimeoutMs,
        Setting::MinioConnectTimeoutSecs,
        Setting::MinioReadTimeoutSecs,
        Setting::MinioOperationTimeoutSecs,
        Setting::DatabaseStatementTimeoutSecs,
        Setting::DatabaseLockTimeoutSecs,
        Setting::DatabaseIdleInTransactionTimeoutSecs,
        Setting::DatabasePoolSize,
        Setting::MaxObjectBytes,
        Setting::MaxDecompressionRatio,
        Setting::MaxRejectedRows,
        Setting::ObjectDeadlineSecs,
        Setting::RustLog,
    ];

    /// The environment variable.
    pub const fn name(self) -> &'static str {
        match self {
            Setting::MinioEndpoint => "MINIO_ENDPOINT",
            Setting::MinioAccessKey => "MINIO_ACCESS_KEY",
            Setting::MinioSecretKey => "MINIO_SECRET_KEY",
            Setting::MinioHttpsProtocol => "MINIO_HTTPS_PROTOCOL",
            Setting::MinioBucket => "MINIO_BUCKET",
            Setting::DatabaseUrl => "DATABASE_URL",
            Setting::TimescaleDatabaseUrl => "TIMESCALE_DATABASE_URL",
            Setting::NatsUrl => "NATS_URL",
            Setting::NatsSubject => "NATS_SUBJECT",
            Setting::NatsStream => "NATS_STREAM",
            Setting::NatsConsumer => "NATS_CONSUMER",
            Setting::NatsDlqSubject => "NATS_DLQ_SUBJECT",
            Setting::NatsAckWaitSecs => "NATS_ACK_WAIT_SECS",
            Setting::NatsMaxDeliver => "NATS_MAX_DELIVER",
            Setting::NatsStreamReplicas => "NATS_STREAM_REPLICAS",
            Setting::NatsUser => "NATS_USER",
            Setting::NatsPassword => "NATS_PASSWORD",
            Setting::NatsToken => "NATS_TOKEN",
            Setting::NatsNkeySeed => "NATS_NKEY_SEED",
            Setting::NatsCreds => "NATS_CREDS",
            Setting::NatsTlsCaFile => "NATS_TLS_CA_FILE",
            Setting::NatsTlsCertFile => "NATS_TLS_CERT_FILE",
            Setting::NatsTlsKeyFile => "NATS_TLS_KEY_FILE",
            Setting::WorkerConcurrency => "WORKER_CONCURRENCY",
            Setting::NaiveTimezone => "NAIVE_TIMEZONE",
            Setting::CsvDelimiter => "CSV_DELIMITER",
            Setting::MetricsAddr => "METRICS_ADDR",
            Setting::ShutdownGraceSecs => "SHUTDOWN_GRACE_SECS",
            Setting::LogFormat => "LOG_FORMAT",
            Setting::AnomalyDetection => "ANOMALY_DETECTION",
            Setting::AnomalySubjectPrefix => "ANOMALY_SUBJECT_PREFIX",
            Setting::AnomalyStream => "ANOMALY_STREAM",
            Setting::AnomalyLockTimeoutMs => "ANOMALY_LOCK_TIMEOUT_MS",
            Setting::MinioConnectTimeoutSecs => "MINIO_CONNECT_TIMEOUT_SECS",
            Setting::MinioReadTimeoutSecs => "MINIO_READ_TIMEOUT_SECS",
            Setting::MinioOperationTimeoutSecs => "MINIO_OPERATION_TIMEOUT_SECS",
            Setting::DatabaseStatementTimeoutSecs => "DATABASE_STATEMENT_TIMEOUT_SECS",
            Setting::DatabaseLockTimeoutSecs => "DATABASE_LOCK_TIMEOUT_SECS",
            Setting::DatabaseIdleInTransactionTimeoutSecs => {
                "DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECS"
            }
            Setting::DatabasePoolSize => "DATABASE_POOL_SIZE",
            Setting::MaxObjectBytes => "MAX_OBJECT_BYTES",
            Setting::MaxDecompressionRatio => "MAX_DECOMPRESSION_RATIO",
            Setting::MaxRejectedRows => "MAX_REJECTED_ROWS",
            Setting::ObjectDeadlineSecs => "OBJECT_DEADLINE_SECS",
            Setting::RustLog => "RUST_LOG",
        }
    }

    /// Whether the commands that read its group cannot do without it.
    pub const fn required(self) -> bool {
        matches!(
            self,
            Setting::MinioEndpoint
                | Setting::MinioAccessKey
                | Setting::MinioSecretKey
                | Setting::DatabaseUrl
        )
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// NATS JetStream names (used by `sensors-worker run` and `backfill`).
#[derive(Debug, Clone)]
pub struct NatsSettings {
    pub url: Secret,
    pub subject: String,
    pub stream: String,
    pub consumer: String,
    pub dlq_subject: String,
    /// How long a delivered event may go without an ack or progress before JetStream redelivers
    /// it, `NATS_ACK_WAIT_SECS`, default 30.
    pub ack_wait: std::time::Duration,
    /// Deliveries of one event before it is dead-lettered, `NATS_MAX_DELIVER`, default 5.
    pub max_deliver: i64,
    /// Replicas of every stream in a JetStream cluster, `NATS_STREAM_REPLICAS`, default 1 (3 in a
    /// three-node cluster: the streams survive the loss of a node).
    pub replicas: usize,
    /// How the connection proves who it is, and its TLS.
    pub auth: NatsAuth,
}

/// NATS credentials and TLS — one kind of credentials: `NATS_USER` + `NATS_PASSWORD` (or
/// `NATS_PASSWORD_FILE`), or `NATS_TOKEN` (or `NATS_TOKEN_FILE`), or an nkey seed
/// (`NATS_NKEY_SEED_FILE`, or `NATS_NKEY_SEED`), or a creds file with a user JWT and its seed
/// (`NATS_CREDS_FILE`, or its text in `NATS_CREDS`; what `nsc` writes for operator mode);
/// `NATS_TLS_CA_FILE` (PEM; makes TLS required),
/// `NATS_TLS_CERT_FILE` + `NATS_TLS_KEY_FILE` (a client certificate). `NATS_URL` may list several
/// servers, comma-separated; credentials in a URL (`nats://user:pass@host`) work too.
#[derive(Debug, Clone, Default)]
pub struct NatsAuth {
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub token: Option<Secret>,
    pub nkey_seed: Option<Secret>,
    pub creds: Option<Secret>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl NatsAuth {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let auth = Self {
            user: env.optional(Setting::NatsUser),
            password: env.optional_secret(Setting::NatsPassword)?,
            token: env.optional_secret(Setting::NatsToken)?,
            nkey_seed: env.optional_secret(Setting::NatsNkeySeed)?,
            creds: env.optional_secret(Setting::NatsCreds)?,
            tls_ca: env.optional(Setting::NatsTlsCaFile).map(PathBuf::from),
            tls_cert: env.optional(Setting::NatsTlsCertFile).map(PathBuf::from),
            tls_key: env.optional(Setting::NatsTlsKeyFile).map(PathBuf::from),
        };
        let invalid = |setting: Setting, reason: &str| ConfigError::Invalid {
            name: setting.name(),
            reason: reason.into(),
        };
        if auth.user.is_some() != auth.password.is_some() {
            return Err(invalid(
                Setting::NatsPassword,
                "NATS_USER and NATS_PASSWORD go together",
            ));
        }
        let kinds: Vec<(Setting, &str)> = [
            (
                auth.user.is_some(),
                Setting::NatsUser,
                "NATS_USER/NATS_PASSWORD",
            ),
            (auth.token.is_some(), Setting::NatsToken, "NATS_TOKEN"),
            (
                auth.nkey_seed.is_some(),
                Setting::NatsNkeySeed,
                "NATS_NKEY_SEED",
            ),
            (auth.creds.is_some(), Setting::NatsCreds, "NATS_CREDS"),
        ]
        .into_iter()
        .filter_map(|(given, setting, name)| given.then_some((setting, name)))
        .collect();
        if let [(_, first), (second, name), ..] = kinds[..] {
            return Err(invalid(
                second,
                &format!("give one kind of NATS credentials, not {first} and {name}"),
            ));
        }
        if let Some(seed) = &auth.nkey_seed {
            if !seed.expose().starts_with("SU") {
                return Err(invalid(
                    Setting::NatsNkeySeed,
                    "is not a user nkey seed (it starts with \"SU\")",
                ));
            }
        }
        if let Some(creds) = &auth.creds {
            if !creds.expose().contains("BEGIN NATS USER JWT") {
                return Err(invalid(
                    Setting::NatsCreds,
                    "is not a NATS creds file (no \"BEGIN NATS USER JWT\" block)",
                ));
            }
        }
        if auth.tls_cert.is_some() != auth.tls_key.is_some() {
            return Err(invalid(
                Setting::NatsTlsKeyFile,
                "NATS_TLS_CERT_FILE and NATS_TLS_KEY_FILE go together",
            ));
        }
        Ok(auth)
    }
}

impl NatsSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            url: env
                .optional_secret(Setting::NatsUrl)?
                .unwrap_or_else(|| Secret::new("nats://127.0.0.1:4222")),
            subject: env
                .optional(Setting::NatsSubject)
                .unwrap_or_else(|| "minio.events".into()),
            stream: env
                .optional(Setting::NatsStream)
                .unwrap_or_else(|| "SENSOR_EVENTS".into()),
            consumer: env
                .optional(Setting::NatsConsumer)
                .unwrap_or_else(|| "sensor-ingest".into()),
            dlq_subject: env
                .optional(Setting::NatsDlqSubject)
                .unwrap_or_else(|| "sensors.dlq".into()),
            ack_wait: std::time::Duration::from_secs(positive(env, Setting::NatsAckWaitSecs, 30)?),
            max_deliver: positive(env, Setting::NatsMaxDeliver, 5)? as i64,
            replicas: match positive(env, Setting::NatsStreamReplicas, 1)? {
                n @ 1..=5 => n as usize,
                n => {
                    return Err(ConfigError::Invalid {
                        name: Setting::NatsStreamReplicas.name(),
                        reason: format!("{n}: JetStream allows 1 to 5 replicas"),
                    })
                }
            },
            auth: NatsAuth::from_env(env)?,
        })
    }
}

/// A positive number of seconds.
fn seconds(env: &Env, setting: Setting, default: u64) -> Result<std::time::Duration, ConfigError> {
    positive(env, setting, default).map(std::time::Duration::from_secs)
}

fn positive(env: &Env, setting: Setting, default: u64) -> Result<u64, ConfigError> {
    match env.parsed(setting, default)? {
        0 => Err(ConfigError::Invalid {
            name: setting.name(),
            reason: "must be at least 1".into(),
        }),
        n => Ok(n),
    }
}

impl NatsSettings {
    /// The stream that keeps dead letters: the events stream's name with `_DLQ`.
    pub fn dlq_stream(&self) -> String {
        format!("{}_DLQ", self.stream)
    }

    /// The stream that keeps JetStream's max-deliveries advisories for the consumer (events whose
    /// last delivery went unsettled): the events stream's name with `_STRANDED`.
    pub fn stranded_stream(&self) -> String {
        format!("{}_STRANDED", self.stream)
    }

    /// The subject JetStream publishes the consumer's max-deliveries advisories on.
    pub fn stranded_subject(&self) -> String {
        format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
            self.stream, self.consumer
        )
    }

    /// The durable consumer every worker shares on [`Self::stranded_stream`].
    pub fn stranded_consumer(&self) -> String {
        format!("{}-stranded", self.consumer)
    }
}

/// How CSV objects are read (SPEC §2).
#[derive(Debug, Clone, Copy)]
pub struct ContractSettings {
    /// Field delimiter, `CSV_DELIMITER`, default `;`.
    pub delimiter: u8,
    /// Zone for timestamps without an offset, `NAIVE_TIMEZONE`, default `Europe/Berlin`.
    pub naive_timezone: chrono_tz::Tz,
}

impl Default for ContractSettings {
    fn default() -> Self {
        Self {
            delimiter: b';',
            naive_timezone: chrono_tz::Europe::Berlin,
        }
    }
}

impl ContractSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let delimiter = match env.optional(Setting::CsvDelimiter) {
            None => b';',
            Some(d) if d == "\\t" || d == "\t" => b'\t',
            Some(d)
                if d.len() == 1
                    && d.is_ascii()
                    && !matches!(d.as_bytes()[0], b'"' | b'\r' | b'\n') =>
            {
                d.as_bytes()[0]
            }
            Some(d) => {
                return Err(ConfigError::Invalid {
                    name: Setting::CsvDelimiter.name(),
                    reason: format!(
                        "{d:?}: expected one ASCII character other than a quote or newline"
                    ),
                })
            }
        };
        let naive_timezone = match env.optional(Setting::NaiveTimezone) {
            None => chrono_tz::Europe::Berlin,
            Some(tz) => tz.trim().parse().map_err(|_| ConfigError::Invalid {
                name: Setting::NaiveTimezone.name(),
                reason: format!(
                    "{tz:?} is not an IANA time zone name such as Europe/Berlin or UTC"
                ),
            })?,
        };
        Ok(Self {
            delimiter,
            naive_timezone,
        })
    }
}

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

/// Anomaly detection as data arrives (see `crate::alerts`).
#[derive(Debug, Clone)]
pub struct AnomalySettings {
    /// `ANOMALY_DETECTION=on|off`, default on: whether ingestion queues detection and workers run it.
    pub enabled: bool,
    /// Subjects are `<prefix>.<kind>`, `ANOMALY_SUBJECT_PREFIX`, default `sensors.anomalies`.
    pub subject_prefix: String,
    /// The stream that keeps them, `ANOMALY_STREAM`, default `SENSOR_ANOMALIES`.
    pub stream: String,
    /// How long a detection waits for a lock before it gives up and retries later,
    /// `ANOMALY_LOCK_TIMEOUT_MS`, default 5000.
    pub lock_timeout: std::time::Duration,
}

impl AnomalySettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let enabled = match env
            .optional(Setting::AnomalyDetection)
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("on") => true,
            Some("off") => false,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: Setting::AnomalyDetection.name(),
                    reason: format!("{other:?} is neither on nor off"),
                })
            }
        };
        let subject_prefix = env
            .optional(Setting::AnomalySubjectPrefix)
            .unwrap_or_else(|| "sensors.anomalies".into());
        if subject_prefix.is_empty()
            || subject_prefix
                .split('.')
                .any(|t| t.is_empty() || t.contains(['*', '>', ' ']))
        {
            return Err(ConfigError::Invalid {
                name: Setting::AnomalySubjectPrefix.name(),
                reason: format!("{subject_prefix:?} is not a NATS subject without wildcards"),
            });
        }
        Ok(Self {
            enabled,
            subject_prefix,
            stream: env
                .optional(Setting::AnomalyStream)
                .unwrap_or_else(|| "SENSOR_ANOMALIES".into()),
            lock_timeout: std::time::Duration::from_millis(positive(
                env,
                Setting::AnomalyLockTimeoutMs,
                5000,
            )?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_required_setting_names_the_variable() {
        let err = DatabaseSettings::from_env(&Env::from_map([("X", "y")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing required setting DATABASE_URL: set it in the environment, in config/.env, or as DATABASE_URL_FILE"
        );
    }

    #[test]
    fn timescale_url_defaults_to_database_url() {
        let env = Env::from_map([("DATABASE_URL", "postgres://u:pw@localhost/db")]);
        let db = DatabaseSettings::from_env(&env).unwrap();
        assert_eq!(db.measurements_url.expose(), "postgres://u:pw@localhost/db");
        assert!(db.same_database());
    }

    #[test]
    fn secrets_come_from_files_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cr3t\n").unwrap();
        let env = Env::from_map([
            ("MINIO_ENDPOINT", "127.0.0.1:9000"),
            ("MINIO_ACCESS_KEY", "minio"),
            ("MINIO_SECRET_KEY_FILE", path.to_str().unwrap()),
        ]);
        let s = ObjectStoreSettings::from_env(&env).unwrap();
        assert_eq!(s.secret_key.expose(), "s3cr3t");
        let printed = format!("{s:?}");
        assert!(!printed.contains("s3cr3t"), "{printed}");
        assert!(!printed.contains("minio\""), "{printed}");
        assert_eq!(s.bucket, "code-challenge-data");
        assert_eq!(s.url(), "http://127.0.0.1:9000");
    }

    #[test]
    fn secret_given_twice_is_an_error() {
        let env = Env::from_map([
            ("DATABASE_URL", "postgres://a/b"),
            ("DATABASE_URL_FILE", "/x"),
        ]);
        let err = DatabaseSettings::from_env(&env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "both DATABASE_URL and DATABASE_URL_FILE are set: set only one"
        );
    }

    #[test]
    fn invalid_values_are_named() {
        let env = Env::from_map([("NAIVE_TIMEZONE", "Mars/Olympus")]);
        let err = ContractSettings::from_env(&env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for NAIVE_TIMEZONE: \"Mars/Olympus\" is not an IANA time zone name such \
             as Europe/Berlin or UTC"
        );
        let env = Env::from_map([("WORKER_CONCURRENCY", "many")]);
        let err = WorkerSettings::from_env(&env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for WORKER_CONCURRENCY: \"many\": invalid digit found in string"
        );
        let env = Env::from_map([
            ("MINIO_ENDPOINT", "http://minio:9000"),
            ("MINIO_ACCESS_KEY", "a"),
            ("MINIO_SECRET_KEY", "b"),
        ]);
        let err = ObjectStoreSettings::from_env(&env).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value for MINIO_ENDPOINT: \"http://minio:9000\": give host:port without a \
             scheme (use MINIO_HTTPS_PROTOCOL for https)"
        );
    }

    #[test]
    fn nats_credentials_of_one_kind_only_and_checked_for_their_shape() {
        let err = |vars: &[(&str, &str)]| {
            NatsAuth::from_env(&Env::from_map(vars.to_vec()))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(&[("NATS_TOKEN", "t"), ("NATS_NKEY_SEED", "SUABC")]),
            "invalid value for NATS_NKEY_SEED: give one kind of NATS credentials, not NATS_TOKEN and NATS_NKEY_SEED"
        );
        assert_eq!(
            err(&[("NATS_USER", "u"), ("NATS_PASSWORD", "p"), ("NATS_CREDS", "x")]),
            "invalid value for NATS_CREDS: give one kind of NATS credentials, not NATS_USER/NATS_PASSWORD and NATS_CREDS"
        );
        assert_eq!(
            err(&[("NATS_NKEY_SEED", "UABC")]),
            "invalid value for NATS_NKEY_SEED: is not a user nkey seed (it starts with \"SU\")"
        );
        assert_eq!(
            err(&[("NATS_CREDS", "eyJ0eXAiOiJKV1Qi")]),
            "invalid value for NATS_CREDS: is not a NATS creds file (no \"BEGIN NATS USER JWT\" block)"
        );
        let auth = NatsAuth::from_env(&Env::from_map([("NATS_NKEY_SEED", "SUAB")])).unwrap();
        assert_eq!(
            auth.nkey_seed.map(|s| s.expose().to_string()),
            Some("SUAB".into())
        );
        assert!(!format!(
            "{:?}",
            NatsAuth::from_env(&Env::from_map([("NATS_NKEY_SEED", "SUAB")]))
        )
        .contains("SUAB"));
    }
}
