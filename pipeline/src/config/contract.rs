//! How CSV objects are read.

use super::{ConfigError, Env, Setting};

/// How CSV objects are read (SPEC §2).
#[derive(Debug, Clone, Copy)]
pub struct ContractSettings {
    /// Field delimiter, `CSV_DELIMITER`, default `;`.
    pub delimiter: u8,
    /// Zone for timestamps without an offset, `NAIVE_TIMEZONE`, default `Europe/Berlin`.
    pub naive_timezone: chrono_tz::Tz,
}

impl Default for ContractSettings {
    fn default() -> Self {
        Self {
            delimiter: b';',
            naive_timezone: chrono_tz::Europe::Berlin,
        }
    }
}

impl ContractSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let delimiter = match env.optional(Setting::CsvDelimiter) {
            None => b';',
            Some(d) if d == "\\t" || d == "\t" => b'\t',
            Some(d)
                if d.len() == 1
                    && d.is_ascii()
                    && !matches!(d.as_bytes()[0], b'"' | b'\r' | b'\n') =>
            {
                d.as_bytes()[0]
            }
            Some(d) => {
                return Err(ConfigError::Invalid {
                    name: Setting::CsvDelimiter.name(),
                    reason: format!(
                        "{d:?}: expected one ASCII character other than a quote or newline"
                    ),
                })
            }
        };
        let naive_timezone = match env.optional(Setting::NaiveTimezone) {
            None => chrono_tz::Europe::Berlin,
            Some(tz) => tz.trim().parse().map_err(|_| ConfigError::Invalid {
                name: Setting::NaiveTimezone.name(),
                reason: format!(
                    "{tz:?} is not an IANA time zone name such as Europe/Berlin or UTC"
                ),
            })?,
        };
        Ok(Self {
            delimiter,
            naive_timezone,
        })
    }
}
