//! The `sensor_value` field (SPEC §2): a decimal number with `.` or `,` as the decimal separator,
//! an optional sign and an optional exponent. Empty, non-numeric, NaN and infinite values (including
//! numbers too large for a double) are rejected.
//!
//! The grammar is checked here, byte by byte, so that only plain decimal notation reaches the
//! standard float parser (which on its own would also take `inf`, `NaN` and friends).

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum NumberError {
    #[error("is empty")]
    Empty,
    #[error("is not a decimal number")]
    Syntax,
    #[error("is out of range for a double-precision number")]
    OutOfRange,
}

/// Parses a decimal number (`s` already trimmed).
pub fn parse_decimal(s: &[u8]) -> Result<f64, NumberError> {
    if s.is_empty() {
        return Err(NumberError::Empty);
    }
    let separator = validate(s)?;
    let value = match separator {
        Some(at) if s[at] == b',' => {
            // Swap the comma for a dot on the stack; numbers longer than this are absurd but legal.
            let mut small = [0u8; 64];
            let mut owned;
            let buf: &mut [u8] = if s.len() <= small.len() {
                &mut small[..s.len()]
            } else {
                owned = vec![0u8; s.len()];
                &mut owned
            };
            buf.copy_from_slice(s);
            buf[at] = b'.';
            parse_ascii(buf)
        }
        _ => parse_ascii(s),
    }?;
    if value.is_finite() {
        Ok(value)
    } else {
        Err(NumberError::OutOfRange)
    }
}

fn parse_ascii(s: &[u8]) -> Result<f64, NumberError> {
    // `validate` admitted only ASCII, so this cannot fail.
    let text = std::str::from_utf8(s).map_err(|_| NumberError::Syntax)?;
    text.parse::<f64>().map_err(|_| NumberError::Syntax)
}

/// Checks `[+-]? (digits [sep digits?] | sep digits) ([eE] [+-]? digits)?` and returns where the
/// decimal separator is, if any.
fn validate(s: &[u8]) -> Result<Option<usize>, NumberError> {
    let mut i = 0;
    if matches!(s.first(), Some(b'+' | b'-')) {
        i += 1;
    }
    let int_start = i;
    while i < s.len() && s[i].is_ascii_digit() {
        i += 1;
    }
    let mut digits = i - int_start;
    let mut separator = None;
    if i < s.len() && matches!(s[i], b'.' | b',') {
        separator = Some(i);
        i += 1;
        let frac_start = i;
        while i < s.len() && s[i].is_ascii_digit() {
            i += 1;
        }
        digits += i - frac_start;
    }
    if digits == 0 {
        return Err(NumberError::Syntax);
    }
    if i < s.len() && matches!(s[i], b'e' | b'E') {
        i += 1;
        if i < s.len() && matches!(s[i], b'+' | b'-') {
            i += 1;
        }
        let exp_start = i;
        while i < s.len() && s[i].is_ascii_digit() {
            i += 1;
        }
        if i == exp_start {
            return Err(NumberError::Syntax);
        }
    }
    if i != s.len() {
        return Err(NumberError::Syntax);
    }
    Ok(separator)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<f64, NumberError> {
        parse_decimal(s.as_bytes())
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(p("21.5"), Ok(21.5));
        assert_eq!(p("21,75"), Ok(21.75));
        assert_eq!(p("-3"), Ok(-3.0));
        assert_eq!(p("+3.25"), Ok(3.25));
        assert_eq!(p(".5"), Ok(0.5));
        assert_eq!(p(",5"), Ok(0.5));
        assert_eq!(p("5."), Ok(5.0));
        assert_eq!(p("1e3"), Ok(1000.0));
        assert_eq!(p("1,5E-2"), Ok(0.015));
        assert_eq!(p("-2.5e+2"), Ok(-250.0));
        assert_eq!(p("0.1"), Ok(0.1));
        let long = format!("0,{}1", "0".repeat(100));
        assert_eq!(p(&long), Ok(1e-101));
    }

    #[test]
    fn rejected_forms() {
        assert_eq!(p(""), Err(NumberError::Empty));
        for s in [
            "NaN",
            "nan",
            "inf",
            "-inf",
            "Infinity",
            "abc",
            "1.2.3",
            "1,2,3",
            "1.234,5",
            "1e",
            "e5",
            ".",
            "-",
            "+",
            "1 000",
            "0x10",
            "12a",
            "1e5.5",
            "--1",
            "not-a-number",
        ] {
            assert_eq!(p(s), Err(NumberError::Syntax), "{s}");
        }
        assert_eq!(p("1e400"), Err(NumberError::OutOfRange));
        assert_eq!(p("-1e400"), Err(NumberError::OutOfRange));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            let _ = parse_decimal(&s);
        }

        #[test]
        fn round_trips_finite_doubles(v in proptest::num::f64::NORMAL | proptest::num::f64::SUBNORMAL | proptest::num::f64::ZERO) {
            let dot = format!("{v:?}");
            proptest::prop_assert_eq!(p(&dot), Ok(v));
            let comma = dot.replace('.', ",");
            proptest::prop_assert_eq!(p(&comma), Ok(v));
            let exp = format!("{v:e}");
            proptest::prop_assert_eq!(p(&exp), Ok(v));
        }
    }
}
