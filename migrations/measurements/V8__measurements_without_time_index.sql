-- On TimescaleDB, create_hypertable (V1) also made an index on ts alone, measurements_ts_idx, on
-- every chunk. Every query of the pipeline, query-cli and the Grafana dashboard reads one
-- sensor's readings, through the primary key (sensor_uuid, ts); that index was only upkeep, a
-- second B-tree updated for every reading written. Without TimescaleDB it never existed.
DROP INDEX IF EXISTS measurements_ts_idx;
