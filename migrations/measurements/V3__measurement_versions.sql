-- The object version each reading came from (see ledger/V2__object_versions.sql): the newest
-- write wins, whatever the processing order. Readings stored before versions existed carry 0,
-- which every version beats. A constant default adds the column without rewriting the table;
-- on a TimescaleDB hypertable with compression this needs TimescaleDB 2.6 or later. The page
-- index (measurement_days) counts rows, which this does not change.
ALTER TABLE measurements ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0;
