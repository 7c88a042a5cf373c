-- Per sensor and UTC hour: how many readings, the lowest and the highest. `query-cli plot` draws
-- a chart whose pixel columns span an hour or more from these rows instead of reading every
-- reading (10 million readings are 2,800 rows here). Kept by the ingest merge in the same
-- transaction as the readings: a new reading widens its hour (count, least, greatest); an
-- overwritten one may have been the hour's extreme, so the merge recomputes each hour it
-- overwrote in before it commits. `exact` is false only in between, inside that transaction.
CREATE TABLE IF NOT EXISTS measurement_hours (
    sensor_uuid uuid             NOT NULL,
    hour        timestamptz      NOT NULL,
    readings    bigint           NOT NULL,
    low         double precision NOT NULL,
    high        double precision NOT NULL,
    exact       boolean          NOT NULL DEFAULT true,
    PRIMARY KEY (sensor_uuid, hour) INCLUDE (readings, low, high, exact)  -- index-only reads
);

-- Rows stored before this migration.
INSERT INTO measurement_hours (sensor_uuid, hour, readings, low, high)
SELECT sensor_uuid, date_trunc('hour', ts, 'UTC'), count(*), min(value), max(value)
FROM measurements
GROUP BY 1, 2
ON CONFLICT (sensor_uuid, hour) DO UPDATE
    SET readings = EXCLUDED.readings, low = EXCLUDED.low, high = EXCLUDED.high, exact = true;
