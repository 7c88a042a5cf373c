-- One row per (sensor, instant); no surrogate key. Readings of sensors not (yet) in the mapping
-- are kept.
CREATE TABLE IF NOT EXISTS measurements (
    sensor_uuid uuid             NOT NULL,
    ts          timestamptz      NOT NULL,
    value       double precision NOT NULL,
    PRIMARY KEY (sensor_uuid, ts)
);

-- With TimescaleDB: a hypertable on time, compressed per sensor. Without it (not installed, or
-- installed but not preloaded): the plain table above, which behaves the same, and `migrate` says
-- which and why. Runs as the schema's owner role, which needs no superuser privilege.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') THEN
        RAISE NOTICE 'timescaledb is not available: measurements is a plain table';
        RETURN;
    END IF;
    -- CREATE EXTENSION on a server that has the extension installed but not preloaded ends the
    -- session with a FATAL error that no exception handler can catch: look before creating it.
    -- Preloaded, its loader defines this setting in every session (`shared_preload_libraries`
    -- itself is readable only by superusers and pg_read_all_settings).
    IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')
       AND current_setting('timescaledb.bgw_launcher_poll_time', true) IS NULL THEN
        RAISE NOTICE 'timescaledb is installed but not in shared_preload_libraries: measurements is a plain table';
        RETURN;
    END IF;
    -- Preloaded: a hypertable or nothing. The extension is trusted: a role with CREATE on the
    -- database creates it (postgres/10-roles.sh grants that); when this role cannot, say what a
    -- superuser must run.
    BEGIN
        CREATE EXTENSION IF NOT EXISTS timescaledb;
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'timescaledb is preloaded but cannot be created by %: %', current_user, SQLERRM
            USING HINT = format('run as a superuser: psql -d %s -c "CREATE EXTENSION timescaledb", then migrate again', current_database());
    END;
    PERFORM create_hypertable('measurements', 'ts',
                              chunk_time_interval => INTERVAL '7 days',
                              if_not_exists => TRUE, migrate_data => TRUE);
    EXECUTE 'ALTER TABLE measurements SET (timescaledb.compress, '
         || 'timescaledb.compress_segmentby = ''sensor_uuid'', timescaledb.compress_orderby = ''ts'')';
    PERFORM add_compression_policy('measurements', INTERVAL '30 days', if_not_exists => TRUE);
END
$$;
