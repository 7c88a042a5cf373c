//! Output formats shared by the commands: an aligned table for people, CSV, and JSON lines.
//!
//! Timestamps are RFC 3339 in UTC (`2013-01-01T00:07:00Z`, with `.fff` or `.ffffff` only when the
//! instant has a fraction). Numbers are printed in their shortest form that reads back as the same
//! `f64` (`21.5`, `1`, `-0.001`).

use std::io::Write;

use chrono::{DateTime, Datelike, Timelike, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// Appends `t` as RFC 3339 UTC. Hand-rolled because the readings stream prints one per row.
pub fn push_timestamp(buf: &mut Vec<u8>, t: DateTime<Utc>) {
    let year = t.year();
    if !(0..=9999).contains(&year) {
        buf.extend_from_slice(
            t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                .as_bytes(),
        );
        return;
    }
    push_digits(buf, year as u32, 4);
    buf.push(b'-');
    push_digits(buf, t.month(), 2);
    buf.push(b'-');
    push_digits(buf, t.day(), 2);
    buf.push(b'T');
    push_digits(buf, t.hour(), 2);
    buf.push(b':');
    push_digits(buf, t.minute(), 2);
    buf.push(b':');
    push_digits(buf, t.second(), 2);
    let micros = t.timestamp_subsec_micros();
    if micros != 0 {
        buf.push(b'.');
        if micros.is_multiple_of(1000) {
            push_digits(buf, micros / 1000, 3);
        } else {
            push_digits(buf, micros, 6);
        }
    }
    buf.push(b'Z');
}

pub fn timestamp(t: DateTime<Utc>) -> String {
    let mut buf = Vec::with_capacity(27);
    push_timestamp(&mut buf, t);
    String::from_utf8(buf).expect("ASCII")
}

fn push_digits(buf: &mut Vec<u8>, mut n: u32, width: usize) {
    let start = buf.len();
    buf.resize(start + width, b'0');
    for slot in buf[start..].iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Appends the shortest decimal form of `v` that parses back to the same value, without an
/// exponent.
///
/// The digits are `ryu`'s, three times as fast as `Display`'s (29 against 87 ns a value, measured
/// on a million readings; a `readings --every 1h` over a year prints 43,800 of them). The two
/// agree but where a value lies exactly halfway between its two shortest forms: `Display` rounds
/// the last digit up, `ryu` to even, and both read back as the value (1,241 of 20 million random
/// values, all above 10^13).
pub fn push_value(buf: &mut Vec<u8>, v: f64) {
    if !v.is_finite() {
        let _ = write!(buf, "{v}");
        return;
    }
    let mut digits = ryu::Buffer::new();
    let text = digits.format_finite(v);
    let Some((mantissa, exponent)) = text.split_once('e') else {
        buf.extend_from_slice(text.strip_suffix(".0").unwrap_or(text).as_bytes());
        return;
    };
    // `d.ddde±x`, as plain decimal.
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: Vec<u8> = mantissa.bytes().filter(|b| *b != b'.').collect();
    let point = 1 + exponent.parse::<i64>().unwrap_or(0);
    buf.extend_from_slice(sign.as_bytes());
    if point <= 0 {
        buf.extend_from_slice(b"0.");
        buf.extend(std::iter::repeat_n(b'0', (-point) as usize));
        buf.extend_from_slice(&digits);
    } else if point as usize >= digits.len() {
        buf.extend_from_slice(&digits);
        buf.extend(std::iter::repeat_n(b'0', point as usize - digits.len()));
    } else {
        let (int, frac) = digits.split_at(point as usize);
        buf.extend_from_slice(int);
        buf.push(b'.');
        buf.extend_from_slice(frac);
    }
}

/// One record of a command's output. CSV and JSON serialise it as it is (`None` is an empty CSV
/// field and a JSON `null`); the table picks and formats cells for people.
pub trait Record: serde::Serialize + Sized + 'static {
    /// The CSV header: the record's field names, in order.
    const FIELDS: &'static [&'static str];
    /// The table's columns, in order.
    const TABLE: &'static [Column<Self>];
}

/// A table column: its header, its alignment and the cell a record shows in it.
pub struct Column<R> {
    header: &'static str,
    align: Align,
    cell: fn(&R) -> String,
}

impl<R> Column<R> {
    pub const fn left(header: &'static str, cell: fn(&R) -> String) -> Self {
        Self {
            header,
            align: Align::Left,
            cell,
        }
    }

    pub const fn right(header: &'static str, cell: fn(&R) -> String) -> Self {
        Self {
            header,
            align: Align::Right,
            cell,
        }
    }
}

/// Writes `records` in `format`: CSV with a header row (also when there are no records), JSON one
/// object per line, or an aligned table.
pub fn render<R: Record>(
    out: &mut impl Write,
    format: Format,
    records: &[R],
) -> std::io::Result<()> {
    match format {
        Format::Json => {
            for r in records {
                serde_json::to_writer(&mut *out, r)?;
                out.write_all(b"\n")?;
            }
        }
        Format::Csv => {
            let mut csv = csv::WriterBuilder::new()
                .has_headers(false)
                .from_writer(&mut *out);
            csv.write_record(R::FIELDS)?;
            for r in records {
                csv.serialize(r)?;
            }
            csv.flush()?;
        }
        Format::Table => {
            let columns: Vec<(&str, Align)> =
                R::TABLE.iter().map(|c| (c.header, c.align)).collect();
            let rows: Vec<Vec<String>> = records
                .iter()
                .map(|r| R::TABLE.iter().map(|c| (c.cell)(r)).collect())
                .collect();
            write_table(out, &columns, &rows)?;
        }
    }
    Ok(())
}

/// Column alignment in tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// Writes rows as a table with a header, each column as wide as its widest cell.
pub fn write_table(
    out: &mut impl Write,
    columns: &[(&str, Align)],
    rows: &[Vec<String>],
) -> std::io::Result<()> {
    let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header: Vec<String> = columns.iter().map(|(h, _)| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, ((cell, (_, align)), width)) in row.iter().zip(columns).zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = width - cell.chars().count();
            match align {
                Align::Left => {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
                Align::Right => {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                }
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// The header serde gives a record (tests check it equals [`Record::FIELDS`]).
#[cfg(test)]
pub fn serde_header<R: Record>(r: &R) -> String {
    let mut csv = csv::Writer::from_writer(Vec::new());
    csv.serialize(r).expect("serialisable");
    let text = String::from_utf8(csv.into_inner().expect("flushed")).expect("UTF-8");
    text.lines().next().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(us: i64) -> String {
        timestamp(DateTime::from_timestamp_micros(us).unwrap())
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(ts(1_356_995_220_000_000), "2012-12-31T23:07:00Z");
        assert_eq!(ts(1_356_995_220_500_000), "2012-12-31T23:07:00.500Z");
        assert_eq!(ts(1_356_995_220_000_001), "2012-12-31T23:07:00.000001Z");
        assert_eq!(ts(0), "1970-01-01T00:00:00Z");
        assert_eq!(ts(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn values_round_trip_shortest() {
        for (v, s) in [
            (21.5, "21.5"),
            (1.0, "1"),
            (-0.001, "-0.001"),
            (0.1 + 0.2, "0.30000000000000004"),
            (-0.0, "-0"),
            (1e21, "1000000000000000000000"),
            (1.5e-7, "0.00000015"),
            (-2.5e-10, "-0.00000000025"),
            (123456789012345680.0, "123456789012345680"),
            (5e-324, &format!("0.{}5", "0".repeat(323))),
            (f64::MAX, &format!("17976931348623157{}", "0".repeat(292))),
            // Exactly halfway between its two shortest forms: rounded to even (`Display` says
            // 233115890514796.13).
            (233_115_890_514_796.0 + 0.125, "233115890514796.12"),
        ] {
            let mut buf = Vec::new();
            push_value(&mut buf, v);
            assert_eq!(String::from_utf8(buf).unwrap(), s);
            assert_eq!(s.parse::<f64>().unwrap().to_bits(), v.to_bits());
        }
    }

    /// Where no tie is involved, the same text as `Display`, over values of every magnitude.
    #[test]
    fn values_print_as_display_does() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits(x >> 1 | (x & 1) << 63);
            if !v.is_finite() || v.abs() >= 1e13 {
                continue;
            }
            let mut buf = Vec::new();
            push_value(&mut buf, v);
            assert_eq!(String::from_utf8(buf).unwrap(), v.to_string(), "{v:e}");
        }
    }

    #[test]
    fn table_aligns() {
        let mut out = Vec::new();
        write_table(
            &mut out,
            &[("name", Align::Left), ("n", Align::Right)],
            &[
                vec!["a".into(), "100".into()],
                vec!["long name".into(), "2".into()],
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "name         n\na          100\nlong name    2\n"
        );
    }
}
