-- Readings per sensor and UTC day: the page index. It lets `query-cli readings --page-number N`
-- jump to the day in which page N starts instead of counting N pages of rows. Kept exact by the
-- ingest merge, in the same transaction as the rows (only inserted rows count; overwrites do not).
CREATE TABLE IF NOT EXISTS measurement_days (
    sensor_uuid uuid        NOT NULL,
    day         timestamptz NOT NULL,
    readings    bigint      NOT NULL CHECK (readings > 0),
    PRIMARY KEY (sensor_uuid, day) INCLUDE (readings)  -- the walk is an index-only scan
);

-- Rows stored before this migration.
INSERT INTO measurement_days (sensor_uuid, day, readings)
SELECT sensor_uuid, date_trunc('day', ts, 'UTC'), count(*)
FROM measurements
GROUP BY 1, 2
ON CONFLICT (sensor_uuid, day) DO UPDATE SET readings = EXCLUDED.readings;
