#!/usr/bin/env bash
# Runs the whole test suite: brings up PostgreSQL and RabbitMQ on loopback (installing them
# if missing), then the unit and integration tests. The LLM is faked at the HTTP level.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
"$ROOT/scripts/services.sh"
# Two test threads: each integration test runs a daemon, a database and a fake LLM.
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --test-threads 2 --no-fail-fast
else
  cargo test --workspace --no-fail-fast -- --test-threads 2
fi
