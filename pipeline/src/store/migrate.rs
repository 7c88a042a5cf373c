//! Applies the SQL migrations in `migrations/` (see its README) to both databases.
//!
//! Safe to run again and from several processes at once: each database is migrated under a
//! session-level advisory lock, and refinery skips what its history table says is applied.

use tokio_postgres::NoTls;

use super::{pg_config, StoreError};
use crate::config::DatabaseSettings;

mod ledger_set {
    refinery::embed_migrations!("../migrations/ledger");
}
mod mapping_set {
    refinery::embed_migrations!("../migrations/mapping");
}
mod measurements_set {
    refinery::embed_migrations!("../migrations/measurements");
}

/// Arbitrary constant naming the "migrations running" advisory lock.
const MIGRATION_LOCK: i64 = 0x5345_4e53_4d49_4752; // "SENSMIGR"

/// One folder of `migrations/`, with its own history table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MigrationSet {
    Ledger,
    Mapping,
    Measurements,
}

impl MigrationSet {
    fn name(self) -> &'static str {
        match self {
            MigrationSet::Ledger => "ledger",
            MigrationSet::Mapping => "mapping",
            MigrationSet::Measurements => "measurements",
        }
    }

    fn runner(self) -> refinery::Runner {
        let mut runner = match self {
            MigrationSet::Ledger => ledger_set::migrations::runner(),
            MigrationSet::Mapping => mapping_set::migrations::runner(),
            MigrationSet::Measurements => measurements_set::migrations::runner(),
        };
        runner.set_migration_table_name(format!("schema_history_{}", self.name()));
        runner
    }
}

/// What `migrate` did to one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub database: &'static str,
    /// Names of the migrations applied now (empty when all were applied before).
    pub applied: Vec<String>,
    /// Whether `measurements` is a TimescaleDB hypertable (only reported for the measurement database).
    pub hypertable: Option<bool>,
}

/// Applies every migration set to the database(s) it belongs to.
pub async fn migrate(settings: &DatabaseSettings) -> Result<Vec<MigrationReport>, StoreError> {
    let mut reports = Vec::new();
    if settings.same_database() {
        let sets = [
            MigrationSet::Ledger,
            MigrationSet::Mapping,
            MigrationSet::Measurements,
        ];
        reports.push(apply(settings.mapping_url.expose(), "mapping+measurement", &sets).await?);
    } else {
        let sets = [MigrationSet::Ledger, MigrationSet::Mapping];
        reports.push(apply(settings.mapping_url.expose(), "mapping", &sets).await?);
        let sets = [MigrationSet::Ledger, MigrationSet::Measurements];
        reports.push(apply(settings.measurements_url.expose(), "measurement", &sets).await?);
    }
    Ok(reports)
}

async fn apply(
    url: &str,
    database: &'static str,
    sets: &[MigrationSet],
) -> Result<MigrationReport, StoreError> {
    let pg = |source| StoreError::Postgres { database, source };
    let (mut client, connection) = pg_config(url, database)?.connect(NoTls).await.map_err(pg)?;
    let conn_task = tokio::spawn(connection);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    let mut applied = Vec::new();
    let mut result = Ok(());
    for set in sets {
        let name = set.name();
        match set.runner().run_async(&mut client).await {
            Ok(report) => applied.extend(
                report
                    .applied_migrations()
                    .iter()
                    .map(|m| format!("{name}/V{}__{}", m.version(), m.name())),
            ),
            Err(source) => {
                result = Err(StoreError::Migration { database, source });
                break;
            }
        }
    }
    let hypertable = if sets.contains(&MigrationSet::Measurements) && result.is_ok() {
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
                &[],
            )
            .await
            .map_err(pg)?;
        let has_extension: bool = row.get(0);
        let is_hypertable = if has_extension {
            client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables \
                     WHERE hypertable_name = 'measurements')",
                    &[],
                )
                .await
                .map_err(pg)?
                .get(0)
        } else {
            false
        };
        Some(is_hypertable)
    } else {
        None
    };
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    drop(client);
    let _ = conn_task.await;
    result?;
    unlock.map_err(pg)?;
    Ok(MigrationReport {
        database,
        applied,
        hypertable,
    })
}
