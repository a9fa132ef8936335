#!/usr/bin/env bash
# Checks the observability and contract documents:
#   1. deploy/prometheus/alerts.yml      — `promtool check rules` (Debian's `prometheus` package);
#   2. docs/asyncapi.yaml (+ docs/schemas/*.json) — parsed and validated by @asyncapi/parser,
#      the JSON Schemas compiled with Ajv (draft-07) and every example validated against them;
#   3. deploy/grafana/instructd.json     — valid JSON, every PromQL expression parses (fed to
#      promtool as recording rules);
#   4. docs/openapi.json (the console's API) — validated by @readme/openapi-parser (OpenAPI
#      3.1, every $ref resolved). That the API answers as it says is checked against it by the
#      Rust tests `console::*`.
# That the dashboard and the alerts query only metrics instructd exports is checked against
# src/metrics.rs and a real scrape by the Rust test
# `operating::dashboards_and_alerts_query_only_exported_metrics`.
#
# Non-interactive; meant for root on Debian bookworm. Installs what is missing (promtool via
# apt, Node tools via npm into target/npm-tools, which is gitignored) and is fast on re-run.
# Usage: scripts/check-observability.sh
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
ALERTS=deploy/prometheus/alerts.yml
DASHBOARD=deploy/grafana/instructd.json
ASYNCAPI=docs/asyncapi.yaml
OPENAPI=docs/openapi.json
TOOLS=$ROOT/target/npm-tools
PARSER_VERSION=3.6.6
AJV_VERSION=8.20.0
AJV_FORMATS_VERSION=2.1.1
OPENAPI_PARSER_VERSION=9.0.0


step() { printf '\n== %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

apt_install() {
    [ "$(id -u)" -eq 0 ] || die "installing $* needs root (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-cache show "$@" >/dev/null 2>&1; then
        apt-get update -qq
    fi
    # Keep maintainer scripts from starting the packaged services: only a policy we add
    # ourselves is removed again.
    local policy=/usr/sbin/policy-rc.d added_policy=
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        added_policy=1
    fi
    local status=0
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null || status=$?
    if [ -n "$added_policy" ]; then rm -f "$policy"; fi
    [ "$status" -eq 0 ] || die "apt-get install $* failed"
}

# ---------------------------------------------------------------------------- tools
if ! command -v promtool >/dev/null 2>&1; then
    step "installing promtool (Debian package prometheus)"
    apt_install prometheus
    # Under systemd the unit would still be enabled for the next boot: we only want promtool.
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
    command -v promtool >/dev/null 2>&1 || die "the prometheus package did not provide promtool"
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    step "installing Node.js and npm (Debian packages)"
    apt_install nodejs npm
fi

PACKAGE_JSON=$(cat <<EOF
{
  "name": "instructd-npm-tools",
  "private": true,
  "description": "Validators used by scripts/check-observability.sh",
  "dependencies": {
    "@asyncapi/parser": "$PARSER_VERSION",
    "ajv": "$AJV_VERSION",
    "ajv-formats": "$AJV_FORMATS_VERSION",
    "@readme/openapi-parser": "$OPENAPI_PARSER_VERSION"
  }
}
EOF
)
installed_version() {
    node -p "require('$TOOLS/node_modules/$1/package.json').version" 2>/dev/null || true
}
if [ "$(installed_version @asyncapi/parser)" != "$PARSER_VERSION" ] ||
    [ "$(installed_version ajv)" != "$AJV_VERSION" ] ||
    [ "$(installed_version ajv-formats)" != "$AJV_FORMATS_VERSION" ] ||
    [ "$(installed_version @readme/openapi-parser)" != "$OPENAPI_PARSER_VERSION" ]; then
    step "installing @asyncapi/parser@$PARSER_VERSION, ajv@$AJV_VERSION, ajv-formats@$AJV_FORMATS_VERSION," \
        "@readme/openapi-parser@$OPENAPI_PARSER_VERSION into target/npm-tools"
    mkdir -p "$TOOLS"
    printf '%s\n' "$PACKAGE_JSON" >"$TOOLS/package.json"
    (cd "$TOOLS" && npm install --no-audit --no-fund --ignore-scripts --loglevel=error)
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------------------- 1. alerts
step "promtool check rules $ALERTS ($(promtool --version 2>&1 | head -n1))"
promtool check rules "$ALERTS"

# ---------------------------------------------------------------------------- 2. AsyncAPI
step "AsyncAPI: $ASYNCAPI (@asyncapi/parser $PARSER_VERSION) and its JSON Schemas (Ajv $AJV_VERSION)"
node - "$TOOLS" "$ROOT/$ASYNCAPI" <<'JS'
const path = require('path');
const fs = require('fs');
const [tools, file] = process.argv.slice(2);
const need = (name) => require(path.join(tools, 'node_modules', name));
const { Parser, fromFile } = need('@asyncapi/parser');
const Ajv = need('ajv').default;
const addFormats = need('ajv-formats').default;

const SEVERITY = ['error', 'warning', 'info', 'hint'];
let failed = false;
const fail = (message) => { console.log(`FAIL ${message}`); failed = true; };

(async () => {
  const { document, diagnostics } = await fromFile(new Parser(), file).parse();
  for (const d of diagnostics) {
    console.log(`${SEVERITY[d.severity]}: ${d.code} at /${d.path.join('/')}: ${d.message}`);
  }
  if (!document || diagnostics.some((d) => d.severity === 0)) {
    fail('the AsyncAPI document is not valid');
    process.exit(1);
  }
  console.log(`ok: AsyncAPI ${document.version()} document "${document.info().title()}" ${document.info().version()}: ` +
    `${document.channels().length} channels, ${document.operations().length} operations, ${document.allMessages().length} messages`);

  // The payload schemas are standalone draft-07 files referenced from the document.
  const ajv = new Ajv({ strict: true, strictTypes: false, allErrors: true });
  addFormats(ajv);
  const schemas = {};
  for (const name of ['request', 'event']) {
    const schemaFile = path.join(path.dirname(file), 'schemas', `${name}.json`);
    const schema = JSON.parse(fs.readFileSync(schemaFile, 'utf8'));
    if (JSON.stringify(schema).match(/"\$ref"\s*:\s*"(?!#)/)) fail(`${schemaFile}: has an external $ref`);
    schemas[name] = ajv.compile(schema);
    for (const [i, example] of (schema.examples || []).entries()) {
      if (!schemas[name](example)) fail(`${name}.json examples[${i}]: ${ajv.errorsText(schemas[name].errors)}`);
    }
    console.log(`ok: schemas/${name}.json compiles (draft-07), ${(schema.examples || []).length} embedded example(s) valid`);
  }

  // Every message example against its payload schema.
  const payloadSchema = { GenerationRequest: schemas.request, CompletionEvent: schemas.event };
  for (const message of document.allMessages()) {
    const name = message.name();
    const validate = payloadSchema[name];
    const examples = message.examples().all();
    for (const example of examples) {
      if (validate && example.hasPayload() && !validate(example.payload())) {
        fail(`message ${name} example ${example.name()}: ${ajv.errorsText(validate.errors)}`);
      }
    }
    if (validate) console.log(`ok: message ${name}: ${examples.length} example(s) valid against its payload schema`);
  }
  process.exit(failed ? 1 : 0);
})().catch((error) => { console.error(error); process.exit(2); });
JS

# ---------------------------------------------------------------------------- 3. Grafana
step "Grafana dashboard $DASHBOARD: JSON, PromQL"
node - "$ROOT/$DASHBOARD" "$WORK/dashboard-rules.yml" "$WORK/dashboard-exprs.txt" <<'JS'
const fs = require('fs');
const [file, rulesOut, exprsOut] = process.argv.slice(2);
let dashboard;
try {
  dashboard = JSON.parse(fs.readFileSync(file, 'utf8'));
} catch (error) {
  console.log(`FAIL ${file} is not valid JSON: ${error.message}`);
  process.exit(1);
}
const exprs = [];
const walk = (panels) => {
  for (const panel of panels || []) {
    for (const target of panel.targets || []) {
      if (target.expr) exprs.push({ where: `panel ${panel.id} "${panel.title}" ${target.refId}`, expr: target.expr });
    }
    walk(panel.panels);
  }
};
walk(dashboard.panels);
for (const variable of (dashboard.templating && dashboard.templating.list) || []) {
  const query = typeof variable.query === 'object' ? variable.query.query : variable.query;
  const match = variable.type === 'query' && /^label_values\((.+),\s*\w+\)$/.exec(query || '');
  if (match) exprs.push({ where: `variable $${variable.name}`, expr: match[1] });
}
// Grafana's variables become plain values so that promtool can parse the expressions.
const values = { __rate_interval: '5m', __interval: '1m', __range: '1h', __range_s: '3600' };
const substitute = (expr) =>
  expr.replace(/\$\{(\w+)(?::\w+)?\}|\$(\w+)/g, (_, a, b) => values[a || b] || '.*');
const rules = {
  groups: [{
    name: 'grafana-dashboard-expressions',
    rules: exprs.map((e, i) => ({ record: `dashboard:expr_${i + 1}`, expr: substitute(e.expr) })),
  }],
};
fs.writeFileSync(rulesOut, JSON.stringify(rules, null, 2)); // JSON is YAML
fs.writeFileSync(exprsOut, exprs.map((e) => `${e.where}\t${e.expr}`).join('\n') + '\n');
console.log(`ok: valid JSON, schemaVersion ${dashboard.schemaVersion}, ${exprs.length} PromQL expressions`);
JS
if ! promtool check rules "$WORK/dashboard-rules.yml" >"$WORK/promtool.out" 2>&1; then
    sed "s|$WORK/dashboard-rules.yml|$DASHBOARD (as recording rules)|" "$WORK/promtool.out"
    echo "FAIL a dashboard expression does not parse; rule dashboard:expr_N is expression N:"
    nl -ba "$WORK/dashboard-exprs.txt"
    exit 1
fi
echo "ok: promtool parses every dashboard expression ($(grep -o 'SUCCESS.*' "$WORK/promtool.out"))"

# ---------------------------------------------------------------------------- 4. OpenAPI
step "OpenAPI: $OPENAPI (@readme/openapi-parser $OPENAPI_PARSER_VERSION)"
node - "$TOOLS" "$ROOT/$OPENAPI" <<'JS'
const path = require('path');
const [tools, file] = process.argv.slice(2);
const { validate } = require(path.join(tools, 'node_modules', '@readme/openapi-parser'));
(async () => {
  const result = await validate(file);
  for (const error of result.errors || []) console.log(`FAIL ${error.message}`);
  for (const warning of result.warnings || []) console.log(`warning: ${warning.message}`);
  if (!result.valid) process.exit(1);
  const document = JSON.parse(require('fs').readFileSync(file, 'utf8'));
  const operations = Object.values(document.paths).flatMap((item) => Object.keys(item));
  console.log(`ok: OpenAPI ${document.openapi} "${document.info.title}" ${document.info.version}: ` +
    `${Object.keys(document.paths).length} paths, ${operations.length} operations, ` +
    `${Object.keys(document.components.schemas).length} schemas`);
})().catch((error) => { console.error(error); process.exit(2); });
JS

printf '\nall observability checks passed\n'
