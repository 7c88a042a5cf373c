-- The daily rollup's trigger (V7) recomputes the days of the hours a statement changed. A writer
-- that copies in the hours of days that hold nothing else (the ingest merge's `COPY` of new
-- hours in days no stored reading falls in) knows those days already, and copies their rows in
-- itself: for that one statement it sets `sensor_pipeline.days_written` to `on` (`SET LOCAL`,
-- reset right after; a rollback to a savepoint undoes it too), and the trigger leaves the days
-- to it. Every other statement that changes hours still has its days recomputed here.
--
-- Why: with sensors that read every few hours, an object holds about as many hours as readings,
-- and the trigger's aggregation over 100,000 new hours cost 130 ms (plain PostgreSQL 15) to
-- 210 ms (TimescaleDB) of server time per object.
CREATE OR REPLACE FUNCTION measurement_days_from_hours() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('sensor_pipeline.days_written', true) = 'on' THEN
        RETURN NULL;
    END IF;
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
