//! The two databases: their connection strings (with libpq's TLS parameters taken out, which
//! tokio-postgres does not parse: `store::tls` turns them into a connector) and the session
//! limits of the worker's connections.

use std::path::PathBuf;

use super::{seconds, ConfigError, Env, Secret, Setting};

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
            let (rest, _) = split_tls(url.expose()).map_err(|reason| ConfigError::Invalid {
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

/// What `sslmode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => TlsMode::Disable,
            "allow" | "prefer" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            other => {
                return Err(format!(
                "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
            ))
            }
        })
    }
}

/// The TLS parameters of a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub mode: TlsMode,
    pub root_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The connection string without its TLS parameters, and them. Both forms libpq takes: a URL
/// (`postgres://…?sslmode=verify-full&sslrootcert=/ca.pem`) and `key=value` words.
pub fn split_tls(url: &str) -> Result<(String, TlsParams), String> {
    let mut params = TlsParams {
        mode: TlsMode::Prefer,
        root_cert: None,
        cert: None,
        key: None,
    };
    let mut take = |key: &str, value: String| -> Result<bool, String> {
        match key {
            "sslmode" => params.mode = value.parse()?,
            "sslrootcert" => params.root_cert = Some(value.into()),
            "sslcert" => params.cert = Some(value.into()),
            "sslkey" => params.key = Some(value.into()),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let value = percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned();
                    if !take(k, value)? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for word in url.split_whitespace() {
            let (k, v) = word.split_once('=').unwrap_or((word, ""));
            let value = v.trim_matches('\'').to_string();
            if !take(k.trim(), value)? {
                kept.push(word);
            }
        }
        kept.join(" ")
    };
    Ok((rest, params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn tls_parameters_are_taken_out_of_both_forms() {
        let (rest, p) = split_tls(
            "postgres://u@db:5432/x?sslmode=verify-full&application_name=w&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@db:5432/x?application_name=w");
        assert_eq!(p.mode, TlsMode::VerifyFull);
        assert_eq!(p.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        let (rest, p) =
            split_tls("host=db user=u sslmode=require sslcert=/c.pem sslkey=/k.pem").unwrap();
        assert_eq!(rest, "host=db user=u");
        assert_eq!(
            (p.mode, p.cert, p.key),
            (
                TlsMode::Require,
                Some("/c.pem".into()),
                Some("/k.pem".into())
            )
        );
        assert_eq!(
            split_tls("postgres://db/x").unwrap().1.mode,
            TlsMode::Prefer
        );
        assert_eq!(
            split_tls("postgres://db/x?sslmode=sometimes").unwrap_err(),
            "sslmode \"sometimes\" is not one of disable, prefer, require, verify-ca, verify-full"
        );
    }
}
