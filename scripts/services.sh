#!/usr/bin/env bash
# Brings up what instructd needs on loopback, without systemd: PostgreSQL 15 and RabbitMQ
# from Debian's packages (installed with apt-get if missing), a database role
# `instructd` (password `instructd`, allowed to create the tests' databases) and a
# database `instructd`. Safe to run twice: what is installed or running is left as it is.
set -euo pipefail

say() { printf '\033[1m[services]\033[0m %s\n' "$*" >&2; }
as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v pg_ctlcluster >/dev/null 2>&1 || missing+=(postgresql)
command -v rabbitmq-server >/dev/null 2>&1 || missing+=(rabbitmq-server)
command -v curl >/dev/null 2>&1 || missing+=(curl)
if ((${#missing[@]})); then
  say "installing ${missing[*]} with apt-get"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Debian's postinst may have started them through invoke-rc.d; either way, make sure.
cluster="$(pg_lsclusters --no-header | awk 'NR==1 {print $1" "$2}')"
if [[ -z "$cluster" ]]; then
  say "creating a PostgreSQL cluster"
  as_root pg_createcluster 15 main >/dev/null
  cluster="15 main"
fi
if ! pg_lsclusters --no-header | awk 'NR==1 {print $4}' | grep -q online; then
  say "starting PostgreSQL ($cluster)"
  as_root pg_ctlcluster $cluster start
fi
until as_root su postgres -c "psql -qAtc 'select 1'" >/dev/null 2>&1; do sleep 0.5; done

as_root su postgres -c "psql -qAt" <<'SQL' >/dev/null
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'instructd') THEN
    CREATE ROLE instructd LOGIN PASSWORD 'instructd' CREATEDB;
  END IF;
END $$;
SQL
if ! as_root su postgres -c "psql -qAtc \"select 1 from pg_database where datname = 'instructd'\"" | grep -q 1; then
  say "creating database instructd"
  as_root su postgres -c "createdb -O instructd instructd"
fi
say "PostgreSQL is up on 127.0.0.1:5432"

if ! as_root rabbitmqctl -q status >/dev/null 2>&1; then
  say "starting RabbitMQ"
  as_root rabbitmq-server -detached >/dev/null 2>&1 || true
fi
# await_startup fails at once while the node is not yet registered with epmd: retry it.
for i in $(seq 1 60); do
  if as_root rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1; then break; fi
  if ((i == 60)); then say "RabbitMQ did not start; see /var/log/rabbitmq/"; exit 1; fi
  sleep 1
done
say "RabbitMQ is up on 127.0.0.1:5672 (user guest)"
