-- Who wins (SPEC §3): the newest write, never the last to be processed.
--
-- Every object version that is read gets a number, `version`, before its rows are written:
--
--     version = (whole seconds of its write time since 1970) << 24  |  n
--
-- where n counts the versions registered with the same whole second (0, 1, 2, …). Every stored
-- row (measurements, sensors) carries the version it came from. Versions of different seconds
-- compare by their high bits alone, inside the row; only versions of the same second need this
-- table, to break the tie by write time, then key (byte order), then ETag, then bucket. Rows
-- stored before versions existed carry 0, which every version beats.
CREATE TABLE IF NOT EXISTS object_versions (
    version    bigint      PRIMARY KEY,
    bucket     text        NOT NULL,
    object_key text        NOT NULL,
    etag       text        NOT NULL,
    written_at timestamptz NOT NULL,
    UNIQUE (bucket, object_key, etag, written_at)
);

-- A version's identity is ETag and write time: a key that goes A -> B -> A has three versions.
-- Entries written before this migration, and keys never read (ignored), have no write time.
ALTER TABLE ingest_ledger ADD COLUMN IF NOT EXISTS written_at timestamptz NOT NULL DEFAULT '-infinity';
ALTER TABLE ingest_ledger DROP CONSTRAINT IF EXISTS ingest_ledger_bucket_object_key_etag_key;
CREATE UNIQUE INDEX IF NOT EXISTS ingest_ledger_version_idx
    ON ingest_ledger (bucket, object_key, etag, written_at);

-- The number of a version, registering it if it is new. Called on its own (autocommit), before
-- the version's transaction: the per-second lock is held only for this call.
CREATE OR REPLACE FUNCTION sensors_register_version(
    p_bucket text, p_key text, p_etag text, p_written_at timestamptz
) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    base bigint := greatest(floor(extract(epoch FROM p_written_at)), 1)::bigint << 24;
    v bigint;
BEGIN
    SELECT version INTO v FROM object_versions
    WHERE bucket = p_bucket AND object_key = p_key AND etag = p_etag AND written_at = p_written_at;
    IF FOUND THEN
        RETURN v;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('sensors object versions ' || base, 0));
    -- Again under the lock (a volatile function's queries see what committed meanwhile).
    SELECT version INTO v FROM object_versions
    WHERE bucket = p_bucket AND object_key = p_key AND etag = p_etag AND written_at = p_written_at;
    IF FOUND THEN
        RETURN v;
    END IF;
    SELECT coalesce(max(version) + 1, base) INTO v FROM object_versions
    WHERE version BETWEEN base AND base + 16777215;
    IF v > base + 16777215 THEN
        RAISE EXCEPTION 'more than 16777216 object versions written at %', p_written_at;
    END IF;
    INSERT INTO object_versions (version, bucket, object_key, etag, written_at)
    VALUES (v, p_bucket, p_key, p_etag, p_written_at);
    RETURN v;
END
$$;

-- Whether version `candidate` beats version `stored` when both were written in the same second.
-- VOLATILE on purpose: called from ON CONFLICT ... WHERE, it must see the registration of a
-- version that committed after the calling statement began (a stable function would not).
CREATE OR REPLACE FUNCTION sensors_version_beats(candidate bigint, stored bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    beats boolean;
BEGIN
    SELECT (c.written_at, c.object_key COLLATE "C", c.etag COLLATE "C", c.bucket COLLATE "C")
         > (s.written_at, s.object_key COLLATE "C", s.etag COLLATE "C", s.bucket COLLATE "C")
    INTO beats
    FROM object_versions c, object_versions s
    WHERE c.version = candidate AND s.version = stored;
    IF beats IS NULL THEN
        RAISE EXCEPTION 'object version % or % is not registered', candidate, stored;
    END IF;
    RETURN beats;
END
$$;
