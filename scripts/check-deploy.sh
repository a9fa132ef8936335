#!/usr/bin/env bash
# Checks the deployment files under deploy/ without a cluster, a container engine or cargo:
#   1. systemd: `systemd-analyze verify` on deploy/systemd/instructd.service;
#   2. kustomize: builds deploy/kubernetes with a real kustomize: `kustomize` if installed, else
#      `kubectl kustomize` (kubectl embeds kustomize), else Debian's kubernetes-client is
#      installed for its kubectl (1.20, embedding kustomize v2.0.3: old, but the base sticks to
#      fields every kustomize since v2 reads);
#   3. schemas and policy: scripts/check-deploy.py on the rendered base and on
#      deploy/kubernetes/secret.example.yaml, in a virtualenv under target/deploy-check/ (see
#      that file for what it checks and how the KEDA objects are validated);
#   4. the ConfigMap's instructd.toml is loaded by a built instructd binary (`instructd config`
#      rejects unknown keys and bad values), when target/{release,debug}/instructd exists: this
#      script never builds it.
# As root on Debian 12 it installs what is missing (apt-get: systemd, python3-venv,
# kubernetes-client; pip: the pinned packages below); it installs nothing on a second run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Kubernetes versions whose schemas the manifests must satisfy: the oldest supported (1.31:
# PodDisruptionBudget.unhealthyPodEvictionPolicy is GA there) and the newest the pinned
# kubernetes-validate ships.
K8S_VERSIONS=(1.31.0 1.37.0)
# cloudcoil-models-keda 2.16.1.0: pydantic models generated from KEDA 2.16.1's CRDs (there is no
# KEDA CRD schema on PyPI or npm in a form kubernetes-validate reads). dockerfile: the official
# Dockerfile parser (moby/buildkit) as a Python extension.
PY_REQUIREMENTS=(kubernetes-validate==1.37.0 cloudcoil==0.6.0 cloudcoil-models-keda==2.16.1.0 dockerfile==3.4.0)
WORK=target/deploy-check
VENV=$WORK/venv

started=$SECONDS
step() { printf '== %s\n' "$*"; }

apt_updated=
apt_install() {
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo)
    if [[ -z $apt_updated ]]; then
        "${sudo[@]}" apt-get update -qq
        apt_updated=1
    fi
    echo "   installing $* (apt-get)"
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

mkdir -p "$WORK"

step "systemd: systemd-analyze verify deploy/systemd/instructd.service"
command -v systemd-analyze >/dev/null || apt_install systemd
# verify checks that ExecStart's binary exists and is executable. Rather than editing a copy
# of the unit, verify it unchanged in a scratch root (--root) holding Debian's own units (for
# the dependencies it names) and a stub at /usr/local/bin/instructd, where the unit expects the
# binary. What the stub does is irrelevant: verify never runs it.
root=$WORK/systemd-root
rm -rf "$root"
mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd" "$root/usr/local/bin"
cp -r /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp deploy/systemd/instructd.service "$root/etc/systemd/system/"
printf '#!/bin/sh\nexit 0\n' >"$root/usr/local/bin/instructd"
chmod +x "$root/usr/local/bin/instructd"
if ! out=$(systemd-analyze verify --root="$root" instructd.service 2>&1) || [[ -n $out ]]; then
    # Any output is a finding (verify also warns about unknown or misspelled settings).
    printf '%s\n' "$out"
    exit 1
fi
echo "   ok ($(systemd-analyze --version | head -n1))"

step "kustomize: build deploy/kubernetes"
if command -v kustomize >/dev/null; then
    kustomize=(kustomize build)
    kversion=$(kustomize version 2>&1 | head -n1)
else
    command -v kubectl >/dev/null || apt_install kubernetes-client
    kustomize=(kubectl kustomize)
    # kubectl >= 1.21 names its kustomize; 1.14 to 1.20 embed kustomize v2.0.3.
    kversion=$(kubectl version --client 2>/dev/null | grep -oE 'v[0-9]+\.[0-9]+\.[0-9]+' | head -n2 | paste -sd' ' -)
    kversion="kubectl ${kversion/ / with kustomize }"
fi
rendered=$WORK/rendered.yaml
"${kustomize[@]}" deploy/kubernetes >"$rendered"
echo "   ok ($kversion): $(grep -c '^kind:' "$rendered") objects -> $rendered"

step "schemas and policy"
if ! "$VENV/bin/python" -c '' 2>/dev/null; then
    command -v python3 >/dev/null || apt_install python3
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        apt_install python3-venv
        rm -rf "$VENV"
        python3 -m venv "$VENV"
    fi
fi
stamp=$VENV/.requirements
if [[ ! -f $stamp || $(<"$stamp") != "${PY_REQUIREMENTS[*]}" ]]; then
    echo "   installing ${PY_REQUIREMENTS[*]} (pip, into $VENV)"
    "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_REQUIREMENTS[@]}"
    echo "${PY_REQUIREMENTS[*]}" >"$stamp"
fi
args=()
for v in "${K8S_VERSIONS[@]}"; do args+=(--k8s-version "$v"); done
"$VENV/bin/python" scripts/check-deploy.py "$rendered" "${args[@]}"

step "instructd.toml: loaded by instructd config"
binary=
for candidate in target/release/instructd target/debug/instructd; do
    if [[ -x $candidate ]]; then binary=$candidate && break; fi
done
if [[ -z $binary ]]; then
    echo "   skipped: no target/{release,debug}/instructd (build it to check the file's keys)"
else
    # The Deployment's environment, with placeholders for the Secret's URLs (never connected to).
    if ! out=$(env -i PATH="$PATH" INSTRUCTD_CONFIG=deploy/kubernetes/instructd.toml \
        INSTRUCTD__HTTP__LISTEN=0.0.0.0:9464 INSTRUCTD__LOG__FORMAT=json \
        INSTRUCTD__BROKER__URL=amqp://u:p@rabbitmq:5672/%2f INSTRUCTD__DATABASE__URL=postgres://u:p@postgres/instructd \
        "$binary" config 2>&1); then
        printf '%s\n' "$out"
        exit 1
    fi
    echo "   ok ($binary)"
fi

echo "check-deploy: all checks passed in $((SECONDS - started)) s"
