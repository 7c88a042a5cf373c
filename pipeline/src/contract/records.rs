//! Streams CSV records out of an async byte source, keeping each record's raw bytes and line number.
//!
//! The `csv` crate's reader is synchronous and hides a record's raw bytes, but quarantine needs the
//! raw line exactly as it was, and the object arrives as an async stream. So this drives `csv-core`
//! (the `csv` crate's engine) directly over one growing input buffer: a record's raw bytes are the
//! slice the engine consumed for it, and its line number is counted from the newlines before it.
//! Buffers are reused from record to record; nothing is allocated per row.
//!
//! Dialect: RFC 4180 quoting with `"`, a configurable delimiter, LF or CRLF, an optional UTF-8 BOM.
//! Empty lines are skipped and never produce a record.

use tokio::io::{AsyncRead, AsyncReadExt};

/// A record may not grow beyond this (an unbalanced quote would otherwise swallow the whole rest of
/// the file into one record held in memory).
pub const MAX_RECORD_BYTES: usize = 1 << 20;

const READ_CHUNK: usize = 64 * 1024;

/// Reading failed: the source failed, or a record was impossibly large.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the record starting at line {line} is larger than {MAX_RECORD_BYTES} bytes (an unbalanced quote?)")]
    TooLarge { line: u64 },
}

/// One CSV record, borrowed from the reader until the next call.
#[derive(Debug)]
pub struct Record<'a> {
    /// 1-based line number of the record's first line.
    pub line: u64,
    /// The record's bytes as they were in the file, without the line terminator.
    pub raw: &'a [u8],
    fields: &'a [u8],
    ends: &'a [usize],
}

impl<'a> Record<'a> {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The unquoted bytes of field `i`.
    pub fn field(&self, i: usize) -> Option<&'a [u8]> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.fields[start..end])
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        (0..self.len()).filter_map(|i| self.field(i))
    }
}

/// Async CSV record reader over any byte source.
pub struct RecordReader<R> {
    src: R,
    core: csv_core::Reader,
    buf: Vec<u8>,
    /// Unconsumed input is `buf[pos..filled]`.
    pos: usize,
    filled: usize,
    eof: bool,
    started: bool,
    fields: Vec<u8>,
    ends: Vec<usize>,
    /// Newlines consumed so far.
    newlines: u64,
    bytes_read: u64,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    pub fn new(src: R, delimiter: u8) -> Self {
        let core = csv_core::ReaderBuilder::new()
            .delimiter(delimiter)
            .quote(b'"')
            .double_quote(true)
            .build();
        Self {
            src,
            core,
            buf: vec![0; READ_CHUNK * 2],
            pos: 0,
            filled: 0,
            eof: false,
            started: false,
            fields: vec![0; 1024],
            ends: vec![0; 32],
            newlines: 0,
            bytes_read: 0,
        }
    }

    /// Bytes read from the source so far (after decompression).
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// The next non-blank record, or `None` at the end of the input.
    pub async fn next_record(&mut self) -> Result<Option<Record<'_>>, RecordError> {
        loop {
            let Some((start, end, nout, nends)) = self.read_one().await? else {
                return Ok(None);
            };
            let raw_all = &self.buf[start..end];
            // The engine skips empty lines itself; they show up as terminators before the record.
            let lead = raw_all
                .iter()
                .take_while(|b| matches!(b, b'\r' | b'\n'))
                .count();
            let line = self.newlines + 1 + count_newlines(&raw_all[..lead]);
            self.newlines += count_newlines(raw_all);
            let raw_start = start + lead;
            let mut raw_end = end;
            while raw_end > raw_start && matches!(self.buf[raw_end - 1], b'\r' | b'\n') {
                raw_end -= 1;
            }
            // A record of only spaces and tabs carries nothing: it is treated like an empty line.
            let blank = raw_start == raw_end
                || (nends == 1
                    && self.fields[..nout]
                        .iter()
                        .all(|b| matches!(b, b' ' | b'\t')));
            if blank {
                continue;
            }
            return Ok(Some(Record {
                line,
                raw: &self.buf[raw_start..raw_end],
                fields: &self.fields[..nout],
                ends: &self.ends[..nends],
            }));
        }
    }

    /// Reads one record; returns its raw span in `buf` and the output lengths.
    async fn read_one(&mut self) -> Result<Option<(usize, usize, usize, usize)>, RecordError> {
        if !self.started {
            // Let the engine see a whole BOM at once, and something after it: it strips the BOM
            // itself, and would take the empty rest for the end of the data.
            while self.filled < 4 && !self.eof {
                self.fill().await?;
            }
            self.started = true;
        }
        let mut start = self.pos;
        let (mut nout, mut nends) = (0, 0);
        loop {
            // An empty input means "end of data" to the engine: only give it one at the real end.
            while self.pos == self.filled && !self.eof {
                if start > 0 {
                    self.buf.copy_within(start..self.filled, 0);
                    self.filled -= start;
                    self.pos -= start;
                    start = 0;
                }
                self.fill().await?;
            }
            let input = &self.buf[self.pos..self.filled];
            let (res, nin, o, e) =
                self.core
                    .read_record(input, &mut self.fields[nout..], &mut self.ends[nends..]);
            self.pos += nin;
            nout += o;
            nends += e;
            match res {
                csv_core::ReadRecordResult::Record => {
                    return Ok(Some((start, self.pos, nout, nends)))
                }
                csv_core::ReadRecordResult::End => return Ok(None),
                csv_core::ReadRecordResult::OutputFull => {
                    let len = self.fields.len();
                    self.fields.resize(len * 2, 0);
                }
                csv_core::ReadRecordResult::OutputEndsFull => {
                    let len = self.ends.len();
                    self.ends.resize(len * 2, 0);
                }
                csv_core::ReadRecordResult::InputEmpty => {
                    // All input so far is consumed; the loop head reads more (keeping the current
                    // record's bytes) or, at the end, lets the engine finish the last record.
                    if self.pos - start > MAX_RECORD_BYTES {
                        let line = self.newlines + 1 + count_newlines(&self.buf[start..self.pos]);
                        return Err(RecordError::TooLarge { line });
                    }
                }
            }
        }
    }

    async fn fill(&mut self) -> Result<(), RecordError> {
        if self.buf.len() - self.filled < READ_CHUNK {
            self.buf.resize(self.filled + READ_CHUNK, 0);
        }
        let n = self.src.read(&mut self.buf[self.filled..]).await?;
        if n == 0 {
            self.eof = true;
        }
        self.filled += n;
        self.bytes_read += n as u64;
        Ok(())
    }
}

fn count_newlines(bytes: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', bytes).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads every record as (line, raw, fields) from `input`, fed through in `chunk`-byte reads.
    fn read_all(input: &[u8], chunk: usize) -> Vec<(u64, String, Vec<String>)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let src = Chunked {
                data: input.to_vec(),
                at: 0,
                chunk,
            };
            let mut r = RecordReader::new(src, b';');
            let mut out = Vec::new();
            while let Some(rec) = r.next_record().await.unwrap() {
                out.push((
                    rec.line,
                    String::from_utf8_lossy(rec.raw).into_owned(),
                    rec.iter()
                        .map(|f| String::from_utf8_lossy(f).into_owned())
                        .collect(),
                ));
            }
            out
        })
    }

    struct Chunked {
        data: Vec<u8>,
        at: usize,
        chunk: usize,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let n = self
                .chunk
                .min(self.data.len() - self.at)
                .min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn fields(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lines_raw_bytes_and_fields_for_any_chunking() {
        let input = b"\xef\xbb\xbfa;b\r\n1;2\r\n\r\n\n3;\"x\r\ny\"\n  \n4;\"q\"\"q\"";
        for chunk in [1, 2, 3, 7, 4096] {
            let got = read_all(input, chunk);
            assert_eq!(
                got,
                vec![
                    (1, "\u{feff}a;b".to_string(), fields(&["a", "b"])),
                    (2, "1;2".into(), fields(&["1", "2"])),
                    (5, "3;\"x\r\ny\"".into(), fields(&["3", "x\r\ny"])),
                    (8, "4;\"q\"\"q\"".into(), fields(&["4", "q\"q"])),
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn header_field_has_no_bom() {
        let got = read_all(b"\xef\xbb\xbftimestamp;x\n", 1);
        assert_eq!(got[0].2, fields(&["timestamp", "x"]));
    }

    #[test]
    fn empty_input_has_no_records() {
        assert!(read_all(b"", 1).is_empty());
        assert!(read_all(b"\n\r\n\n", 1).is_empty());
    }

    #[test]
    fn oversized_record_is_an_error() {
        let mut input = b"a;b\n\"".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_RECORD_BYTES + 10));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = rt.block_on(async {
            let mut r = RecordReader::new(&input[..], b';');
            r.next_record().await.unwrap();
            r.next_record().await.unwrap_err()
        });
        assert!(matches!(err, RecordError::TooLarge { line: 2 }), "{err}");
    }
}
