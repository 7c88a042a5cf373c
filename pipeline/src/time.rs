//! Instants as the pipeline keeps them: microseconds since the Unix epoch, UTC — what
//! PostgreSQL's `timestamptz` stores, and what the detector and the rollups count in.

use chrono::{DateTime, Utc};

pub const HOUR_MICROS: i64 = 3_600_000_000;
pub const DAY_MICROS: i64 = 24 * HOUR_MICROS;

/// The instant `micros` after the epoch; past chrono's range, its last instant.
pub fn instant(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The start of the UTC hour `micros` falls in.
pub fn hour_of(micros: i64) -> i64 {
    micros.div_euclid(HOUR_MICROS) * HOUR_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_and_instants() {
        assert_eq!(hour_of(HOUR_MICROS + 5), HOUR_MICROS);
        assert_eq!(hour_of(-1), -HOUR_MICROS);
        assert_eq!(instant(0).to_rfc3339(), "1970-01-01T00:00:00+00:00");
        assert_eq!(instant(i64::MAX), DateTime::<Utc>::MAX_UTC);
    }
}
