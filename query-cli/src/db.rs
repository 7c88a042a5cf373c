//! Connections to the mapping and the measurement database (one connection when they are the same).

use std::sync::Arc;

use sensor_pipeline::config::DatabaseSettings;
use sensor_pipeline::store::pg_config;
use tokio_postgres::Client;

use crate::Failure;

pub struct Databases {
    pub mapping: Arc<Client>,
    pub measurements: Arc<Client>,
    /// Whether both are one database (then ledger rows must not be read twice).
    pub same: bool,
}

impl Databases {
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, Failure> {
        if settings.same_database() {
            let mapping = Arc::new(connect(settings.mapping_url.expose(), "mapping").await?);
            return Ok(Self {
                measurements: mapping.clone(),
                mapping,
                same: true,
            });
        }
        // Both at once: a connection's start is a few round trips and a server process forked.
        let (mapping, measurements) = tokio::try_join!(
            connect(settings.mapping_url.expose(), "mapping"),
            connect(settings.measurements_url.expose(), "measurement")
        )?;
        Ok(Self {
            mapping: Arc::new(mapping),
            measurements: Arc::new(measurements),
            same: false,
        })
    }
}

async fn connect(url: &str, database: &'static str) -> Result<Client, Failure> {
    let (config, connector) =
        pg_config(url, database).map_err(|e| Failure::Infrastructure(e.to_string()))?;
    let (client, connection) = config.connect(connector).await.map_err(|e| {
        Failure::Infrastructure(format!(
            "cannot reach the {database} database: {}",
            sensor_pipeline::store::describe(&e)
        ))
    })?;
    tokio::spawn(async move {
        // Errors surface through the client's next query.
        let _ = connection.await;
    });
    Ok(client)
}

/// A failed query: the database went away or the schema is missing.
pub fn failed(database: &'static str) -> impl FnOnce(tokio_postgres::Error) -> Failure {
    move |e| {
        let detail = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string());
        let hint = if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
            " (run `sensors-worker migrate` first)"
        } else {
            ""
        };
        Failure::Infrastructure(format!("{database} database: {detail}{hint}"))
    }
}
