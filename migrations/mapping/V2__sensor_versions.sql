-- The object version each name came from (see ledger/V2__object_versions.sql): the newest write
-- wins, whatever the processing order. Names stored before versions existed carry 0.
ALTER TABLE sensors ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0;
