#!/bin/sh
# The pipeline's three database roles, least privilege each (docker-compose.yml mounts this file
# into /docker-entrypoint-initdb.d of both PostgreSQL containers; it runs once, when the cluster is
# created, as the bootstrap superuser). To set up an existing server, run it by hand with the same
# variables and PGHOST/PGPORT pointing at the server.
#
#   sensors_migrate  owns the schema: `sensors-worker migrate` runs as it (and only that)
#   sensors_worker   reads and writes the pipeline's tables, nothing else (`run`, `ingest`,
#                    `backfill`, `provision`)
#   sensors_reader   reads them (`query-cli`)
#
# Privileges on tables that migrations create later come from default privileges of
# sensors_migrate, so nothing needs granting after an upgrade. Safe to run again (roles that exist
# get their password reset).
#
# Needs: POSTGRES_USER, POSTGRES_DB (set by the image), SENSORS_MIGRATE_PASSWORD,
# SENSORS_WORKER_PASSWORD, SENSORS_READER_PASSWORD.
set -eu
: "${SENSORS_MIGRATE_PASSWORD:?set SENSORS_MIGRATE_PASSWORD}"
: "${SENSORS_WORKER_PASSWORD:?set SENSORS_WORKER_PASSWORD}"
: "${SENSORS_READER_PASSWORD:?set SENSORS_READER_PASSWORD}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet \
  --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v db="$POSTGRES_DB" \
  -v migrate_password="$SENSORS_MIGRATE_PASSWORD" \
  -v worker_password="$SENSORS_WORKER_PASSWORD" \
  -v reader_password="$SENSORS_READER_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', r)
  FROM unnest(ARRAY['sensors_migrate', 'sensors_worker', 'sensors_reader']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \gexec
ALTER ROLE sensors_migrate LOGIN PASSWORD :'migrate_password';
ALTER ROLE sensors_worker LOGIN PASSWORD :'worker_password';
ALTER ROLE sensors_reader LOGIN PASSWORD :'reader_password';

-- Nobody but these roles (and superusers) connects or creates objects in this database.
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"db" TO sensors_migrate, sensors_worker;
GRANT CONNECT ON DATABASE :"db" TO sensors_reader;
GRANT CREATE ON DATABASE :"db" TO sensors_migrate;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
ALTER SCHEMA public OWNER TO sensors_migrate;
GRANT USAGE ON SCHEMA public TO sensors_worker, sensors_reader;

-- Tables the migrations create (as sensors_migrate), now and later.
ALTER DEFAULT PRIVILEGES FOR ROLE sensors_migrate IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO sensors_worker;
ALTER DEFAULT PRIVILEGES FOR ROLE sensors_migrate IN SCHEMA public
  GRANT USAGE, SELECT ON SEQUENCES TO sensors_worker;
ALTER DEFAULT PRIVILEGES FOR ROLE sensors_migrate IN SCHEMA public
  GRANT SELECT ON TABLES TO sensors_reader;
-- Tables that exist already (this script run on a migrated database).
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO sensors_worker;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO sensors_worker;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO sensors_reader;
SQL
