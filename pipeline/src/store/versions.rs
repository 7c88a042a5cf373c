//! Who wins (SPEC §3): the newest write, never the last to be processed.
//!
//! Every object version that is read is registered in its database and gets a number
//! (`sensors_register_version`, `migrations/ledger/V2__object_versions.sql` and
//! `V3__versions_without_lock.sql`): the whole seconds of its write time in the high bits, a
//! number unique within that second in the low 24 (from a sequence; no lock). Every
//! stored row carries the number of the version it came from, and the merge overwrites a row only
//! with a version that beats it:
//!
//! - different seconds: the later second wins, decided from the two numbers alone;
//! - the same second: `sensors_version_beats` compares write time, then key (byte order), then
//!   ETag, then bucket, in `object_versions`.
//!
//! So the end state is a function of the versions ingested, whatever the order or concurrency.
//! The check runs inside `ON CONFLICT … DO UPDATE … WHERE`, which PostgreSQL evaluates against the
//! newest committed row version (waiting for a concurrent writer of the same row to finish), so a
//! version that commits late cannot overwrite a newer one that committed first.
//!
//! Why a number per row and not the write time and key: the key is text of any length, and
//! measurements are most of the database. An 8-byte column costs the same as a 4-byte one after
//! alignment (a row goes from 56 to 64 bytes), and the per-row comparison stays two shifts. Write
//! times are whole seconds (the HTTP `Last-Modified` header), so same-second ties do happen (a bulk
//! upload) and are resolved by the function, only for the rows they concern.
//!
//! A single object registers its version in a statement of its own before its transaction; a
//! group ([`crate::ingest::Grouper`]) inside its transaction, with the rest of its first round
//! trip. A version registered by an attempt that then fails is harmless.

use super::ledger::ObjectVersion;

/// Rows stored before versions existed: every version beats it.
pub const UNVERSIONED: i64 = 0;

const REGISTER: &str = "SELECT sensors_register_version($1, $2, $3, $4)";

/// Registers `v` (a version that was read, so it has a write time) and returns its number.
pub async fn register(
    client: &impl deadpool_postgres::GenericClient,
    v: &ObjectVersion,
) -> Result<i64, tokio_postgres::Error> {
    let written_at = v
        .written_at
        .expect("only versions that were read are registered");
    let statement = client.prepare_cached(REGISTER).await?;
    let row = client
        .query_one(&statement, &[&v.bucket, &v.key, &v.etag, &written_at])
        .await?;
    Ok(row.get(0))
}

const REGISTER_ALL: &str = "SELECT sensors_register_version($1, v.object_key, v.etag, v.written_at)
    FROM unnest($2::text[], $3::text[], $4::timestamptz[]) WITH ORDINALITY
        AS v(object_key, etag, written_at, i)
    ORDER BY v.i";

/// The statement of [`register_all`], prepared.
pub async fn prepare_all(
    client: &impl deadpool_postgres::GenericClient,
) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
    client.prepare_cached(REGISTER_ALL).await
}

/// [`register`] for versions of one bucket in one statement; their numbers, in order.
pub async fn register_all(
    client: &impl deadpool_postgres::GenericClient,
    statement: &tokio_postgres::Statement,
    group: &[ObjectVersion],
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let bucket = group.first().map_or("", |v| v.bucket.as_str());
    let keys: Vec<&str> = group.iter().map(|v| v.key.as_str()).collect();
    let etags: Vec<&str> = group.iter().map(|v| v.etag.as_str()).collect();
    let written: Vec<chrono::DateTime<chrono::Utc>> = group
        .iter()
        .map(|v| {
            v.written_at
                .expect("only versions that were read are registered")
        })
        .collect();
    Ok(client
        .query(statement, &[&bucket, &keys, &etags, &written])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// True when version `$incoming` beats version `$stored` (two SQL expressions). A macro so that
/// `concat!` can build the statements at compile time.
macro_rules! version_beats {
    ($incoming:literal, $stored:literal) => {
        concat!(
            "((",
            $incoming,
            " >> 24) > (",
            $stored,
            " >> 24)
          OR ((",
            $incoming,
            " >> 24) = (",
            $stored,
            " >> 24)
              AND ",
            $incoming,
            " <> ",
            $stored,
            "
              AND sensors_version_beats(",
            $incoming,
            ", ",
            $stored,
            ")))"
        )
    };
}
pub(crate) use version_beats;

/// The `WHERE` of an upsert into a versioned table aliased `target`: true when the incoming row's
/// version (`EXCLUDED.version`) beats the stored one.
macro_rules! incoming_beats_stored {
    () => {
        version_beats!("EXCLUDED.version", "target.version")
    };
}
pub(crate) use incoming_beats_stored;
