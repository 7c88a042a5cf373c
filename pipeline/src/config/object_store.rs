//! The object store's settings (MinIO).

use super::{seconds, ConfigError, Env, Secret, Setting};

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
