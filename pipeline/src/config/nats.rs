//! NATS and JetStream: where, which names, and who the connection is.

use std::path::PathBuf;

use super::{positive, ConfigError, Env, Secret, Setting};

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
