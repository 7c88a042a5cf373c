-- Sensor UUID -> name. The most recently ingested name wins.
CREATE TABLE IF NOT EXISTS sensors (
    sensor_uuid uuid        PRIMARY KEY,
    sensor_name text        NOT NULL CHECK (char_length(sensor_name) BETWEEN 1 AND 100),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS sensors_name_idx ON sensors (sensor_name);
