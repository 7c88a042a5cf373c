//! Rejected rows: from staging into `ingest_quarantine`, under the object's ledger entry.

/// `$3`: the version whose rows to take (rows of a single object carry none).
pub(super) const QUARANTINE: &str =
    "INSERT INTO ingest_quarantine (ledger_id, object_key, line, raw, reason)
    SELECT $1, $2, line, raw, reason FROM staging_rows
    WHERE reason IS NOT NULL AND (object_version IS NULL OR object_version = $3)";

/// Moves an object's rejected rows into quarantine under ledger entry `ledger_id` (`None`: no row
/// was rejected).
pub(super) async fn quarantine_one(
    tx: &deadpool_postgres::Transaction<'_>,
    ledger_id: Option<i64>,
    key: &str,
    version: i64,
) -> Result<(), tokio_postgres::Error> {
    if let Some(ledger_id) = ledger_id {
        let quarantine = tx.prepare_cached(QUARANTINE).await?;
        tx.execute(&quarantine, &[&ledger_id, &key, &version])
            .await?;
    }
    Ok(())
}
