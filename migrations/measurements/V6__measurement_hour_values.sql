-- What `query-cli readings --every` needs from the hourly rollup beyond count, low and high: the
-- sum of an hour's values (for the mean) and its first and last reading (instant and value). The
-- ingest merge keeps them exact with the rest of the row, in the same transaction as the
-- readings; while a row is not `exact` they may be off like its bounds, and readers take that
-- hour from the readings.
--
-- The columns are nullable: a row written by a worker older than this migration (during a
-- rolling upgrade) leaves them NULL, and readers take such an hour from the readings too.
ALTER TABLE measurement_hours
    ADD COLUMN IF NOT EXISTS total       double precision,
    ADD COLUMN IF NOT EXISTS first_at    timestamptz,
    ADD COLUMN IF NOT EXISTS first_value double precision,
    ADD COLUMN IF NOT EXISTS last_at     timestamptz,
    ADD COLUMN IF NOT EXISTS last_value  double precision;

-- Hours stored before this migration, recomputed whole from their readings (which also settles
-- any hour left inexact).
UPDATE measurement_hours AS h
SET (readings, low, high, total, first_at, first_value, last_at, last_value, exact) =
    (c.readings, c.low, c.high, c.total, c.first_at, c.first_value, c.last_at, c.last_value, true)
FROM (
    SELECT sensor_uuid, date_trunc('hour', ts, 'UTC') AS hour, count(*) AS readings,
           min(value) AS low, max(value) AS high, sum(value) AS total,
           min(ts) AS first_at, (array_agg(value ORDER BY ts))[1] AS first_value,
           max(ts) AS last_at, (array_agg(value ORDER BY ts DESC))[1] AS last_value
    FROM measurements
    GROUP BY 1, 2
) AS c
WHERE h.sensor_uuid = c.sensor_uuid AND h.hour = c.hour;
