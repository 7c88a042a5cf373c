//! Applies the SQL migrations in `migrations/` (see its README) to both databases.
//!
//! Safe to run again and from several processes at once: each database is migrated under a
//! session-level advisory lock, and refinery skips what its history table says is applied.
//!
//! A shipped migration is never edited, with one exception listed in [`AMENDED`]: a migration
//! whose old text could crash the session. Where the old text was applied, the new text does the
//! same, so its recorded checksum is updated to the new one (refinery refuses diverging history).

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
        self.runner_to(None)
    }

    fn runner_to(self, target: Option<i32>) -> refinery::Runner {
        let mut runner = match self {
            MigrationSet::Ledger => ledger_set::migrations::runner(),
            MigrationSet::Mapping => mapping_set::migrations::runner(),
            MigrationSet::Measurements => measurements_set::migrations::runner(),
        };
        if let Some(version) = target {
            runner = runner.set_target(refinery::Target::Version(version));
        }
        runner.set_migration_table_name(format!("schema_history_{}", self.name()));
        runner
    }
}

/// Migrations amended in place after they shipped: (set, version, the checksum refinery recorded
/// for an earlier text). The earlier texts are in the history: `git show
/// fb87bc6:migrations/measurements/V1__measurements.sql`, then `fb8ec90:…`.
///
/// `measurements/V1` looked at nothing before `CREATE EXTENSION timescaledb` at first: on a server
/// where the extension is installed but not preloaded, that ended the session with `FATAL:
/// extension "timescaledb" must be preloaded` (so it was never applied there). Then it read
/// `shared_preload_libraries`, which only superusers and `pg_read_all_settings` may read: as the
/// least-privilege owner role it failed with 42501 wherever TimescaleDB is installed (so it was
/// never applied there either). Now it asks for a setting the preloaded extension defines, and a
/// preloaded extension the role cannot create stops the migration with the statement to run
/// (before, the table silently stayed plain). Where an earlier text was applied, the current one
/// would have done the same but in that last case.
const AMENDED: &[(MigrationSet, i32, u64)] = &[
    (MigrationSet::Measurements, 1, 10_378_167_297_425_692_550),
    (MigrationSet::Measurements, 1, 2_844_391_930_722_834_833),
];

/// What `migrate` did to one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub database: &'static str,
    /// Names of the migrations applied now (empty when all were applied before).
    pub applied: Vec<String>,
    /// What `measurements` is (only reported for the measurement database).
    pub measurements: Option<MeasurementsTable>,
}

/// What the migrations made of the `measurements` table, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasurementsTable {
    Hypertable,
    /// A plain table: the `timescaledb` extension is not installed on the server.
    PlainNotAvailable,
    /// A plain table: the extension is installed, but not in `shared_preload_libraries` (it must
    /// be preloaded before it can be created).
    PlainNotPreloaded,
    /// A plain table although the extension is loaded (e.g. it was created after the table).
    PlainExtensionLoaded,
}

impl std::fmt::Display for MeasurementsTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MeasurementsTable::Hypertable => "a TimescaleDB hypertable",
            MeasurementsTable::PlainNotAvailable => "a plain table (TimescaleDB not available)",
            MeasurementsTable::PlainNotPreloaded => {
                "a plain table (TimescaleDB is installed but not in shared_preload_libraries: \
                 add it there, restart PostgreSQL and migrate again for a hypertable)"
            }
            MeasurementsTable::PlainExtensionLoaded => {
                "a plain table (TimescaleDB is loaded, but measurements was not made a hypertable)"
            }
        })
    }
}

async fn measurements_table(
    client: &tokio_postgres::Client,
) -> Result<MeasurementsTable, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'),
                    EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')",
            &[],
        )
        .await?;
    let (loaded, available): (bool, bool) = (row.get(0), row.get(1));
    if !loaded {
        return Ok(if available {
            MeasurementsTable::PlainNotPreloaded
        } else {
            MeasurementsTable::PlainNotAvailable
        });
    }
    let hypertable: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables \
             WHERE hypertable_name = 'measurements')",
            &[],
        )
        .await?
        .get(0);
    Ok(if hypertable {
        MeasurementsTable::Hypertable
    } else {
        MeasurementsTable::PlainExtensionLoaded
    })
}

/// Applies every migration set to the database(s) it belongs to.
pub async fn migrate(settings: &DatabaseSettings) -> Result<Vec<MigrationReport>, StoreError> {
    migrate_to(settings, None).await
}

/// The schema of an earlier release: the last migration of each set it had.
#[derive(Debug, Clone, Copy)]
pub struct EarlierSchema {
    pub ledger: i32,
    pub mapping: i32,
    pub measurements: i32,
}

/// Applies the migrations up to an earlier release's schema (upgrade tests start from it).
pub async fn migrate_to_earlier(
    settings: &DatabaseSettings,
    schema: EarlierSchema,
) -> Result<Vec<MigrationReport>, StoreError> {
    migrate_to(settings, Some(schema)).await
}

async fn migrate_to(
    settings: &DatabaseSettings,
    target: Option<EarlierSchema>,
) -> Result<Vec<MigrationReport>, StoreError> {
    let mut reports = Vec::new();
    if settings.same_database() {
        let sets = [
            MigrationSet::Ledger,
            MigrationSet::Mapping,
            MigrationSet::Measurements,
        ];
        reports.push(
            apply(
                settings.mapping_url.expose(),
                "mapping+measurement",
                &sets,
                target,
            )
            .await?,
        );
    } else {
        let sets = [MigrationSet::Ledger, MigrationSet::Mapping];
        reports.push(apply(settings.mapping_url.expose(), "mapping", &sets, target).await?);
        let sets = [MigrationSet::Ledger, MigrationSet::Measurements];
        reports.push(
            apply(
                settings.measurements_url.expose(),
                "measurement",
                &sets,
                target,
            )
            .await?,
        );
    }
    Ok(reports)
}

async fn apply(
    url: &str,
    database: &'static str,
    sets: &[MigrationSet],
    target: Option<EarlierSchema>,
) -> Result<MigrationReport, StoreError> {
    let pg = |source| StoreError::Postgres { database, source };
    let (config, connector) = pg_config(url, database)?;
    let (mut client, connection) = config.connect(connector).await.map_err(pg)?;
    let conn_task = tokio::spawn(connection);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    let mut applied = Vec::new();
    let mut result = Ok(());
    for set in sets {
        let name = set.name();
        if let Err(source) = amend(&client, *set).await {
            result = Err(pg(source));
            break;
        }
        let version = target.map(|t| match set {
            MigrationSet::Ledger => t.ledger,
            MigrationSet::Mapping => t.mapping,
            MigrationSet::Measurements => t.measurements,
        });
        match set.runner_to(version).run_async(&mut client).await {
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
    let measurements = if sets.contains(&MigrationSet::Measurements) && result.is_ok() {
        Some(measurements_table(&client).await.map_err(pg)?)
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
        measurements,
    })
}

/// Records the new checksum of each amended migration of `set` where the old text was applied.
async fn amend(
    client: &tokio_postgres::Client,
    set: MigrationSet,
) -> Result<(), tokio_postgres::Error> {
    let table = format!("schema_history_{}", set.name());
    for &(_, version, old) in AMENDED.iter().filter(|(s, ..)| *s == set) {
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
            .await?
            .get(0);
        if !exists {
            continue;
        }
        let new = checksum(set, version);
        client
            .execute(
                &format!("UPDATE {table} SET checksum = $1 WHERE version = $2 AND checksum = $3"),
                &[&new.to_string(), &version, &old.to_string()],
            )
            .await?;
    }
    Ok(())
}

/// The checksum refinery records for migration `version` of `set`.
fn checksum(set: MigrationSet, version: i32) -> u64 {
    set.runner()
        .get_migrations()
        .iter()
        .find(|m| m.version() == version)
        .map(|m| m.checksum())
        .expect("an amended migration exists")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amended_checksums_are_earlier_texts_not_the_current_one() {
        let current = checksum(MigrationSet::Measurements, 1);
        let [(_, 1, first), (_, 1, second)] = AMENDED else {
            panic!("two earlier texts of measurements/V1")
        };
        assert_ne!(first, second);
        assert_ne!(*first, current);
        assert_ne!(*second, current);
    }
}
