//! `query-cli status`: what the pipeline did with every object version (from the ledgers of both
//! databases), with totals; or, with `--object KEY`, the rejected rows of one object — line number,
//! reason and the raw line — so an operator sees exactly what was dropped and why.

use std::io::Write;

use chrono::{DateTime, Utc};
use clap::Args;
use sensor_pipeline::config::DatabaseSettings;
use tokio_postgres::Client;

use crate::db::{failed, Databases};
use crate::output::{render, timestamp, Column, Format, Record};
use crate::Failure;
use sensor_pipeline::store::ledger::Status;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only object versions that failed.
    #[arg(long, conflicts_with = "object")]
    failed: bool,
    /// Show the rejected rows of this object (every version of it) instead.
    #[arg(long, value_name = "KEY")]
    object: Option<String>,
    /// Output format: an aligned table for people, CSV, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// One line of `query-cli status` (SPEC §5 field names, then attempts and times).
#[derive(serde::Serialize)]
struct VersionRecord {
    key: String,
    etag: String,
    status: String,
    rows_ok: i64,
    rows_rejected: i64,
    reason: Option<String>,
    attempts: i32,
    finished_at: String,
    /// The version's write time; `None` for keys that were never read.
    written_at: Option<String>,
    /// `finished_at` to sort by (its text is not fixed-width).
    #[serde(skip)]
    finished: DateTime<Utc>,
}

impl Record for VersionRecord {
    const FIELDS: &'static [&'static str] = &[
        "key",
        "etag",
        "status",
        "rows_ok",
        "rows_rejected",
        "reason",
        "attempts",
        "finished_at",
        "written_at",
    ];
    const TABLE: &'static [Column<Self>] = &[
        Column::left("key", |r| r.key.clone()),
        Column::left("etag", |r| r.etag.clone()),
        Column::left("status", |r| r.status.clone()),
        Column::right("rows_ok", |r| r.rows_ok.to_string()),
        Column::right("rows_rejected", |r| r.rows_rejected.to_string()),
        Column::right("attempts", |r| r.attempts.to_string()),
        Column::left("finished_at", |r| r.finished_at.clone()),
        Column::left("reason", |r| r.reason.clone().unwrap_or_default()),
    ];
}

/// One line of `query-cli status --object KEY`: a rejected row.
#[derive(serde::Serialize)]
struct RejectedRecord {
    key: String,
    etag: String,
    line: i64,
    reason: String,
    raw: String,
}

impl Record for RejectedRecord {
    const FIELDS: &'static [&'static str] = &["key", "etag", "line", "reason", "raw"];
    const TABLE: &'static [Column<Self>] = &[
        Column::left("etag", |r| r.etag.clone()),
        Column::right("line", |r| r.line.to_string()),
        Column::left("reason", |r| r.reason.clone()),
        Column::left("raw", |r| r.raw.escape_debug().to_string()),
    ];
}

pub async fn run(
    settings: &DatabaseSettings,
    args: &StatusArgs,
    out: &mut impl Write,
) -> Result<(), Failure> {
    let dbs = Databases::connect(settings).await?;
    let mut clients: Vec<(&Client, &'static str)> = vec![(&dbs.mapping, "mapping")];
    if !dbs.same {
        clients.push((&dbs.measurements, "measurement"));
    }
    match &args.object {
        Some(key) => rejected_rows(&clients, key, args.format, out).await,
        None => versions(&clients, args.failed, args.format, out).await,
    }
}

async fn versions(
    clients: &[(&Client, &'static str)],
    only_failed: bool,
    format: Format,
    out: &mut impl Write,
) -> Result<(), Failure> {
    let mut versions = Vec::new();
    for (client, database) in clients {
        let rows = client
            .query(
                "SELECT object_key, etag, status, rows_ok, rows_rejected, reason, attempts, finished_at, \
                        CASE WHEN written_at = '-infinity' THEN NULL ELSE written_at END \
                 FROM ingest_ledger WHERE status = 'failed' OR NOT $1",
                &[&only_failed],
            )
            .await
            .map_err(failed(database))?;
        for r in rows {
            let get = |e| failed(database)(e);
            let finished = r.try_get(7).map_err(get)?;
            let written: Option<DateTime<Utc>> = r.try_get(8).map_err(get)?;
            versions.push(VersionRecord {
                key: r.try_get(0).map_err(get)?,
                etag: r.try_get(1).map_err(get)?,
                status: r.try_get(2).map_err(get)?,
                rows_ok: r.try_get(3).map_err(get)?,
                rows_rejected: r.try_get(4).map_err(get)?,
                reason: r.try_get(5).map_err(get)?,
                attempts: r.try_get(6).map_err(get)?,
                finished_at: timestamp(finished),
                written_at: written.map(timestamp),
                finished,
            });
        }
    }
    versions.sort_by(|a, b| (&a.key, a.finished, &a.etag).cmp(&(&b.key, b.finished, &b.etag)));
    render(out, format, &versions)?;
    if format == Format::Table {
        let count = |s: Status| {
            versions
                .iter()
                .filter(|v| Status::parse(&v.status) == Some(s))
                .count()
        };
        writeln!(
                out,
                "\ntotal: {} object versions ({} done, {} failed, {} ignored); rows: {} ok, {} rejected",
                versions.len(),
                count(Status::Done),
                count(Status::Failed),
                count(Status::Ignored),
                versions.iter().map(|v| v.rows_ok).sum::<i64>(),
                versions.iter().map(|v| v.rows_rejected).sum::<i64>(),
            )?;
    }
    Ok(())
}

async fn rejected_rows(
    clients: &[(&Client, &'static str)],
    key: &str,
    format: Format,
    out: &mut impl Write,
) -> Result<(), Failure> {
    let mut known = false;
    let mut rejected = Vec::new();
    for (client, database) in clients {
        known |= client
            .query_opt(
                "SELECT 1 FROM ingest_ledger WHERE object_key = $1 LIMIT 1",
                &[&key],
            )
            .await
            .map_err(failed(database))?
            .is_some();
        let rows = client
            .query(
                "SELECT l.etag, q.line, q.reason, q.raw \
                 FROM ingest_quarantine q JOIN ingest_ledger l ON l.id = q.ledger_id \
                 WHERE l.object_key = $1 ORDER BY l.finished_at, l.etag, q.line",
                &[&key],
            )
            .await
            .map_err(failed(database))?;
        for r in rows {
            let get = |e| failed(database)(e);
            let raw: Vec<u8> = r.try_get(3).map_err(get)?;
            rejected.push(RejectedRecord {
                key: key.to_string(),
                etag: r.try_get(0).map_err(get)?,
                line: r.try_get(1).map_err(get)?,
                reason: r.try_get(2).map_err(get)?,
                raw: String::from_utf8_lossy(&raw).into_owned(),
            });
        }
    }
    if !known {
        return Err(Failure::NotFound(format!(
            "no object {key:?} in the ledger (`query-cli status` lists every object version)"
        )));
    }
    render(out, format, &rejected)?;
    if format == Format::Table {
        writeln!(out, "\n{} rejected rows in {key}", rejected.len())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::serde_header;

    #[test]
    fn csv_headers_are_the_field_names() {
        let v = VersionRecord {
            key: "k".into(),
            etag: "e".into(),
            status: "done".into(),
            rows_ok: 1,
            rows_rejected: 0,
            reason: None,
            attempts: 1,
            finished_at: "t".into(),
            written_at: None,
            finished: DateTime::UNIX_EPOCH,
        };
        assert_eq!(serde_header(&v), VersionRecord::FIELDS.join(","));
        let r = RejectedRecord {
            key: "k".into(),
            etag: "e".into(),
            line: 2,
            reason: "r".into(),
            raw: "x".into(),
        };
        assert_eq!(serde_header(&r), RejectedRecord::FIELDS.join(","));
    }
}
