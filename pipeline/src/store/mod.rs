//! The databases: connection pools, migrations, and the writes one object makes.
//!
//! Mapping objects (and the ledger entries of ignored keys) go to the mapping database
//! (`DATABASE_URL`); measurement objects go to the measurement database (`TIMESCALE_DATABASE_URL`,
//! which may be the same). Each database carries its own ledger and quarantine, so an object's rows,
//! rejected rows and ledger entry always commit in one transaction.

#[cfg(feature = "ingest")]
pub mod copy;
pub mod ledger;
pub mod measurements;
#[cfg(feature = "ingest")]
pub mod migrate;
#[cfg(feature = "ingest")]
pub mod rollup;
pub mod tls;
#[cfg(feature = "ingest")]
pub mod versions;
#[cfg(feature = "ingest")]
pub mod write;

use std::time::Duration;

#[cfg(feature = "ingest")]
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use thiserror::Error;

#[cfg(feature = "ingest")]
use crate::config::DatabaseSettings;
use crate::contract::Dataset;

/// A database could not be reached or refused a statement.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{database} database: {}", describe(source))]
    Postgres {
        database: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[cfg(feature = "ingest")]
    #[error(
        "{database} database: no connection available: {}",
        describe_pool(source)
    )]
    Pool {
        database: &'static str,
        #[source]
        source: deadpool_postgres::PoolError,
    },
    #[error("invalid connection string for the {database} database: {reason}")]
    Config {
        database: &'static str,
        reason: String,
    },
    #[cfg(feature = "ingest")]
    #[error("migrating the {database} database: {}", migration_failure(source))]
    Migration {
        database: &'static str,
        #[source]
        source: refinery::Error,
    },
}

impl StoreError {
    /// Whether the database refused the statement for what the data is, so that trying again can
    /// only fail the same way: the object fails at once (ledger `failed`, a dead letter) instead
    /// of being retried until its deliveries are used up. By SQLSTATE class:
    ///
    /// - permanent: `22` data exception (a value out of range, bytes text cannot hold), `23`
    ///   integrity constraint violation (a `CHECK` or foreign key an operator added) except
    ///   `23505`/`23P01` (a unique or exclusion conflict can be a race with a concurrent writer),
    ///   `54` program limit exceeded (a row too big), `0A` feature not supported, and `42`
    ///   syntax error or access rule violation except `42501` (privileges), `42P01` (no such
    ///   table) and `42703` (no such column): those are a deployment not finished yet (roles,
    ///   migrations) and pass once it is;
    /// - transient: everything else — `08` connection, `40` serialization failure and deadlock,
    ///   `53` insufficient resources (disk full, too many connections), `55` object in use (lock
    ///   timeout), `57` operator intervention (shutdown, statement timeout), `58` system error,
    ///   `XX` internal — and any error without a SQLSTATE (the connection broke, no connection
    ///   available).
    pub fn is_permanent(&self) -> bool {
        let StoreError::Postgres { source, .. } = self else {
            return false;
        };
        let Some(code) = source.code() else {
            return false;
        };
        permanent_sqlstate(code.code())
    }
}

/// A PostgreSQL error in one line: the server's message and SQLSTATE when the server refused a
/// statement (the error's own display says only "db error"), the error itself otherwise.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        // With the cause: "error performing TLS handshake" alone says nothing.
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !text.contains(&cause_text) {
                    text.push_str(": ");
                    text.push_str(&cause_text);
                }
                source = cause.source();
            }
            text
        }
    }
}

/// A failed migration as an operator needs it: which one, and the server's message and hint
/// (refinery's own text says only "`error applying migration V1__x`, `db error`").
#[cfg(feature = "ingest")]
fn migration_failure(e: &refinery::Error) -> String {
    let db = std::iter::successors(std::error::Error::source(e), |e| e.source())
        .find_map(|e| e.downcast_ref::<tokio_postgres::Error>())
        .and_then(|e| e.as_db_error());
    match (e.kind(), db) {
        (refinery::error::Kind::Connection(what, _), Some(db)) => {
            let mut text = format!("{what}: {} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(hint) = db.hint() {
                text.push_str("; hint: ");
                text.push_str(hint);
            }
            text
        }
        _ => e.to_string(),
    }
}

#[cfg(feature = "ingest")]
fn describe_pool(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(pg) => describe(pg),
        other => other.to_string(),
    }
}

fn permanent_sqlstate(code: &str) -> bool {
    match code.get(..2) {
        Some("22" | "54" | "0A") => true,
        Some("23") => !matches!(code, "23505" | "23P01"),
        Some("42") => !matches!(code, "42501" | "42P01" | "42703"),
        _ => false,
    }
}

/// Connection pools for the mapping and the measurement database.
#[cfg(feature = "ingest")]
#[derive(Clone)]
pub struct Databases {
    mapping: Pool,
    measurements: Pool,
    /// Each database's TLS connector, for cancelling a statement ([`Databases::cancel`]).
    tls: (tls::MakeRustlsConnect, tls::MakeRustlsConnect),
    same: bool,
}

#[cfg(feature = "ingest")]
impl Databases {
    /// Creates the pools (connections are opened lazily, up to `max_connections` per database).
    pub fn connect(
        settings: &DatabaseSettings,
        max_connections: usize,
    ) -> Result<Self, StoreError> {
        let options = settings.timeouts.options();
        let (mapping, mapping_tls) = pool(
            settings.mapping_url.expose(),
            "mapping",
            max_connections,
            &options,
        )?;
        let (measurements, measurements_tls) = if settings.same_database() {
            (mapping.clone(), mapping_tls.clone())
        } else {
            pool(
                settings.measurements_url.expose(),
                "measurements",
                max_connections,
                &options,
            )?
        };
        Ok(Self {
            mapping,
            measurements,
            tls: (mapping_tls, measurements_tls),
            same: settings.same_database(),
        })
    }

    /// How many connections each database still allows its ordinary roles (`max_connections`
    /// minus the reserved ones minus those open now), the smallest of both: a pool larger than
    /// that will meet "too many clients" under load.
    pub async fn spare_connections(&self) -> Result<i64, StoreError> {
        let mut spare = i64::MAX;
        for dataset in [Dataset::Mapping, Dataset::Measurements] {
            let client = self.client(dataset).await?;
            let row = client
                .query_one(
                    "SELECT current_setting('max_connections')::int
                          - current_setting('superuser_reserved_connections')::int
                          - (SELECT count(*)::int FROM pg_stat_activity WHERE backend_type = 'client backend')",
                    &[],
                )
                .await
                .db(dataset)?;
            spare = spare.min(row.get::<_, i32>(0) as i64 + 1); // this connection is ours
        }
        Ok(spare)
    }

    /// Whether mapping and measurements are one database (one ledger to read, not two).
    pub fn same_database(&self) -> bool {
        self.same
    }

    /// Checks that both databases answer (for readiness probes).
    pub async fn ping(&self) -> Result<(), StoreError> {
        for dataset in [Dataset::Mapping, Dataset::Measurements] {
            self.client(dataset)
                .await?
                .simple_query("SELECT 1")
                .await
                .db(dataset)?;
        }
        Ok(())
    }

    /// The pool of the database that holds `dataset` (and its ledger and quarantine).
    pub fn pool(&self, dataset: Dataset) -> &Pool {
        match dataset {
            Dataset::Mapping => &self.mapping,
            Dataset::Measurements => &self.measurements,
        }
    }

    /// Asks the database of `dataset` to cancel the statement running on the connection of
    /// `token` (a deadline passed), through the same TLS settings as the connection; whether it
    /// did is seen on that connection.
    pub async fn cancel(&self, dataset: Dataset, token: &tokio_postgres::CancelToken) {
        let tls = match dataset {
            Dataset::Mapping => &self.tls.0,
            Dataset::Measurements => &self.tls.1,
        };
        let _ = token.cancel_query(tls.clone()).await;
    }

    pub async fn client(&self, dataset: Dataset) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool(dataset)
            .get()
            .await
            .map_err(|source| StoreError::Pool {
                database: database_name(dataset),
                source,
            })
    }
}

/// How the database of a dataset is called in messages.
pub fn database_name(dataset: Dataset) -> &'static str {
    match dataset {
        Dataset::Mapping => "mapping",
        Dataset::Measurements => "measurement",
    }
}

/// Parses a connection string (TLS parameters included, see [`tls`]), adding a connect timeout
/// if it has none; returns it with the TLS connector it asks for.
pub fn pg_config(
    url: &str,
    database: &'static str,
) -> Result<(tokio_postgres::Config, tls::MakeRustlsConnect), StoreError> {
    let (mut config, connector) =
        tls::connector(url).map_err(|reason| StoreError::Config { database, reason })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    if config.get_application_name().is_none() {
        config.application_name("sensor-pipeline");
    }
    Ok((config, connector))
}

#[cfg(feature = "ingest")]
fn pool(
    url: &str,
    database: &'static str,
    max: usize,
    options: &str,
) -> Result<(Pool, tls::MakeRustlsConnect), StoreError> {
    let (mut config, connector) = pg_config(url, database)?;
    // JIT off unless the URL's own `options` say otherwise; the session limits after those.
    // The worker's statements are index-driven and short, but on tables not yet analyzed (a
    // backfill into a fresh database) the planner's estimates put some above `jit_above_cost`:
    // in `bench-ingest`'s sparsest shape the daily rollup's trigger was compiled in 27 of its
    // 72 calls (0.25 s); where an estimate passes `jit_optimize_above_cost`, one call compiled
    // for 0.17 s and ran for 0.18 s.
    let options = match config.get_options() {
        Some(own) if !own.is_empty() => format!("-c jit=off {own} {options}"),
        _ => format!("-c jit=off {options}"),
    };
    config.options(&options);
    let manager = Manager::from_config(
        config,
        connector.clone(),
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .post_create(deadpool_postgres::Hook::async_fn(|client, _| {
            Box::pin(async move {
                client
                    .batch_execute(write::CREATE_STAGING)
                    .await
                    .map_err(deadpool_postgres::HookError::Backend)
            })
        }))
        .max_size(max.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(60)))
        .create_timeout(Some(Duration::from_secs(15)))
        .build()
        .map(|pool| (pool, connector))
        .map_err(|e| StoreError::Config {
            database,
            reason: e.to_string(),
        })
}

/// Extension to attach the database name to driver errors.
#[cfg(feature = "ingest")]
pub(crate) trait PgResultExt<T> {
    fn db(self, dataset: Dataset) -> Result<T, StoreError>;
}

#[cfg(feature = "ingest")]
impl<T> PgResultExt<T> for Result<T, tokio_postgres::Error> {
    fn db(self, dataset: Dataset) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Postgres {
            database: database_name(dataset),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn data_errors_are_permanent_and_the_rest_transient() {
        for code in [
            "22021", "22003", "22P05", "23514", "23503", "54000", "0A000", "42601",
        ] {
            assert!(super::permanent_sqlstate(code), "{code}");
        }
        for code in [
            "08006", "40001", "40P01", "53100", "53300", "55P03", "57014", "57P01", "58030",
            "XX000", "23505", "23P01", "42501", "42P01", "42703",
        ] {
            assert!(!super::permanent_sqlstate(code), "{code}");
        }
    }
}
