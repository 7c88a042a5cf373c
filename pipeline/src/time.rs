//! Instants as the pipeline keeps them: microseconds since the Unix epoch, UTC — what
//! PostgreSQL's `timestamptz` stores, and what the detector and the rollups count in.

use chrono::{DateTime, Utc};

/// An instant in microseconds since the Unix epoch, UTC (a reading's time, an anomaly's start):
/// named where instants are kept, so that `i64` elsewhere is a count.
pub type Micros = i64;

pub const HOUR_MICROS: Micros = 3_600_000_000;
pub const DAY_MICROS: Micros = 24 * HOUR_MICROS;

/// The instant `micros` after the epoch; past chrono's range, its last instant.
pub fn instant(micros: Micros) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The start of the UTC hour `micros` falls in.
pub fn hour_of(micros: Micros) -> Micros {
    micros.div_euclid(HOUR_MICROS) * HOUR_MICROS
}

/// The start of the UTC day `micros` falls in.
pub fn day_of(micros: Micros) -> Micros {
    micros.div_euclid(DAY_MICROS) * DAY_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_and_instants() {
        assert_eq!(hour_of(HOUR_MICROS + 5), HOUR_MICROS);
        assert_eq!(hour_of(-1), -HOUR_MICROS);
        assert_eq!(day_of(DAY_MICROS + HOUR_MICROS), DAY_MICROS);
        assert_eq!(day_of(-1), -DAY_MICROS);
        assert_eq!(instant(0).to_rfc3339(), "1970-01-01T00:00:00+00:00");
        assert_eq!(instant(i64::MAX), DateTime::<Utc>::MAX_UTC);
    }
}
