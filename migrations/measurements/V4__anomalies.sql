-- Anomalies found as data arrives (see pipeline/src/alerts/mod.rs).
--
-- One row per sensor, kind and first reading. `state` is open while the readings show it and
-- resolved once a newer write removed its reason; `revision` counts the changes of state (1 when
-- opened) and `published_revision` is the last revision published to NATS: rows where the two
-- differ are the outbox, published (with message ids, so a retry cannot publish twice) by the
-- workers. `object_key` is the object whose ingestion revealed the current state.
CREATE TABLE IF NOT EXISTS anomalies (
    sensor_uuid        uuid             NOT NULL,
    kind               text             NOT NULL
                       CHECK (kind IN ('spike', 'level_shift', 'stuck', 'gap')),
    start_ts           timestamptz      NOT NULL,
    end_ts             timestamptz      NOT NULL,
    value              double precision,
    expected           double precision,
    score              double precision NOT NULL,
    state              text             NOT NULL CHECK (state IN ('open', 'resolved')),
    object_key         text             NOT NULL,
    revision           integer          NOT NULL DEFAULT 1,
    published_revision integer          NOT NULL DEFAULT 0,
    detected_at        timestamptz      NOT NULL DEFAULT now(),
    updated_at         timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (sensor_uuid, start_ts, kind)
);
-- `query-cli anomalies --stored --all` reads by time.
CREATE INDEX IF NOT EXISTS anomalies_start ON anomalies (start_ts);
CREATE INDEX IF NOT EXISTS anomalies_unpublished
    ON anomalies (updated_at) WHERE published_revision < revision;

-- Detection still to do: the time span one object version changed, per sensor. Written by the
-- ingest merge in the object's own transaction (plain inserts: nothing here can block or fail an
-- ingestion short of the table missing), removed by the detection that covered it. A worker that
-- dies before detecting leaves its rows for the next; `not_before` and `attempts` space out
-- retries after errors.
CREATE TABLE IF NOT EXISTS anomaly_work (
    id          bigserial   PRIMARY KEY,
    sensor_uuid uuid        NOT NULL,
    span_start  timestamptz NOT NULL,
    span_end    timestamptz NOT NULL,
    object_key  text        NOT NULL,
    queued_at   timestamptz NOT NULL DEFAULT now(),
    not_before  timestamptz NOT NULL DEFAULT '-infinity',
    attempts    integer     NOT NULL DEFAULT 0,
    last_error  text
);
CREATE INDEX IF NOT EXISTS anomaly_work_sensor ON anomaly_work (sensor_uuid);

-- Each sensor's detector as it was after the last reading of a detection (`through`), the newest
-- few: a detection of readings that come after one resumes it instead of reading a warm-up again.
-- A few kilobytes each; the layout is versioned inside `state` (another version is not resumed).
CREATE TABLE IF NOT EXISTS anomaly_detectors (
    sensor_uuid uuid        NOT NULL,
    through     timestamptz NOT NULL,
    state       bytea       NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sensor_uuid, through)
);
