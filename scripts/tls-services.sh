#!/usr/bin/env bash
# Adds TLS beside the plain listeners that services.sh brings up, for the tests of
# instructd's TLS support:
#   - a test CA and a server certificate for localhost (SAN DNS:localhost, IP:127.0.0.1,
#     IP:::1), valid INSTRUCTD_TLS_DAYS days (30), in INSTRUCTD_TLS_DIR
#     (/var/lib/instructd-tls): ca.pem, server.pem, server.key (and ca.key);
#   - PostgreSQL: ssl = on with that certificate (conf.d/instructd-tls.conf), plain
#     connections still accepted on 5432; clients use sslmode=verify-full sslrootcert=ca.pem;
#   - RabbitMQ: an AMQPS listener on 5671 (added to /etc/rabbitmq/rabbitmq.conf), the plain
#     listener stays on 5672; guest may log in from 127.0.0.1 over both.
# Safe to run twice: certificates still valid for a day are kept, and PostgreSQL is
# reloaded / RabbitMQ restarted only when their configuration or certificate changed.
# Usage: [INSTRUCTD_TLS_DIR=/some/dir] scripts/tls-services.sh
set -euo pipefail

say() { printf '\033[1m[tls-services]\033[0m %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dir="${INSTRUCTD_TLS_DIR:-/var/lib/instructd-tls}"
days="${INSTRUCTD_TLS_DAYS:-30}"
pg_tls=/var/lib/postgresql/instructd-tls   # the postgres user's copies
rmq_tls=/etc/rabbitmq/instructd-tls        # the rabbitmq user's copies
rmq_conf=/etc/rabbitmq/rabbitmq.conf

command -v openssl >/dev/null 2>&1 || die "openssl is needed"
# Both services must be there and running first (idempotent, quick when they are).
bash "$here/services.sh"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# --- Certificates ----------------------------------------------------------------------
certs_ok() {
  as_root test -s "$dir/ca.pem" -a -s "$dir/server.pem" -a -s "$dir/server.key" || return 1
  # Still valid for at least a day, issued by our CA for localhost and 127.0.0.1.
  openssl x509 -in "$dir/ca.pem" -noout -checkend 86400 >/dev/null 2>&1 || return 1
  openssl x509 -in "$dir/server.pem" -noout -checkend 86400 >/dev/null 2>&1 || return 1
  openssl verify -CAfile "$dir/ca.pem" -purpose sslserver -verify_hostname localhost \
    "$dir/server.pem" >/dev/null 2>&1 || return 1
  openssl verify -CAfile "$dir/ca.pem" -purpose sslserver -verify_ip 127.0.0.1 \
    "$dir/server.pem" >/dev/null 2>&1 || return 1
  # ...and the key is the certificate's.
  [[ "$(openssl x509 -in "$dir/server.pem" -noout -pubkey)" == \
     "$(as_root openssl pkey -in "$dir/server.key" -pubout)" ]]
}

if certs_ok; then
  say "keeping the certificates in $dir (valid until $(openssl x509 -in "$dir/server.pem" -noout -enddate | cut -d= -f2))"
else
  say "generating a test CA and a certificate for localhost in $dir (valid $days days)"
  cat >"$tmp/ext.cnf" <<'EOF'
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
  (
    cd "$tmp"
    umask 077
    openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out ca.key
    openssl req -new -key ca.key -subj "/CN=instructd test CA" -out ca.csr
    openssl x509 -req -in ca.csr -signkey ca.key -days "$days" -set_serial "0x$(openssl rand -hex 15)" \
      -extfile ext.cnf -extensions ca -out ca.pem 2>/dev/null
    openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out server.key
    openssl req -new -key server.key -subj "/CN=localhost" -out server.csr
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -days "$days" \
      -set_serial "0x$(openssl rand -hex 15)" -extfile ext.cnf -extensions server -out server.pem 2>/dev/null
  )
  as_root install -d -m 0755 "$dir"
  as_root install -m 0600 "$tmp/ca.key" "$dir/ca.key"
  as_root install -m 0600 "$tmp/server.key" "$dir/server.key"
  as_root install -m 0644 "$tmp/ca.pem" "$dir/ca.pem"
  as_root install -m 0644 "$tmp/server.pem" "$dir/server.pem"
  certs_ok || die "the certificates just generated in $dir do not verify"
fi

# Copies $1 to $2 with owner (and group) $3 and mode $4 unless it is already so;
# succeeds only when something changed.
sync_file() {
  if as_root cmp -s "$1" "$2" && [[ "$(as_root stat -c '%U:%G %a' "$2")" == "$3:$3 $4" ]]; then
    return 1
  fi
  as_root install -m "$4" -o "$3" -g "$3" "$1" "$2"
}

# --- PostgreSQL ------------------------------------------------------------------------
read -r pg_ver pg_name < <(pg_lsclusters --no-header | awk 'NR==1 {print $1, $2}')
pg_conf="/etc/postgresql/$pg_ver/$pg_name/conf.d/instructd-tls.conf"
pg_psql() { as_root su postgres -c "psql -qAtX -c \"$1\""; }

pg_reload=0
as_root install -d -m 0700 -o postgres -g postgres "$pg_tls"
sync_file "$dir/server.pem" "$pg_tls/server.pem" postgres 644 && pg_reload=1
sync_file "$dir/server.key" "$pg_tls/server.key" postgres 600 && pg_reload=1
cat >"$tmp/pg.conf" <<EOF
# Written by scripts/tls-services.sh: TLS beside plain connections (pg_hba 'host' lines).
ssl = on
ssl_cert_file = '$pg_tls/server.pem'
ssl_key_file = '$pg_tls/server.key'
EOF
if ! as_root cmp -s "$tmp/pg.conf" "$pg_conf"; then
  as_root install -m 0644 -o postgres -g postgres "$tmp/pg.conf" "$pg_conf"
  pg_reload=1
fi
pg_settings="$(pg_psql "select setting from pg_settings where name in ('ssl', 'ssl_cert_file', 'ssl_key_file') order by name" | paste -sd' ')"
pg_want="on $pg_tls/server.pem $pg_tls/server.key"
[[ "$pg_settings" == "$pg_want" ]] || pg_reload=1
if ((pg_reload)); then
  say "reloading PostgreSQL ($pg_ver $pg_name) with TLS"
  as_root pg_ctlcluster "$pg_ver" "$pg_name" reload
fi

pg_conn="host=localhost port=5432 user=instructd password=instructd dbname=instructd"
pg_ssl=""
for i in $(seq 1 20); do
  pg_ssl="$(psql "$pg_conn sslmode=verify-full sslrootcert=$dir/ca.pem" -qAtX \
    -c 'select ssl from pg_stat_ssl where pid = pg_backend_pid()' 2>"$tmp/psql.err" || true)"
  [[ "$pg_ssl" == t ]] && break
  sleep 0.5
done
if [[ "$pg_ssl" != t ]]; then
  cat "$tmp/psql.err" >&2
  pg_settings="$(pg_psql "select setting from pg_settings where name in ('ssl', 'ssl_cert_file', 'ssl_key_file') order by name" | paste -sd' ')"
  [[ "$pg_settings" == "$pg_want" ]] ||
    say "PostgreSQL has '$pg_settings' instead of '$pg_want': is conf.d included, or is it overridden in postgresql.auto.conf?"
  die "no verify-full TLS connection to PostgreSQL; see /var/log/postgresql/"
fi
[[ "$(psql "$pg_conn sslmode=disable" -qAtX -c 'select ssl from pg_stat_ssl where pid = pg_backend_pid()')" == f ]] ||
  die "plain connections to PostgreSQL no longer work"
say "PostgreSQL accepts TLS (sslmode=verify-full) and plain connections on localhost:5432"

# --- RabbitMQ --------------------------------------------------------------------------
rmq_restart=0
as_root install -d -m 0750 -o rabbitmq -g rabbitmq "$rmq_tls"
rmq_certs=0
sync_file "$dir/ca.pem" "$rmq_tls/ca.pem" rabbitmq 644 && rmq_certs=1
sync_file "$dir/server.pem" "$rmq_tls/server.pem" rabbitmq 644 && rmq_certs=1
sync_file "$dir/server.key" "$rmq_tls/server.key" rabbitmq 600 && rmq_certs=1

for f in /etc/rabbitmq/rabbitmq.config /etc/rabbitmq/advanced.config; do
  [[ -e $f ]] && say "note: $f exists; it must not override the ssl settings of $rmq_conf"
done
want=(
  "listeners.ssl.default = 5671"
  "ssl_options.cacertfile = $rmq_tls/ca.pem"
  "ssl_options.certfile = $rmq_tls/server.pem"
  "ssl_options.keyfile = $rmq_tls/server.key"
  "ssl_options.verify = verify_none"
  "ssl_options.fail_if_no_peer_cert = false"
)
add=()
for line in "${want[@]}"; do
  key="${line%% = *}"
  re="^[[:space:]]*${key//./\\.}[[:space:]]*="
  if as_root test -e "$rmq_conf" && as_root grep -qE "$re" "$rmq_conf"; then
    have="$(as_root grep -E "$re" "$rmq_conf" | tail -n1 | sed -E 's/^[^=]*=[[:space:]]*//; s/[[:space:]]+$//')"
    [[ "$have" == "${line#* = }" ]] || say "note: keeping '$key = $have' already in $rmq_conf (wanted '${line#* = }')"
  else
    add+=("$line")
  fi
done
if ((${#add[@]})); then
  say "adding to $rmq_conf: ${add[*]/#/$'\n  '}"
  if as_root test -e "$rmq_conf"; then
    as_root cp -p "$rmq_conf" "$tmp/rabbitmq.conf.orig"
    # Finish the last line if it has no newline.
    if as_root test -s "$rmq_conf" && [[ -n "$(as_root tail -c1 "$rmq_conf")" ]]; then
      echo | as_root tee -a "$rmq_conf" >/dev/null
    fi
  else
    as_root install -m 0644 -o rabbitmq -g rabbitmq /dev/null "$rmq_conf"
  fi
  { echo "# Added by scripts/tls-services.sh: AMQPS beside the plain listener."
    printf '%s\n' "${add[@]}"; } | as_root tee -a "$rmq_conf" >/dev/null
  rmq_restart=1
fi
as_root rabbitmq-diagnostics -q listeners 2>/dev/null | grep -q 'port: 5671,' || rmq_restart=1

rmq_await() {
  # await_startup fails at once while the node is not yet registered with epmd: retry it.
  for i in $(seq 1 60); do
    if as_root rabbitmqctl -q await_startup --timeout 60 >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  return 1
}
rmq_start() {
  as_root rabbitmq-server -detached >/dev/null 2>&1 || true
  rmq_await
}
rmq_stop() {
  as_root rabbitmqctl -q shutdown >/dev/null 2>&1 || as_root rabbitmqctl -q stop >/dev/null 2>&1 || true
}
want_fp="$(openssl x509 -in "$dir/server.pem" -noout -fingerprint -sha256)"
served_fp() {
  openssl s_client -connect 127.0.0.1:5671 -servername localhost </dev/null 2>/dev/null |
    openssl x509 -noout -fingerprint -sha256 2>/dev/null || true
}

if ((rmq_restart)); then
  say "restarting RabbitMQ to open the AMQPS listener"
  rmq_stop
  if ! rmq_start; then
    if [[ -e "$tmp/rabbitmq.conf.orig" ]]; then
      say "RabbitMQ did not start with the new $rmq_conf; putting the old one back"
      as_root cp -p "$tmp/rabbitmq.conf.orig" "$rmq_conf"
      rmq_stop; rmq_start || true
    fi
    die "RabbitMQ did not start; see /var/log/rabbitmq/"
  fi
elif ((rmq_certs)) || [[ "$(served_fp)" != "$want_fp" ]]; then
  # The listener reads the PEM files through Erlang's ssl PEM cache: clear it, and only
  # restart the node if it still serves the old certificate.
  say "RabbitMQ's certificate changed; clearing its PEM cache"
  as_root rabbitmqctl -q eval 'ssl:clear_pem_cache().' >/dev/null
  if [[ "$(served_fp)" != "$want_fp" ]]; then
    say "restarting RabbitMQ to load the new certificate"
    rmq_stop
    rmq_start || die "RabbitMQ did not start; see /var/log/rabbitmq/"
  fi
fi

s_client=""
for i in $(seq 1 20); do
  if s_client="$(openssl s_client -connect 127.0.0.1:5671 -servername localhost -verify_hostname localhost \
      -CAfile "$dir/ca.pem" -verify_return_error </dev/null 2>&1)" &&
     grep -q 'Verify return code: 0 (ok)' <<<"$s_client"; then
    break
  fi
  s_client=""
  sleep 0.5
done
[[ -n "$s_client" ]] || die "no verified TLS handshake on 127.0.0.1:5671"
[[ "$(served_fp)" == "$want_fp" ]] || die "RabbitMQ serves another certificate than $dir/server.pem"
say "RabbitMQ: $(grep -m1 -oE 'Protocol *: *TLS[^ ]*|New, TLS[^,]*' <<<"$s_client" | head -n1), Verify return code: 0 (ok)"

# Log in as guest (loopback only) over both listeners with a bare AMQP 0-9-1 handshake.
if command -v python3 >/dev/null 2>&1; then
  python3 - "$dir/ca.pem" <<'PY' || die "guest cannot open a connection (see above)"
import socket, ssl, struct, sys

def login(port, cafile=None):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if cafile:
        sock = ssl.create_default_context(cafile=cafile).wrap_socket(sock, server_hostname="localhost")
    def recvn(n):
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise RuntimeError("connection closed by the server (authentication refused?)")
            buf += chunk
        return buf
    def method():
        typ, _, size = struct.unpack(">BHI", recvn(7))
        payload = recvn(size); recvn(1)
        return struct.unpack(">HH", payload[:4]), payload[4:]
    def send(cls, meth, args):
        payload = struct.pack(">HH", cls, meth) + args
        sock.sendall(struct.pack(">BHI", 1, 0, len(payload)) + payload + b"\xce")
    sock.sendall(b"AMQP\x00\x00\x09\x01")
    assert method()[0] == (10, 10), "expected connection.start"
    resp = b"\x00guest\x00guest"
    send(10, 11, struct.pack(">I", 0) + b"\x05PLAIN" + struct.pack(">I", len(resp)) + resp + b"\x05en_US")
    (m, args) = method()
    if m != (10, 30):
        raise RuntimeError("expected connection.tune, got %r %r" % (m, args))
    send(10, 31, args[:8])  # tune-ok with the server's channel-max, frame-max, heartbeat
    send(10, 40, b"\x01/" + b"\x00" + b"\x00")  # open vhost "/"
    (m, args) = method()
    if m != (10, 41):
        raise RuntimeError("expected connection.open-ok, got %r %r" % (m, args))
    send(10, 50, struct.pack(">H", 200) + b"\x03bye" + struct.pack(">HH", 0, 0))
    assert method()[0] == (10, 51), "expected connection.close-ok"
    sock.close()

login(5672)
login(5671, sys.argv[1])
PY
  say "guest logs in from 127.0.0.1 over amqp://127.0.0.1:5672 and amqps://localhost:5671"
fi

as_root rabbitmqctl -q await_startup --timeout 60 >/dev/null
echo "TLS ready: amqps://127.0.0.1:5671 postgres sslmode=verify-full CA=$dir/ca.pem"
