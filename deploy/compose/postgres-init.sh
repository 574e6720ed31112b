#!/usr/bin/env bash
# One database and one login role per service, each database owned by its role, so a service
# cannot read another's tables. Runs once, when the postgres container initialises an empty
# data directory (/docker-entrypoint-initdb.d). Passwords come from CRM_DB_PASSWORD_<SERVICE>.
set -euo pipefail

for service in ${CRM_SERVICES:?CRM_SERVICES is not set}; do
  var="CRM_DB_PASSWORD_${service^^}"
  password="${!var:?$var is not set}"
  echo "postgres-init: database and role ${service}"
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
       -v role="$service" -v password="$password" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"role" OWNER :"role";
REVOKE ALL ON DATABASE :"role" FROM PUBLIC;
SQL
done
