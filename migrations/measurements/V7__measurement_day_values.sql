-- The daily rollup: per sensor and UTC day, what `measurement_hours` keeps per hour (count,
-- lowest, highest, sum, first and last reading), so that `query-cli readings --every 1d` over ten
-- years reads 3,650 rows instead of 87,600 hours. A day is derived from its hours, never from
-- the readings: whatever statement changes an hour (the ingest merge, a correction's settling,
-- detection's settling of held hours) recomputes that hour's day in the same statement, through
-- the triggers below, so no write path can leave the days behind. `exact` holds when every hour
-- of the day is exact and has its sums (a worker older than V6 leaves them NULL); readers take
-- other days from the hours (and those from the readings where they must).
CREATE TABLE IF NOT EXISTS measurement_day_values (
    sensor_uuid uuid             NOT NULL,
    day         timestamptz      NOT NULL,
    readings    bigint           NOT NULL,
    low         double precision NOT NULL,
    high        double precision NOT NULL,
    total       double precision,
    first_at    timestamptz,
    first_value double precision,
    last_at     timestamptz,
    last_value  double precision,
    exact       boolean          NOT NULL,
    PRIMARY KEY (sensor_uuid, day)
);

-- The days of the hours in `changed` (sensor_uuid, hour), recomputed from all their hours, in
-- (sensor, day) order (the order every writer locks them in, after the hours of its statement).
-- Days are 24 hours from UTC midnight whatever the session's time zone.
CREATE OR REPLACE FUNCTION measurement_days_from_hours() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO measurement_day_values AS d (sensor_uuid, day, readings, low, high, total,
        first_at, first_value, last_at, last_value, exact)
    SELECT t.sensor_uuid, t.day, sum(h.readings), min(h.low), max(h.high), sum(h.total),
           min(h.first_at), (array_agg(h.first_value ORDER BY h.hour))[1],
           max(h.last_at), (array_agg(h.last_value ORDER BY h.hour DESC))[1],
           bool_and(h.exact AND h.total IS NOT NULL AND h.first_at IS NOT NULL
               AND h.last_at IS NOT NULL)
    FROM (SELECT DISTINCT sensor_uuid, date_trunc('day', hour, 'UTC') AS day FROM changed) AS t
    JOIN measurement_hours AS h ON h.sensor_uuid = t.sensor_uuid
        AND h.hour >= t.day AND h.hour < t.day + interval '24 hours'
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (sensor_uuid, day) DO UPDATE
    SET (readings, low, high, total, first_at, first_value, last_at, last_value, exact) =
        (EXCLUDED.readings, EXCLUDED.low, EXCLUDED.high, EXCLUDED.total, EXCLUDED.first_at,
         EXCLUDED.first_value, EXCLUDED.last_at, EXCLUDED.last_value, EXCLUDED.exact);
    RETURN NULL;
END
$$;

-- One trigger per event: PostgreSQL allows a transition table on a trigger of one event only.
-- An upsert fires both, each with the rows it inserted or updated.
DROP TRIGGER IF EXISTS measurement_days_on_insert ON measurement_hours;
CREATE TRIGGER measurement_days_on_insert AFTER INSERT ON measurement_hours
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION measurement_days_from_hours();
DROP TRIGGER IF EXISTS measurement_days_on_update ON measurement_hours;
CREATE TRIGGER measurement_days_on_update AFTER UPDATE ON measurement_hours
    REFERENCING NEW TABLE AS changed
    FOR EACH STATEMENT EXECUTE FUNCTION measurement_days_from_hours();

-- Days of the hours stored before this migration.
INSERT INTO measurement_day_values (sensor_uuid, day, readings, low, high, total, first_at,
    first_value, last_at, last_value, exact)
SELECT sensor_uuid, date_trunc('day', hour, 'UTC'), sum(readings), min(low), max(high),
       sum(total), min(first_at), (array_agg(first_value ORDER BY hour))[1], max(last_at),
       (array_agg(last_value ORDER BY hour DESC))[1],
       bool_and(exact AND total IS NOT NULL AND first_at IS NOT NULL AND last_at IS NOT NULL)
FROM measurement_hours
GROUP BY 1, 2
ON CONFLICT (sensor_uuid, day) DO NOTHING;
