#!/usr/bin/env bash
# The quickstart: brings up PostgreSQL and RabbitMQ on loopback, a local model when no API
# key is configured, builds instructd, applies the migrations and runs the daemon in the
# foreground (Ctrl-C drains and stops it). Safe to run twice.
#
#   scripts/up.sh                        # local SmolLM2 model unless an API key is set
#   OPENAI_API_KEY=sk-... scripts/up.sh  # a real provider (llm.base_url, llm.model)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
say() { printf '\033[1m[up]\033[0m %s\n' "$*" >&2; }

"$ROOT/scripts/services.sh"

if [[ -z "${INSTRUCTD__LLM__API_KEY:-}${OPENAI_API_KEY:-}" ]]; then
  say "no API key configured: using the local SmolLM2-135M model server"
  "$ROOT/scripts/local-llm.sh" start
  # Its settings: one call at a time, answers capped at 512 tokens (see the file).
  export INSTRUCTD_CONFIG="${INSTRUCTD_CONFIG:-$ROOT/config/local-model.toml}"
  export INSTRUCTD__LLM__BASE_URL="${INSTRUCTD__LLM__BASE_URL:-$("$ROOT/scripts/local-llm.sh" url)}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  say "cargo is needed (https://rustup.rs)"; exit 1
fi
say "building instructd"
cargo build --quiet --bin instructd
say "applying migrations"
./target/debug/instructd migrate
say "running the daemon (Ctrl-C to stop). In another shell:"
say "  ./target/debug/instructd enqueue --entity hero --prompt 'Make a new superhero' --wait"
exec ./target/debug/instructd run
