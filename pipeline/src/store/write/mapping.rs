//! Merging a mapping object's staged rows into `sensors`.

use super::*;

pub(super) const COPY_MAPPING: &str =
    "COPY staging_rows (line, sensor_uuid, sensor_name, raw, reason) FROM STDIN (FORMAT binary)";

pub(super) const MERGE_MAPPING: &str = concat!(
    "INSERT INTO sensors AS target (sensor_uuid, sensor_name, version)
    SELECT DISTINCT ON (sensor_uuid) sensor_uuid, sensor_name, $1::bigint
    FROM staging_rows WHERE reason IS NULL
    ORDER BY sensor_uuid, line DESC
    ON CONFLICT (sensor_uuid) DO UPDATE
        SET sensor_name = EXCLUDED.sensor_name, version = EXCLUDED.version, updated_at = now()
    WHERE ",
    incoming_beats_stored!()
);
