#!/usr/bin/env bash
# Runs the whole test suite: brings up PostgreSQL and RabbitMQ on loopback (installing them
# if missing), with TLS listeners beside plain TCP (certificates from a CA generated for the
# tests), installs Chromium and ChromeDriver for the console's browser test, checks the
# observability documents (installing promtool, which a test also uses),
# runs the unit and integration tests (the LLM faked at the HTTP level), then the
# fault-injection suite (which restarts RabbitMQ and Postgres, so it runs alone, one test at a
# time), then the end-to-end test against the real local model (scripts/local-llm.sh: installed
# once into .venv, a few minutes the first time), then checks the deployment files.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# PostgreSQL and RabbitMQ (scripts/services.sh), plus their TLS listeners with a generated CA.
"$ROOT/scripts/tls-services.sh"
# Chromium and ChromeDriver for the console's browser test (tests/api/browser.rs).
"$ROOT/scripts/browser.sh"
"$ROOT/scripts/check-observability.sh"
if cargo nextest --version >/dev/null 2>&1; then
  # Two threads: each integration test runs a daemon, a database and a fake LLM.
  cargo nextest run --workspace --test-threads 2 --no-fail-fast -E 'not binary(chaos) and not binary(local_model)'
  cargo nextest run --workspace --test-threads 1 --no-fail-fast -E 'binary(chaos)' --success-output immediate
else
  cargo test --workspace --no-fail-fast --lib --bins --test api --test end_to_end -- --test-threads 2
  cargo test --workspace --no-fail-fast --test chaos -- --test-threads 1 --nocapture
fi
# The library's documented example (an application with an entity of its own) compiles.
cargo test --workspace --doc
"$ROOT/scripts/local-llm.sh" start
INSTRUCTD_TEST_LOCAL_LLM_URL="$("$ROOT/scripts/local-llm.sh" url)" \
  cargo test --workspace --no-fail-fast --test local_model -- --nocapture
"$ROOT/scripts/check-deploy.sh"
