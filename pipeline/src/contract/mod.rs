//! The CSV data contract (SPEC §2; user-facing version in `docs/data-contract.md`).
//!
//! Two kinds of file carry data: mapping files (`sensor_uuid`, `sensor_name`) and measurement files
//! (`timestamp`, `sensor_uuid`, `sensor_value`). Columns are found by header name, trimmed and
//! case-insensitive, in any order; other columns are ignored. Problems with the file as a whole
//! ([`FileError`]) fail the object; problems with one row ([`Rejection`]) quarantine that row only.

pub mod number;
pub mod records;
pub mod timestamp;

use std::fmt;

use thiserror::Error;
use uuid::Uuid;

pub use records::{Record, RecordError, RecordReader};

/// What a data file holds, decided by its key prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dataset {
    /// `mapping/…`: sensor UUID → name.
    Mapping,
    /// `timeseries/…`: readings.
    Measurements,
}

impl Dataset {
    /// The header names this kind of file must have, in the order [`Columns`] reports them.
    pub fn required_columns(self) -> &'static [&'static str] {
        match self {
            Dataset::Mapping => &["sensor_uuid", "sensor_name"],
            Dataset::Measurements => &["timestamp", "sensor_uuid", "sensor_value"],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dataset::Mapping => "mapping",
            Dataset::Measurements => "measurements",
        }
    }
}

/// Why a whole file was not ingested. Nothing of such a file is stored, and it is not retried.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FileError {
    #[error("the file has no header row")]
    NoHeader,
    #[error("the header row is not valid UTF-8")]
    HeaderNotUtf8,
    #[error("the header lacks required column(s) {}; it has: {}", .missing.join(", "), .found.join(", "))]
    MissingColumns {
        missing: Vec<&'static str>,
        found: Vec<String>,
    },
    #[error("the header names column {0} more than once")]
    DuplicateColumn(&'static str),
    #[error("corrupt gzip data: {0}")]
    CorruptGzip(String),
    #[error("{0}")]
    Unreadable(String),
    /// The database refused the object's rows for what they are (e.g. a `CHECK` constraint an
    /// operator added): retrying cannot help.
    #[error("the database refused the rows: {0}")]
    Refused(String),
    /// A limit of [`crate::config::LimitSettings`] was passed.
    #[error("{0}")]
    Limit(String),
}

/// Where the required columns are in a file's rows.
#[derive(Debug, Clone)]
pub struct Columns {
    /// Field index of each required column, in [`Dataset::required_columns`] order.
    index: [usize; 3],
    /// How many fields the header has (and every row must have).
    width: usize,
}

impl Columns {
    /// Finds the required columns of `dataset` in a header record.
    pub fn locate(header: &Record<'_>, dataset: Dataset) -> Result<Self, FileError> {
        let mut names = Vec::with_capacity(header.len());
        for field in header.iter() {
            let name = std::str::from_utf8(field).map_err(|_| FileError::HeaderNotUtf8)?;
            names.push(name.trim());
        }
        let required = dataset.required_columns();
        let mut index = [usize::MAX; 3];
        let mut missing = Vec::new();
        for (slot, want) in required.iter().enumerate() {
            let mut hits = names
                .iter()
                .enumerate()
                .filter(|(_, n)| n.eq_ignore_ascii_case(want));
            match (hits.next(), hits.next()) {
                (Some((i, _)), None) => index[slot] = i,
                (Some(_), Some(_)) => return Err(FileError::DuplicateColumn(want)),
                (None, _) => missing.push(*want),
            }
        }
        if !missing.is_empty() {
            return Err(FileError::MissingColumns {
                missing,
                found: names.iter().map(|n| printable(n)).collect(),
            });
        }
        Ok(Self {
            index,
            width: header.len(),
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }
}

/// `s` with control characters escaped (`\0`, `\u{1b}`, …): a header name echoed into a reason
/// must be storable as text (PostgreSQL refuses NUL) and readable in a log line.
fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Why one row was rejected: the reason stored with it in quarantine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    FieldCount {
        found: usize,
        expected: usize,
    },
    NotUtf8 {
        column: &'static str,
    },
    Invalid {
        column: &'static str,
        value: String,
        problem: String,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::FieldCount { found, expected } => {
                write!(f, "row has {found} field(s), the header has {expected}")
            }
            Rejection::NotUtf8 { column } => write!(f, "{column} is not valid UTF-8"),
            Rejection::Invalid {
                column,
                value,
                problem,
            } => write!(f, "{column} {value:?} {problem}"),
        }
    }
}

impl Rejection {
    fn invalid(column: &'static str, value: &str, problem: impl fmt::Display) -> Self {
        const SHOWN: usize = 80;
        let value = match value.char_indices().nth(SHOWN) {
            Some((cut, _)) => format!("{}…", &value[..cut]),
            None => value.to_string(),
        };
        Rejection::Invalid {
            column,
            value,
            problem: problem.to_string(),
        }
    }
}

/// A valid measurement row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub sensor_uuid: Uuid,
    /// Microseconds since the Unix epoch, UTC.
    pub unix_micros: i64,
    pub value: f64,
}

/// A valid mapping row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SensorName<'a> {
    pub sensor_uuid: Uuid,
    pub name: &'a str,
}

/// The longest accepted sensor name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

fn check_width(rec: &Record<'_>, cols: &Columns) -> Result<(), Rejection> {
    if rec.len() == cols.width {
        Ok(())
    } else {
        Err(Rejection::FieldCount {
            found: rec.len(),
            expected: cols.width,
        })
    }
}

/// Field `slot` of the required columns, as trimmed text.
fn text<'a>(
    rec: &Record<'a>,
    cols: &Columns,
    dataset: Dataset,
    slot: usize,
) -> Result<&'a str, Rejection> {
    let column = dataset.required_columns()[slot];
    let bytes = rec.field(cols.index[slot]).unwrap_or_default();
    let s = std::str::from_utf8(bytes).map_err(|_| Rejection::NotUtf8 { column })?;
    Ok(s.trim())
}

fn sensor_uuid(s: &str) -> Result<Uuid, Rejection> {
    Uuid::try_parse(s).map_err(|_| {
        Rejection::invalid(
            "sensor_uuid",
            s,
            "is not a UUID (expected e.g. cd613e30-d8f1-4adf-91b7-584a2265b1f5)",
        )
    })
}

/// Validates one measurement row.
pub fn reading(
    rec: &Record<'_>,
    cols: &Columns,
    zone: chrono_tz::Tz,
) -> Result<Reading, Rejection> {
    const D: Dataset = Dataset::Measurements;
    check_width(rec, cols)?;
    let ts = text(rec, cols, D, 0)?;
    let uuid = text(rec, cols, D, 1)?;
    let value = text(rec, cols, D, 2)?;
    let unix_micros = timestamp::parse_datetime(ts.as_bytes())
        .and_then(|t| t.resolve(zone))
        .map_err(|e| Rejection::invalid("timestamp", ts, e))?;
    let sensor_uuid = sensor_uuid(uuid)?;
    let value = number::parse_decimal(value.as_bytes())
        .map_err(|e| Rejection::invalid("sensor_value", value, e))?;
    Ok(Reading {
        sensor_uuid,
        unix_micros,
        value,
    })
}

/// Validates one mapping row.
pub fn sensor_name<'a>(rec: &Record<'a>, cols: &Columns) -> Result<SensorName<'a>, Rejection> {
    const D: Dataset = Dataset::Mapping;
    check_width(rec, cols)?;
    let uuid = text(rec, cols, D, 0)?;
    let name = text(rec, cols, D, 1)?;
    let sensor_uuid = sensor_uuid(uuid)?;
    if name.is_empty() {
        return Err(Rejection::invalid("sensor_name", name, "is empty"));
    }
    if name.contains('\0') {
        // Valid UTF-8, but PostgreSQL's text cannot hold it: the row, not the file, is at fault.
        return Err(Rejection::invalid(
            "sensor_name",
            name,
            "contains a NUL character, which a name cannot hold",
        ));
    }
    let chars = name.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(Rejection::invalid(
            "sensor_name",
            name,
            format!("is {chars} characters long (at most {MAX_NAME_CHARS})"),
        ));
    }
    Ok(SensorName { sensor_uuid, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every record after the header of `csv`.
    fn with_rows<T>(
        csv: &[u8],
        dataset: Dataset,
        mut f: impl FnMut(&Record<'_>, &Columns) -> T,
    ) -> Result<Vec<T>, FileError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = RecordReader::new(csv, b';');
            let header = r.next_record().await.unwrap().ok_or(FileError::NoHeader)?;
            let cols = Columns::locate(&header, dataset)?;
            let mut out = Vec::new();
            while let Some(rec) = r.next_record().await.unwrap() {
                out.push(f(&rec, &cols));
            }
            Ok(out)
        })
    }

    fn readings(csv: &str) -> Vec<Result<Reading, String>> {
        with_rows(csv.as_bytes(), Dataset::Measurements, |r, c| {
            reading(r, c, chrono_tz::Europe::Berlin).map_err(|e| e.to_string())
        })
        .unwrap()
    }

    const U: &str = "cd613e30-d8f1-4adf-91b7-584a2265b1f5";

    #[test]
    fn columns_by_name_in_any_order_case_and_space_insensitive() {
        let got = readings(&format!(
            " Sensor_Value ;unit; TIMESTAMP;sensor_uuid\n1,5;C;2013-01-20T08:00:00Z;{U}\n"
        ));
        assert_eq!(
            got,
            vec![Ok(Reading {
                sensor_uuid: U.parse().unwrap(),
                unix_micros: 1_358_668_800_000_000,
                value: 1.5
            })]
        );
    }

    #[test]
    fn file_errors() {
        let err =
            with_rows(b"timestamp;sensor_uuid\n", Dataset::Measurements, |_, _| ()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the header lacks required column(s) sensor_value; it has: timestamp, sensor_uuid"
        );
        let err = with_rows(b"\n\n", Dataset::Measurements, |_, _| ()).unwrap_err();
        assert_eq!(err, FileError::NoHeader);
        let err = with_rows(
            b"sensor_uuid;sensor_name;SENSOR_NAME\n",
            Dataset::Mapping,
            |_, _| (),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the header names column sensor_name more than once"
        );
        let err = with_rows(
            b"sensor_uuid;sensor_\xffname\n",
            Dataset::Mapping,
            |_, _| (),
        )
        .unwrap_err();
        assert_eq!(err, FileError::HeaderNotUtf8);
    }

    #[test]
    fn row_rejections_say_why() {
        let got = readings(&format!(
            "timestamp;sensor_uuid;sensor_value;note\n\
             2013-01-20T08:00:00Z;{U};1\n\
             2013-01-20T08:00:00Z;{U};1;x;y\n\
             2013-02-30T08:00:00Z;{U};1;x\n\
             2013-03-31T02:30:00;{U};1;x\n\
             2013-01-20T08:00:00Z;nope;1;x\n\
             2013-01-20T08:00:00Z;{U};;x\n\
             2013-01-20T08:00:00Z;{U};NaN;x\n"
        ));
        let errs: Vec<String> = got.into_iter().map(|r| r.unwrap_err()).collect();
        assert_eq!(
            errs,
            vec![
                "row has 3 field(s), the header has 4",
                "row has 5 field(s), the header has 4",
                "timestamp \"2013-02-30T08:00:00Z\" is not a valid calendar date or time of day",
                "timestamp \"2013-03-31T02:30:00\" does not exist in Europe/Berlin (skipped by the daylight-saving change)",
                "sensor_uuid \"nope\" is not a UUID (expected e.g. cd613e30-d8f1-4adf-91b7-584a2265b1f5)",
                "sensor_value \"\" is empty",
                "sensor_value \"NaN\" is not a decimal number",
            ]
        );
    }

    #[test]
    fn non_utf8_fields_are_rejected_only_when_read() {
        let mut bytes =
            format!("timestamp;sensor_uuid;sensor_value;note\n2013-01-20T08:00:00Z;{U};1;")
                .into_bytes();
        bytes.push(0xff);
        bytes.extend_from_slice(format!("\n2013-01-20T08:00:00Z;{U};").as_bytes());
        bytes.push(0xff);
        bytes.extend_from_slice(b";x\n");
        let got = with_rows(&bytes, Dataset::Measurements, |r, c| {
            reading(r, c, chrono_tz::UTC).map_err(|e| e.to_string())
        })
        .unwrap();
        assert!(got[0].is_ok());
        assert_eq!(got[1], Err("sensor_value is not valid UTF-8".to_string()));
    }

    #[test]
    fn uuid_forms() {
        for form in [
            "cd613e30-d8f1-4adf-91b7-584a2265b1f5",
            "CD613E30-D8F1-4ADF-91B7-584A2265B1F5",
            "cd613e30d8f14adf91b7584a2265b1f5",
            "{cd613e30-d8f1-4adf-91b7-584a2265b1f5}",
            "urn:uuid:cd613e30-d8f1-4adf-91b7-584a2265b1f5",
            " cd613e30-d8f1-4adf-91b7-584a2265b1f5 ",
        ] {
            let got = readings(&format!(
                "timestamp;sensor_uuid;sensor_value\n2013-01-20T08:00:00Z;{form};1\n"
            ));
            assert_eq!(
                got[0].as_ref().unwrap().sensor_uuid.to_string(),
                U,
                "{form}"
            );
        }
    }

    #[test]
    fn sensor_names() {
        let long = "x".repeat(101);
        let ok100 = "é".repeat(100);
        let csv = format!(
            "sensor_uuid;sensor_name\n{U};  boiler 1  \n{U};   \n{U};{long}\n{U};{ok100}\n"
        );
        let got = with_rows(csv.as_bytes(), Dataset::Mapping, |r, c| {
            sensor_name(r, c)
                .map(|s| s.name.to_string())
                .map_err(|e| e.to_string())
        })
        .unwrap();
        assert_eq!(got[0], Ok("boiler 1".to_string()));
        assert_eq!(got[1], Err("sensor_name \"\" is empty".to_string()));
        assert_eq!(
            got[2],
            Err(format!(
                "sensor_name \"{}…\" is 101 characters long (at most 100)",
                "x".repeat(80)
            ))
        );
        assert_eq!(got[3], Ok(ok100));
    }

    proptest::proptest! {
        /// Arbitrary bytes through the whole row path: never a panic, always a row or a reason.
        #[test]
        fn arbitrary_rows_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut csv = b"timestamp;sensor_uuid;sensor_value\n".to_vec();
            csv.extend_from_slice(&body);
            let rows = with_rows(&csv, Dataset::Measurements, |r, c| {
                (r.line, reading(r, c, chrono_tz::Europe::Berlin).map_err(|e| e.to_string()))
            }).unwrap();
            for (line, row) in rows {
                proptest::prop_assert!(line >= 2);
                if let Err(reason) = row {
                    proptest::prop_assert!(!reason.is_empty());
                }
            }
        }
    }
}
