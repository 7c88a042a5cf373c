//! The `--start-timestamp`/`--end-timestamp` flags: everything the CSV contract accepts for a
//! timestamp, plus a bare date (midnight). Without an offset the time is UTC, not the ingestion's
//! `NAIVE_TIMEZONE`: a query should mean the same thing wherever it is typed.

use chrono::{DateTime, Utc};
use sensor_pipeline::contract::timestamp::{parse_date, parse_datetime, Timestamp};

pub const ACCEPTED: &str = "accepted: YYYY-MM-DD, or YYYY-MM-DD[T| ]HH:MM[:SS[.ffffff]] \
                            optionally followed by Z, ±HH, ±HHMM or ±HH:MM (UTC when omitted)";

/// Parses a range flag value into an instant.
pub fn parse_instant(text: &str) -> Result<DateTime<Utc>, String> {
    let s = text.trim().as_bytes();
    let micros = if s.len() == 10 {
        parse_date(s)
            .map(|d| {
                d.and_time(chrono::NaiveTime::MIN)
                    .and_utc()
                    .timestamp_micros()
            })
            .map_err(|e| e.to_string())?
    } else {
        match parse_datetime(s).map_err(|e| e.to_string())? {
            Timestamp::Instant(us) => us,
            Timestamp::Naive(local) => local.and_utc().timestamp_micros(),
        }
    };
    DateTime::from_timestamp_micros(micros).ok_or_else(|| "is out of range".to_string())
}

/// A clap value parser with a message that says what is accepted.
pub fn flag(text: &str) -> Result<DateTime<Utc>, String> {
    parse_instant(text).map_err(|reason| format!("{reason}; {ACCEPTED}"))
}

/// The range must not end before it starts (both ends are inclusive).
pub fn check(start: DateTime<Utc>, end: DateTime<Utc>) -> Result<(), crate::Failure> {
    if start > end {
        return Err(crate::Failure::Usage(format!(
            "--start-timestamp ({}) is after --end-timestamp ({}); the range is [start, end], both inclusive",
            crate::output::timestamp(start),
            crate::output::timestamp(end)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> String {
        parse_instant(s).unwrap().to_rfc3339()
    }

    #[test]
    fn every_form() {
        assert_eq!(at("2012-12-31T23:07:00+00"), "2012-12-31T23:07:00+00:00");
        assert_eq!(at("2013-01-01"), "2013-01-01T00:00:00+00:00");
        assert_eq!(at("2013-01-01 01:00"), "2013-01-01T01:00:00+00:00");
        assert_eq!(at("2013-01-01T01:00:00Z"), "2013-01-01T01:00:00+00:00");
        assert_eq!(at("2013-01-01t01:00:00z"), "2013-01-01T01:00:00+00:00");
        assert_eq!(at("2013-01-01T01:00:00+0130"), "2012-12-31T23:30:00+00:00");
        assert_eq!(at("2013-01-01T01:00:00-01:00"), "2013-01-01T02:00:00+00:00");
        assert_eq!(
            at("2013-01-01T01:00:00.123456789"),
            "2013-01-01T01:00:00.123456+00:00"
        );
        assert_eq!(
            at("2013-01-01T01:00:00,5+01"),
            "2013-01-01T00:00:00.500+00:00"
        );
    }

    #[test]
    fn rejects_with_what_is_wrong() {
        assert_eq!(
            parse_instant("2013-02-30").unwrap_err(),
            "is not a valid calendar date or time of day"
        );
        assert!(parse_instant("yesterday")
            .unwrap_err()
            .starts_with("is not an ISO 8601"));
        assert!(flag("13/01/2013")
            .unwrap_err()
            .contains("accepted: YYYY-MM-DD"));
        assert_eq!(
            parse_instant("2013-01-01T00:00+25").unwrap_err(),
            "has an invalid UTC offset"
        );
    }
}
