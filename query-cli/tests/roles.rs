//! The least-privilege roles of `postgres/10-roles.sh` (what docker-compose.yml creates) are
//! enough for each part of the pipeline, and no more: migrations as `sensors_migrate`, ingestion
//! and detection as `sensors_worker`, `query-cli` as `sensors_reader`.

use sensor_pipeline::config::{ContractSettings, DatabaseSettings, Env, Secret};
use sensor_pipeline::ingest::Ingestor;
use sensor_pipeline::store::{migrate::migrate, Databases};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../postgres/10-roles.sh");
const SENSOR: &str = "0a5a2b8e-7c0f-4a55-9a39-000000000007";

/// Runs the script as the image's entrypoint would, against `database` of the server at `port`.
async fn create_roles(port: u16, database: &str) {
    let psql = testbed::find_pg_binary("psql").expect("psql");
    let path = format!(
        "{}:{}",
        psql.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new("sh")
        .arg(SCRIPT)
        .env_clear()
        .env("PATH", path)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", port.to_string())
        .env("POSTGRES_USER", "postgres")
        .env("POSTGRES_DB", database)
        .env("SENSORS_MIGRATE_PASSWORD", "m1grate")
        .env("SENSORS_WORKER_PASSWORD", "w0rker")
        .env("SENSORS_READER_PASSWORD", "r3ader")
        .output()
        .await
        .unwrap();
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned()
        ),
        (Some(0), String::new()),
        "{SCRIPT} on {database}"
    );
}

fn settings(port: u16, role: &str, password: &str) -> DatabaseSettings {
    DatabaseSettings {
        mapping_url: Secret::new(format!(
            "postgres://{role}:{password}@127.0.0.1:{port}/sensors"
        )),
        measurements_url: Secret::new(format!(
            "postgres://{role}:{password}@127.0.0.1:{port}/measurements"
        )),
        timeouts: Default::default(),
    }
}

/// The SQLSTATE of what `sql` fails with when `url`'s role runs it.
async fn refused(url: &str, sql: &str) -> String {
    let client = testbed::connect(url).await.unwrap();
    let err = client.batch_execute(sql).await.unwrap_err();
    err.code().map(|c| c.code().to_string()).unwrap_or_default()
}

#[tokio::test]
async fn each_part_of_the_pipeline_works_with_its_own_least_privilege_role() {
    let (_server, _) = server_with_roles(&[]).await;
    let port = _server.port;
    // Safe to run again.
    create_roles(port, "sensors").await;

    // Migrations as the owner role.
    let migrator = settings(port, "sensors_migrate", "m1grate");
    migrate(&migrator).await.unwrap();

    // Ingestion and detection as the worker role.
    let worker = settings(port, "sensors_worker", "w0rker");
    let s3 = testbed::S3Server::start("code-challenge-data")
        .await
        .unwrap();
    s3.put(
        "mapping/sensors.csv",
        format!("sensor_uuid;sensor_name\n{SENSOR};sensor_00007\n"),
    )
    .await
    .unwrap();
    let mut readings = String::from("timestamp;sensor_uuid;sensor_value\n");
    for minute in 0..600 {
        let value = if minute == 300 {
            90.0
        } else {
            20.0 + (minute % 7) as f64 / 10.0
        };
        readings.push_str(&format!(
            "2013-01-01T{:02}:{:02}:00Z;{SENSOR};{value}\n",
            minute / 60,
            minute % 60
        ));
    }
    s3.put("timeseries/day.csv", readings).await.unwrap();
    let dbs = Databases::connect(&worker, 2).unwrap();
    let ingestor = Ingestor::new(s3.store().clone(), dbs.clone(), ContractSettings::default());
    for key in ["mapping/sensors.csv", "timeseries/day.csv"] {
        let outcome = ingestor.ingest(key, None).await.unwrap();
        assert_eq!(outcome.rows_rejected, 0, "{key}");
    }
    // Again: the second upload of the same object is a no-op, the ledger says so.
    ingestor.ingest("timeseries/day.csv", None).await.unwrap();
    let anomalies =
        sensor_pipeline::config::AnomalySettings::from_env(&Env::from_map(
            Vec::<(String, String)>::new(),
        ))
        .unwrap();
    let detected = sensor_pipeline::alerts::Alerts::new(dbs, anomalies)
        .detect_due(None)
        .await
        .unwrap();
    assert_eq!(detected.sensors, 1);

    // query-cli as the read-only role.
    let reader = settings(port, "sensors_reader", "r3ader");
    let vars = vec![
        (
            "DATABASE_URL".to_string(),
            reader.mapping_url.expose().to_string(),
        ),
        (
            "TIMESCALE_DATABASE_URL".to_string(),
            reader.measurements_url.expose().to_string(),
        ),
    ];
    let out = testbed::run_binary(
        env!("CARGO_BIN_EXE_query-cli"),
        &vars,
        &[
            "readings",
            "--sensor-name",
            "sensor_00007",
            "--start-timestamp",
            "2013-01-01T04:59:00Z",
            "--end-timestamp",
            "2013-01-01T05:01:00Z",
            "--format",
            "csv",
        ],
    )
    .await;
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned()
        ),
        (
            Some(0),
            "timestamp,sensor_value\n2013-01-01T04:59:00Z,20.5\n2013-01-01T05:00:00Z,90\n\
             2013-01-01T05:01:00Z,20\n"
                .to_string(),
            String::new()
        )
    );
    let out = testbed::run_binary(
        env!("CARGO_BIN_EXE_query-cli"),
        &vars,
        &[
            "anomalies",
            "--sensor-name",
            "sensor_00007",
            "--start-timestamp",
            "2013-01-01T00:00:00Z",
            "--end-timestamp",
            "2013-01-02T00:00:00Z",
            "--stored",
            "--format",
            "csv",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stored = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(stored.contains("spike,2013-01-01T05:00:00Z"), "{stored}");

    // And no more than each needs: 42501 is "insufficient privilege".
    let measurements = |s: &DatabaseSettings| s.measurements_url.expose().to_string();
    assert_eq!(
        refused(&measurements(&reader), "DELETE FROM measurements").await,
        "42501"
    );
    assert_eq!(
        refused(&measurements(&reader), "CREATE TEMP TABLE t (x int)").await,
        "42501"
    );
    assert_eq!(
        refused(&measurements(&worker), "DROP TABLE measurements").await,
        "42501"
    );
    assert_eq!(
        refused(&measurements(&worker), "CREATE TABLE mine (x int)").await,
        "42501"
    );
    assert_eq!(
        refused(
            &measurements(&worker),
            "ALTER TABLE measurements ADD COLUMN x int"
        )
        .await,
        "42501"
    );
}

/// A server with the two databases and the roles of `postgres/10-roles.sh`, started with
/// `settings`; the superuser's URL of `measurements` and the server.
async fn server_with_roles(settings: &[&str]) -> (testbed::OwnedServer, String) {
    let (server, admin) = testbed::owned_postgres_with(settings).await.unwrap();
    let client = testbed::connect(&admin).await.unwrap();
    for database in ["sensors", "measurements"] {
        client
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .await
            .unwrap();
        create_roles(server.port, database).await;
    }
    let measurements = format!("{}/measurements", admin.rsplit_once('/').unwrap().0);
    (server, measurements)
}

/// The migrations run as `sensors_migrate` in every state of a server with TimescaleDB
/// installed: not preloaded, a plain table, and `migrate` says why; preloaded, a hypertable (the
/// extension is trusted: the role creates it); preloaded but the role may not create it (no
/// CREATE on the database), they stop with the statement a superuser must run, and once it has,
/// a hypertable. Where TimescaleDB is not installed (CI) there is nothing to test.
#[tokio::test]
async fn migrations_as_the_owner_role_in_every_timescaledb_state() {
    use sensor_pipeline::store::migrate::MeasurementsTable;
    let (server, measurements) = server_with_roles(&[]).await;
    let installed = testbed::timescaledb_installed(&measurements).await.unwrap();
    if !installed {
        eprintln!("TimescaleDB is not installed on this machine: nothing to test");
        return;
    }
    // Installed, not preloaded.
    let migrator = settings(server.port, "sensors_migrate", "m1grate");
    let reports = migrate(&migrator).await.unwrap();
    assert_eq!(
        reports[1].measurements,
        Some(MeasurementsTable::PlainNotPreloaded)
    );
    drop(server);

    // Preloaded: the role creates the extension.
    let preload = ["shared_preload_libraries=timescaledb"];
    let (server, _) = server_with_roles(&preload).await;
    let migrator = settings(server.port, "sensors_migrate", "m1grate");
    let reports = migrate(&migrator).await.unwrap();
    assert_eq!(reports[1].measurements, Some(MeasurementsTable::Hypertable));
    drop(server);

    // Preloaded, the role without CREATE on the database: it says what to run.
    let (server, measurements) = server_with_roles(&preload).await;
    let admin = testbed::connect(&measurements).await.unwrap();
    admin
        .batch_execute("REVOKE CREATE ON DATABASE measurements FROM sensors_migrate")
        .await
        .unwrap();
    let migrator = settings(server.port, "sensors_migrate", "m1grate");
    assert_eq!(
        migrate(&migrator).await.unwrap_err().to_string(),
        "migrating the measurement database: error applying migration V1__measurements: \
         timescaledb is preloaded but cannot be created by sensors_migrate: permission denied \
         to create extension \"timescaledb\" (SQLSTATE P0001); hint: run as a superuser: psql \
         -d measurements -c \"CREATE EXTENSION timescaledb\", then migrate again"
    );
    admin
        .batch_execute("CREATE EXTENSION timescaledb")
        .await
        .unwrap();
    let reports = migrate(&migrator).await.unwrap();
    assert_eq!(reports[1].measurements, Some(MeasurementsTable::Hypertable));
}
