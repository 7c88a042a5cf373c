//! The two hand-written hot paths against the crates that could replace them, per row:
//!
//! - `timestamp`: `contract::timestamp::parse_datetime` against chrono's parsers on the forms both
//!   accept (RFC 3339 with `Z` or an offset, and naive `YYYY-MM-DDTHH:MM:SS[.f]`).
//! - `copy`: `store::copy::CopyEncoder` against tokio-postgres's `BinaryCopyInWriter`, both
//!   streaming the staging table's row shape into a real PostgreSQL `COPY` (a temporary table,
//!   truncated before every sample, so the server's share is the same for both), plus the
//!   encoder alone (no server) to show the client's share.
//!
//! Run: `cargo bench -p sensor-pipeline --bench hand_code` (the COPY benchmarks start the
//! testbed's PostgreSQL, or use `TEST_DATABASE_URL`). The figures are in the two modules' docs.

use std::sync::OnceLock;

use bytes::Bytes;
use divan::{black_box, Bencher};
use futures_util::SinkExt;
use sensor_pipeline::contract::timestamp::parse_datetime;
use sensor_pipeline::store::copy::CopyEncoder;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

fn main() {
    divan::main();
    // divan times wall clock, where the server's share (the same for both) hides the client's;
    // this thread runs the whole client side (a current-thread runtime), so its CPU time is it.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if filters.is_empty() || filters.iter().any(|f| "copy".contains(f.as_str())) {
        copy::client_cpu();
    }
}

/// Rows per sample: one object's worth.
const ROWS: usize = 100_000;

fn timestamps(form: fn(i64) -> String) -> Vec<String> {
    (0..ROWS as i64)
        .map(|i| form(1_357_000_000 + i * 7))
        .collect()
}

fn rfc3339(secs: i64) -> String {
    let t = chrono::DateTime::from_timestamp(secs, 0).expect("in range");
    if secs % 2 == 0 {
        t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S.125+01:00").to_string()
    }
}

fn naive(secs: i64) -> String {
    let t = chrono::DateTime::from_timestamp(secs, 0).expect("in range");
    t.format("%Y-%m-%dT%H:%M:%S%.3f").to_string()
}

mod timestamp {
    use super::*;

    #[divan::bench]
    fn offset_hand(b: Bencher) {
        let input = timestamps(rfc3339);
        b.counter(ROWS).bench_local(|| {
            for s in &input {
                black_box(parse_datetime(black_box(s.as_bytes())).is_ok());
            }
        });
    }

    #[divan::bench]
    fn offset_chrono_rfc3339(b: Bencher) {
        let input = timestamps(rfc3339);
        b.counter(ROWS).bench_local(|| {
            for s in &input {
                let t = chrono::DateTime::parse_from_rfc3339(black_box(s));
                black_box(t.map(|t| t.timestamp_micros()).is_ok());
            }
        });
    }

    #[divan::bench]
    fn naive_hand(b: Bencher) {
        let input = timestamps(naive);
        b.counter(ROWS).bench_local(|| {
            for s in &input {
                black_box(parse_datetime(black_box(s.as_bytes())).is_ok());
            }
        });
    }

    #[divan::bench]
    fn naive_chrono_parse_from_str(b: Bencher) {
        let input = timestamps(naive);
        b.counter(ROWS).bench_local(|| {
            for s in &input {
                let t = chrono::NaiveDateTime::parse_from_str(black_box(s), "%Y-%m-%dT%H:%M:%S%.f");
                black_box(t.is_ok());
            }
        });
    }
}

/// A reading as the staging `COPY` carries it.
struct Row {
    line: i64,
    sensor: uuid::Uuid,
    unix_micros: i64,
    value: f64,
}

fn rows() -> Vec<Row> {
    let sensors: Vec<uuid::Uuid> = (0..10u128).map(uuid::Uuid::from_u128).collect();
    (0..ROWS as i64)
        .map(|i| Row {
            line: i + 2,
            sensor: sensors[i as usize % sensors.len()],
            unix_micros: 1_357_000_000_000_000 + i * 1_000_000,
            value: i as f64 * 0.25,
        })
        .collect()
}

const STAGING: &str = "CREATE TEMPORARY TABLE IF NOT EXISTS bench_rows (
    line int8, sensor_uuid uuid, ts timestamptz, sensor_value float8, raw bytea, reason text)";
const COPY: &str = "COPY bench_rows FROM STDIN (FORMAT binary)";

/// A runtime and a connection to a database of the bench's own, made once.
fn database() -> &'static (tokio::runtime::Runtime, tokio_postgres::Client) {
    static DB: OnceLock<(tokio::runtime::Runtime, tokio_postgres::Client)> = OnceLock::new();
    DB.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = rt.block_on(async {
            let url = testbed::postgres()
                .await
                .expect("PostgreSQL")
                .create_database()
                .await
                .expect("a database");
            let client = testbed::connect(&url).await.expect("connect");
            client.batch_execute(STAGING).await.expect("staging table");
            client
        });
        (rt, client)
    })
}

mod copy {
    use super::*;

    fn encode(enc: &mut CopyEncoder, r: &Row) {
        enc.row(6);
        enc.int8(r.line);
        enc.uuid(&r.sensor);
        enc.timestamptz(r.unix_micros);
        enc.float8(r.value);
        enc.null();
        enc.null();
    }

    #[divan::bench]
    fn encode_only_hand(b: Bencher) {
        let rows = rows();
        b.counter(ROWS).bench_local(|| {
            let mut enc = CopyEncoder::new();
            let mut bytes = 0;
            for r in &rows {
                encode(&mut enc, black_box(r));
                if let Some(chunk) = enc.take_if_full() {
                    bytes += black_box(chunk).len();
                }
            }
            bytes + enc.finish().len()
        });
    }

    async fn with_hand(client: &tokio_postgres::Client, rows: &[Row]) {
        client.batch_execute("TRUNCATE bench_rows").await.unwrap();
        let sink = client.copy_in::<_, Bytes>(COPY).await.unwrap();
        futures_util::pin_mut!(sink);
        let mut enc = CopyEncoder::new();
        for r in rows {
            encode(&mut enc, r);
            if let Some(chunk) = enc.take_if_full() {
                sink.send(chunk).await.unwrap();
            }
        }
        sink.send(enc.finish()).await.unwrap();
        assert_eq!(sink.finish().await.unwrap(), ROWS as u64);
    }

    async fn with_writer(client: &tokio_postgres::Client, rows: &[Row]) {
        const TYPES: [Type; 6] = [
            Type::INT8,
            Type::UUID,
            Type::TIMESTAMPTZ,
            Type::FLOAT8,
            Type::BYTEA,
            Type::TEXT,
        ];
        client.batch_execute("TRUNCATE bench_rows").await.unwrap();
        let sink = client.copy_in(COPY).await.unwrap();
        let writer = BinaryCopyInWriter::new(sink, &TYPES);
        futures_util::pin_mut!(writer);
        let (raw, reason): (Option<&[u8]>, Option<&str>) = (None, None);
        for r in rows {
            let ts = chrono::DateTime::from_timestamp_micros(r.unix_micros).unwrap();
            let fields: [&(dyn ToSql + Sync); 6] =
                [&r.line, &r.sensor, &ts, &r.value, &raw, &reason];
            writer.as_mut().write(&fields).await.unwrap();
        }
        assert_eq!(writer.finish().await.unwrap(), ROWS as u64);
    }

    #[divan::bench(sample_count = 30)]
    fn to_server_hand(b: Bencher) {
        let (rt, client) = database();
        let rows = rows();
        b.counter(ROWS)
            .bench_local(|| rt.block_on(with_hand(client, &rows)));
    }

    #[divan::bench(sample_count = 30)]
    fn to_server_binary_copy_in_writer(b: Bencher) {
        let (rt, client) = database();
        let rows = rows();
        b.counter(ROWS)
            .bench_local(|| rt.block_on(with_writer(client, &rows)));
    }

    /// The client's CPU time per `COPY` of [`ROWS`] rows, both ways alternately, medians.
    pub fn client_cpu() {
        const RUNS: usize = 31;
        let (rt, client) = database();
        let rows = rows();
        let cpu = || {
            let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
            t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6
        };
        let (mut hand, mut writer) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let start = cpu();
            rt.block_on(with_hand(client, &rows));
            hand.push(cpu() - start);
            let start = cpu();
            rt.block_on(with_writer(client, &rows));
            writer.push(cpu() - start);
        }
        for (name, mut ms) in [("CopyEncoder", hand), ("BinaryCopyInWriter", writer)] {
            ms.sort_by(f64::total_cmp);
            println!(
                "client CPU per COPY of {ROWS} rows, {name}: median {:.1} ms (min {:.1}, max {:.1}, {RUNS} runs)",
                ms[RUNS / 2],
                ms[0],
                ms[RUNS - 1]
            );
        }
    }
}
