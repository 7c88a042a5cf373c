//! PostgreSQL over TLS with libpq's parameters, against a server started by the harness that
//! accepts only TLS connections, with certificates made in the test.

use std::time::Duration;

use sensor_pipeline::config::{
    ContractSettings, DatabaseSettings, DatabaseTimeouts, LimitSettings, Secret,
};
use sensor_pipeline::ingest::{Disposition, Ingestor};
use sensor_pipeline::store::{describe, migrate::migrate, pg_config, Databases};
use testbed::tls::Pki;

async fn connect(url: &str) -> Result<(), String> {
    let (config, tls) = pg_config(url, "mapping").map_err(|e| e.to_string())?;
    let (client, connection) = config.connect(tls).await.map_err(|e| describe(&e))?;
    tokio::spawn(connection);
    client
        .simple_query("SELECT 1")
        .await
        .map(|_| ())
        .map_err(|e| describe(&e))
}

#[tokio::test]
async fn each_sslmode_does_what_libpq_does() {
    let pki = Pki::new().unwrap();
    let (_pg, url) = testbed::owned_postgres_tls(&pki, false).await.unwrap();
    let (ca, other) = (pki.ca.display(), pki.other_ca.display());

    assert_eq!(
        connect(&format!("{url}?sslmode=verify-full&sslrootcert={ca}")).await,
        Ok(())
    );
    assert_eq!(
        connect(&format!("{url}?sslmode=verify-ca&sslrootcert={ca}")).await,
        Ok(())
    );
    assert_eq!(
        connect(&format!("{url}?sslmode=verify-full&sslrootcert={other}")).await,
        Err("error performing TLS handshake: invalid peer certificate: UnknownIssuer".into())
    );
    // `require` (and libpq's default, `prefer`) encrypt without checking the certificate.
    assert_eq!(connect(&format!("{url}?sslmode=require")).await, Ok(()));
    assert_eq!(connect(&url).await, Ok(()));
    let refused = connect(&format!("{url}?sslmode=disable"))
        .await
        .unwrap_err();
    assert_eq!(
        refused,
        "no pg_hba.conf entry for host \"127.0.0.1\", user \"postgres\", database \"postgres\", \
         no encryption (SQLSTATE 28000)"
    );
    assert_eq!(
        connect(&format!(
            "{url}?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"
        ))
        .await,
        Err(
            "invalid connection string for the mapping database: sslrootcert \
             /nonexistent/ca.pem: I/O error: No such file or directory (os error 2)"
                .into()
        )
    );
}

#[tokio::test]
async fn a_client_certificate_is_accepted_when_the_server_requires_one() {
    let pki = Pki::new().unwrap();
    let (_pg, url) = testbed::owned_postgres_tls(&pki, true).await.unwrap();
    let ca = pki.ca.display();
    let with_cert = format!(
        "{url}?sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
        pki.client_cert.display(),
        pki.client_key.display()
    );
    assert_eq!(connect(&with_cert).await, Ok(()));
    let without = connect(&format!("{url}?sslmode=verify-full&sslrootcert={ca}"))
        .await
        .unwrap_err();
    assert_eq!(
        without,
        "connection requires a valid client certificate (SQLSTATE 28000)"
    );
}

/// A TLS-only PostgreSQL of the test's own with a migrated database `name` reached over
/// `verify-full`, an admin session on it, and an S3 server holding one object of one reading.
struct TlsStack {
    _pg: testbed::OwnedServer,
    admin: tokio_postgres::Client,
    url: String,
    settings: DatabaseSettings,
    s3: testbed::S3Server,
}

const ONE_READING: &str = "timestamp;sensor_uuid;sensor_value\n\
    2013-01-20T08:00:00Z;cd613e30-d8f1-4adf-91b7-584a2265b1f5;1.5\n";

impl TlsStack {
    async fn new(pki: &Pki, name: &str, key: &str, timeouts: DatabaseTimeouts) -> Self {
        let (pg, url) = testbed::owned_postgres_tls(pki, false).await.unwrap();
        let admin = format!("{url}?sslmode=verify-full&sslrootcert={}", pki.ca.display());
        let (config, tls) = pg_config(&admin, "mapping").unwrap();
        let (client, connection) = config.connect(tls).await.unwrap();
        tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = admin.replacen("/postgres?", &format!("/{name}?"), 1);
        let settings = DatabaseSettings {
            mapping_url: Secret::new(url.clone()),
            measurements_url: Secret::new(url.clone()),
            timeouts,
        };
        migrate(&settings).await.unwrap();
        let s3 = testbed::S3Server::start("code-challenge-data")
            .await
            .unwrap();
        s3.put(key, ONE_READING).await.unwrap();
        Self {
            _pg: pg,
            admin: client,
            url,
            settings,
            s3,
        }
    }
}

/// Migrations and ingestion over `verify-full`.
#[tokio::test]
async fn ingestion_works_over_verified_tls() {
    let pki = Pki::new().unwrap();
    let key = "timeseries/tls.csv";
    let stack = TlsStack::new(&pki, "tls", key, Default::default()).await;
    let client = &stack.admin;
    let ingestor = Ingestor::new(
        stack.s3.store().clone(),
        Databases::connect(&stack.settings, 2).unwrap(),
        ContractSettings::default(),
    );
    let outcome = ingestor.ingest(key, None).await.unwrap();
    assert_eq!(outcome.disposition, Disposition::Done);
    assert_eq!(outcome.rows_ok, 1);
    let encrypted: bool = testbed::scalar(
        client,
        "SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE datname = 'tls'",
    )
    .await;
    assert!(encrypted);
}

/// A statement past `OBJECT_DEADLINE_SECS` is cancelled through the connection's own TLS
/// settings: the server stops waiting on the lock the test holds (the pooled connection stays
/// open, so nothing else would end the wait).
#[tokio::test]
async fn a_deadline_cancels_the_statement_over_tls() {
    let pki = Pki::new().unwrap();
    let key = "timeseries/slow.csv";
    // Only the cancel can end the wait: the lock timeout is an hour.
    let timeouts = DatabaseTimeouts {
        lock: Duration::from_secs(3600),
        ..Default::default()
    };
    let stack = TlsStack::new(&pki, "slow", key, timeouts).await;
    let (settings, s3, client) = (&stack.settings, &stack.s3, &stack.admin);
    let (config, tls) = pg_config(&stack.url, "measurement").unwrap();
    let (holder, connection) = config.connect(tls).await.unwrap();
    tokio::spawn(connection);
    holder
        .batch_execute("BEGIN; LOCK TABLE measurement_days IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let dbs = Databases::connect(settings, 2).unwrap();
    let ingestor =
        Ingestor::new(s3.store().clone(), dbs, ContractSettings::default()).limits(LimitSettings {
            object_deadline: Duration::from_secs(1),
            ..LimitSettings::default()
        });
    // (Cancelling without TLS, this hung: a bound turns that into a failure.)
    let outcome = tokio::time::timeout(Duration::from_secs(60), ingestor.ingest(key, None))
        .await
        .expect("the ingestion ends at its deadline")
        .unwrap();
    assert_eq!(
        outcome.disposition,
        Disposition::Failed("not ingested within OBJECT_DEADLINE_SECS (1 s)".into())
    );
    let waiting = || async {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = 'slow' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // The cancel has been sent when `ingest` returns; the server ends the wait on its own time.
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while waiting().await > 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(ended, Ok(()), "the statement still waits on the lock");
    holder.batch_execute("COMMIT").await.unwrap();
}
