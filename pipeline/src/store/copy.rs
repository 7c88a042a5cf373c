//! PostgreSQL binary `COPY` encoding.
//!
//! Rows are encoded straight into one reusable buffer that is shipped to the server in large
//! chunks: no per-row allocation, no per-row `await`, no dynamic dispatch. The format is
//! documented in the PostgreSQL manual ("COPY", section "Binary Format").
//!
//! Kept over tokio-postgres's `BinaryCopyInWriter` by measurement (`cargo bench -p
//! sensor-pipeline --bench hand_code -- copy`, 100,000 staging rows into a real server, 2-core
//! VM): the wall time of the `COPY` is the server's and equal for both (median 42.9 ms vs 42.7
//! ms), but the client spends **9.3 ms CPU** here against **16.0 ms** with the writer (medians of
//! 31 alternating runs), which encodes each field through `dyn ToSql`, needs a `DateTime` per
//! timestamp and awaits a send every 4 KiB. On a machine where the worker shares the cores with
//! PostgreSQL that CPU is throughput. Encoding alone: 2.2 ms per 100,000 rows (22 ns a row).

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Send the buffer to the server once it holds this much.
pub const FLUSH_AT: usize = 256 * 1024;

/// A binary `COPY … FROM STDIN (FORMAT binary)` stream under construction.
pub struct CopyEncoder {
    buf: BytesMut,
}

impl Default for CopyEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl CopyEncoder {
    /// Starts a stream (writes the signature and header).
    pub fn new() -> Self {
        let mut buf = BytesMut::with_capacity(FLUSH_AT + 4096);
        buf.put_slice(b"PGCOPY\n\xff\r\n\0");
        buf.put_i32(0); // flags
        buf.put_i32(0); // header extension length
        Self { buf }
    }

    /// Starts a row of `fields` fields; each must then be written with exactly one call below.
    pub fn row(&mut self, fields: i16) {
        self.buf.put_i16(fields);
    }

    pub fn null(&mut self) {
        self.buf.put_i32(-1);
    }

    pub fn int8(&mut self, v: i64) {
        self.buf.put_i32(8);
        self.buf.put_i64(v);
    }

    pub fn boolean(&mut self, v: bool) {
        self.buf.put_i32(1);
        self.buf.put_u8(u8::from(v));
    }

    pub fn float8(&mut self, v: f64) {
        self.buf.put_i32(8);
        self.buf.put_f64(v);
    }

    pub fn uuid(&mut self, v: &uuid::Uuid) {
        self.buf.put_i32(16);
        self.buf.put_slice(v.as_bytes());
    }

    /// A `timestamptz` given as microseconds since the Unix epoch.
    pub fn timestamptz(&mut self, unix_micros: i64) {
        self.int8(unix_micros - PG_EPOCH_OFFSET_MICROS);
    }

    /// `text` (must be UTF-8, which `&str` guarantees) or `bytea`.
    pub fn bytes(&mut self, v: &[u8]) {
        // Fields are bounded by the record size limit, far below i32::MAX.
        self.buf.put_i32(v.len() as i32);
        self.buf.put_slice(v);
    }

    /// Takes the encoded bytes so far if there are enough to be worth a send.
    pub fn take_if_full(&mut self) -> Option<Bytes> {
        (self.buf.len() >= FLUSH_AT).then(|| self.buf.split().freeze())
    }

    /// Ends the stream and takes what is left.
    pub fn finish(mut self) -> Bytes {
        self.buf.put_i16(-1);
        self.buf.freeze()
    }
}

/// Runs `statement` (a binary `COPY … FROM STDIN`) with `rows`, each written by `encode` (which
/// starts the row with [`CopyEncoder::row`]), sent in chunks of [`FLUSH_AT`].
#[cfg(feature = "ingest")]
pub async fn copy_rows<I: IntoIterator>(
    tx: &tokio_postgres::Transaction<'_>,
    statement: &str,
    rows: I,
    encode: impl Fn(&mut CopyEncoder, I::Item),
) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in(statement).await?;
    let mut sink = std::pin::pin!(sink);
    let mut enc = CopyEncoder::new();
    for row in rows {
        encode(&mut enc, row);
        if let Some(chunk) = enc.take_if_full() {
            sink.send(chunk).await?;
        }
    }
    sink.send(enc.finish()).await?;
    sink.as_mut().finish().await?;
    Ok(())
}
