//! Every setting the binaries read, written once: the variant, the environment variable. The
//! code reads settings only through these names ([`Env`](super::Env) takes a `Setting`), so the
//! list deployment files are checked against cannot fall behind what the code reads.

use std::fmt;

/// Declares [`Setting`], its [`Setting::ALL`] and [`Setting::name`] from one table.
macro_rules! settings {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        /// One setting the binaries read; [`Setting::name`] is its environment variable.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Setting {
            $($(#[$doc])* $variant,)*
        }

        impl Setting {
            /// Every setting, in the table's order.
            pub const ALL: [Setting; [$(stringify!($variant)),*].len()] = [$(Setting::$variant),*];

            /// The environment variable.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Setting::$variant => $name,)*
                }
            }
        }
    };
}

settings! {
    MinioEndpoint => "MINIO_ENDPOINT",
    MinioAccessKey => "MINIO_ACCESS_KEY",
    MinioSecretKey => "MINIO_SECRET_KEY",
    MinioHttpsProtocol => "MINIO_HTTPS_PROTOCOL",
    MinioBucket => "MINIO_BUCKET",
    DatabaseUrl => "DATABASE_URL",
    TimescaleDatabaseUrl => "TIMESCALE_DATABASE_URL",
    NatsUrl => "NATS_URL",
    NatsSubject => "NATS_SUBJECT",
    NatsStream => "NATS_STREAM",
    NatsConsumer => "NATS_CONSUMER",
    NatsDlqSubject => "NATS_DLQ_SUBJECT",
    NatsAckWaitSecs => "NATS_ACK_WAIT_SECS",
    NatsMaxDeliver => "NATS_MAX_DELIVER",
    NatsStreamReplicas => "NATS_STREAM_REPLICAS",
    NatsUser => "NATS_USER",
    NatsPassword => "NATS_PASSWORD",
    NatsToken => "NATS_TOKEN",
    NatsNkeySeed => "NATS_NKEY_SEED",
    NatsCreds => "NATS_CREDS",
    NatsTlsCaFile => "NATS_TLS_CA_FILE",
    NatsTlsCertFile => "NATS_TLS_CERT_FILE",
    NatsTlsKeyFile => "NATS_TLS_KEY_FILE",
    WorkerConcurrency => "WORKER_CONCURRENCY",
    NaiveTimezone => "NAIVE_TIMEZONE",
    CsvDelimiter => "CSV_DELIMITER",
    MetricsAddr => "METRICS_ADDR",
    ShutdownGraceSecs => "SHUTDOWN_GRACE_SECS",
    LogFormat => "LOG_FORMAT",
    AnomalyDetection => "ANOMALY_DETECTION",
    AnomalySubjectPrefix => "ANOMALY_SUBJECT_PREFIX",
    AnomalyStream => "ANOMALY_STREAM",
    AnomalyLockTimeoutMs => "ANOMALY_LOCK_TIMEOUT_MS",
    MinioConnectTimeoutSecs => "MINIO_CONNECT_TIMEOUT_SECS",
    MinioReadTimeoutSecs => "MINIO_READ_TIMEOUT_SECS",
    MinioOperationTimeoutSecs => "MINIO_OPERATION_TIMEOUT_SECS",
    DatabaseStatementTimeoutSecs => "DATABASE_STATEMENT_TIMEOUT_SECS",
    DatabaseLockTimeoutSecs => "DATABASE_LOCK_TIMEOUT_SECS",
    DatabaseIdleInTransactionTimeoutSecs => "DATABASE_IDLE_IN_TRANSACTION_TIMEOUT_SECS",
    DatabasePoolSize => "DATABASE_POOL_SIZE",
    MaxObjectBytes => "MAX_OBJECT_BYTES",
    MaxDecompressionRatio => "MAX_DECOMPRESSION_RATIO",
    MaxRejectedRows => "MAX_REJECTED_ROWS",
    ObjectDeadlineSecs => "OBJECT_DEADLINE_SECS",
    /// Read by the log filter (`tracing-subscriber`) from the process environment, which an env
    /// file also fills.
    RustLog => "RUST_LOG",
}

impl Setting {
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
