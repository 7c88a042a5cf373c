-- One row per (sensor, instant); no surrogate key. Readings of sensors not (yet) in the mapping
-- are kept.
CREATE TABLE IF NOT EXISTS measurements (
    sensor_uuid uuid             NOT NULL,
    ts          timestamptz      NOT NULL,
    value       double precision NOT NULL,
    PRIMARY KEY (sensor_uuid, ts)
);

-- With TimescaleDB: a hypertable on time, compressed per sensor. Without it (or when the extension
-- is installed but cannot be loaded): the plain table above, which behaves the same.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        RAISE NOTICE 'timescaledb is not available: measurements is a plain table';
        RETURN;
    END IF;
    -- CREATE EXTENSION on a server that has the extension installed but not preloaded ends the
    -- session with a FATAL error that no exception handler can catch: look before creating it.
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       AND NOT 'timescaledb' = ANY (string_to_array(
               replace(current_setting('shared_preload_libraries'), ' ', ''), ',')) THEN
        RAISE NOTICE 'timescaledb is installed but not in shared_preload_libraries: measurements is a plain table';
        RETURN;
    END IF;
    BEGIN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
    EXCEPTION WHEN OTHERS THEN
        RAISE NOTICE 'timescaledb cannot be loaded (%): measurements is a plain table', SQLERRM;
        RETURN;
    END;
    PERFORM create_hypertable('measurements', 'ts',
                              chunk_time_interval => INTERVAL '7 days',
                              if_not_exists => TRUE, migrate_data => TRUE);
    EXECUTE 'ALTER TABLE measurements SET (timescaledb.compress, '
         || 'timescaledb.compress_segmentby = ''sensor_uuid'', timescaledb.compress_orderby = ''ts'')';
    PERFORM add_compression_policy('measurements', INTERVAL '30 days', if_not_exists => TRUE);
END
$$;
