-- One record per object version (bucket, key, ETag) that a worker has settled.
CREATE TABLE IF NOT EXISTS ingest_ledger (
    id            bigserial PRIMARY KEY,
    bucket        text        NOT NULL,
    object_key    text        NOT NULL,
    etag          text        NOT NULL,
    dataset       text        NOT NULL CHECK (dataset IN ('mapping', 'measurements', 'none')),
    status        text        NOT NULL CHECK (status IN ('done', 'failed', 'ignored')),
    size_bytes    bigint,
    rows_ok       bigint      NOT NULL DEFAULT 0,
    rows_rejected bigint      NOT NULL DEFAULT 0,
    reason        text,
    attempts      integer     NOT NULL DEFAULT 1,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    started_at    timestamptz NOT NULL,
    finished_at   timestamptz NOT NULL,
    UNIQUE (bucket, object_key, etag)
);

CREATE INDEX IF NOT EXISTS ingest_ledger_status_idx ON ingest_ledger (status) WHERE status <> 'done';

-- Rejected rows, exactly as they were in the object, with the reason.
CREATE TABLE IF NOT EXISTS ingest_quarantine (
    ledger_id  bigint NOT NULL REFERENCES ingest_ledger (id) ON DELETE CASCADE,
    object_key text   NOT NULL,
    line       bigint NOT NULL,
    raw        bytea  NOT NULL,
    reason     text   NOT NULL,
    PRIMARY KEY (ledger_id, line)
);
