//! Anomaly detection as data arrives.

use super::{positive, ConfigError, Env, Setting};

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
