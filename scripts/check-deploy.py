"""Validates instructd's deployment files; scripts/check-deploy.sh runs it in its virtualenv.

usage: check-deploy.py RENDERED_BASE.yaml --k8s-version V [--k8s-version V ...]

1. Schemas. Every document of the rendered kustomize base and of
   deploy/kubernetes/secret.example.yaml (not in the base: an example to copy):
   - Kubernetes kinds: kubernetes-validate, strict (unknown fields are errors), against each
     given Kubernetes version's OpenAPI schemas;
   - KEDA kinds (keda.sh/v1alpha1): the pydantic models of cloudcoil-models-keda, generated from
     KEDA's CRDs (its version is printed); pydantic ignores unknown fields, so the document is
     also compared with what the model kept, and a field it dropped is an error.
2. Policy: what the manifests, the systemd unit and the Dockerfile must agree on with
   config/default.toml and with each other (grace periods above the drain, probes, ports,
   security context, KEDA's trigger). Each failed rule prints one line.
"""

import argparse
import re
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import dockerfile
import kubernetes_validate
import pydantic
import yaml
from cloudcoil.models.keda import v1alpha1 as keda

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = tomllib.loads((ROOT / "config/default.toml").read_text())
errors: list[str] = []


def fail(where: str, message: str) -> None:
    errors.append(f"{where}: {message}")


def check(ok: bool, where: str, message: str) -> None:
    if not ok:
        fail(where, message)


def dropped(given, kept, path=""):
    """Paths present in `given` but not in `kept` (the fields a model did not know)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            if key not in kept:
                yield f"{path}.{key}"
            else:
                yield from dropped(value, kept[key], f"{path}.{key}")
    elif isinstance(given, list) and isinstance(kept, list):
        for i, (a, b) in enumerate(zip(given, kept)):
            yield from dropped(a, b, f"{path}[{i}]")


def validate_schema(doc: dict, where: str, k8s_versions: list[str]) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        model = getattr(keda, doc["kind"], None)
        if model is None:
            return fail(where, f"no KEDA model for kind {doc['kind']}")
        try:
            kept = model.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json")
        except pydantic.ValidationError as error:
            for e in error.errors():
                fail(where, f"KEDA schema: {'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})")
            return
        for path in dropped(doc, kept):
            fail(where, f"KEDA schema: unknown field {path}")
        return
    for k8s in k8s_versions:
        try:
            kubernetes_validate.validate(doc, k8s, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            fail(where, f"Kubernetes {k8s} schema: {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            fail(where, f"Kubernetes {k8s}: no schema for {doc['apiVersion']} {doc['kind']}")


def seconds(value: str) -> float:
    """A systemd time span such as 45, 45s, 1min 30s."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value))


def check_policy(docs: dict, unit: str, dockerfile_path: Path) -> None:
    grace = DEFAULTS["worker"]["shutdown_grace_secs"]
    job_timeout = DEFAULTS["llm"]["job_timeout_secs"]
    port = int(DEFAULTS["http"]["listen"].rsplit(":", 1)[1])
    concurrency = DEFAULTS["worker"]["concurrency"]

    def secure(where: str, pod: dict) -> None:
        check(pod.get("securityContext", {}).get("runAsNonRoot") is True, where, "pod runAsNonRoot must be true")
        check(isinstance(pod.get("securityContext", {}).get("runAsUser"), int), where, "pod needs a numeric runAsUser")
        check(pod.get("securityContext", {}).get("seccompProfile", {}).get("type") == "RuntimeDefault",
              where, "seccompProfile must be RuntimeDefault")
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            check(sc.get("allowPrivilegeEscalation") is False, where, f"{c['name']}: allowPrivilegeEscalation must be false")
            check(sc.get("readOnlyRootFilesystem") is True, where, f"{c['name']}: readOnlyRootFilesystem must be true")
            check(sc.get("capabilities", {}).get("drop") == ["ALL"], where, f"{c['name']}: must drop ALL capabilities")
            check({"requests", "limits"} <= c.get("resources", {}).keys(), where, f"{c['name']}: needs requests and limits")
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            config_file = env.get("INSTRUCTD_CONFIG", "")
            mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            mounted = [n for n, p in mounts.items() if config_file.startswith(p.rstrip("/") + "/")]
            check(bool(mounted) and "configMap" in volumes.get(mounted[0], {}), where,
                  f"{c['name']}: INSTRUCTD_CONFIG ({config_file}) is not in a mounted ConfigMap")
            if mounted:
                key = config_file.rsplit("/", 1)[1]
                cm = volumes[mounted[0]]["configMap"]["name"]
                check(key in docs.get(("ConfigMap", cm), {}).get("data", {}), where, f"ConfigMap {cm} has no key {key}")
            check(any(s.get("secretRef", {}).get("name") == "instructd" for s in c.get("envFrom", [])),
                  where, f"{c['name']}: must read the `instructd` Secret")

    deploy = docs.get(("Deployment", "instructd"))
    if deploy is None:
        return fail("base", "no Deployment instructd")
    where = "Deployment/instructd"
    pod = deploy["spec"]["template"]["spec"]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    secure(where, pod)
    check(pod.get("terminationGracePeriodSeconds", 30) > grace, where,
          f"terminationGracePeriodSeconds must exceed worker.shutdown_grace_secs ({grace})")
    check("replicas" not in deploy["spec"], where, "replicas must be unset (KEDA owns it)")
    (c,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    check(c.get("args") == ["run"], where, "args must be [run]")
    check(env.get("INSTRUCTD__HTTP__LISTEN") == f"0.0.0.0:{port}", where, f"INSTRUCTD__HTTP__LISTEN must be 0.0.0.0:{port}")
    # Beyond loopback the console needs the admin token, or start-up stops.
    secret = docs.get(("Secret", "instructd"), {}).get("stringData", {})
    check(env.get("INSTRUCTD__HTTP__CONSOLE") == "false" or "INSTRUCTD__HTTP__ADMIN_TOKEN" in secret, where,
          "the console on 0.0.0.0 needs INSTRUCTD__HTTP__ADMIN_TOKEN in the `instructd` Secret "
          "(or INSTRUCTD__HTTP__CONSOLE=false)")
    check(env.get("INSTRUCTD__LOG__FORMAT") == "json", where, "INSTRUCTD__LOG__FORMAT must be json")
    check({"name": "http", "containerPort": port, "protocol": "TCP"} in c.get("ports", []), where, f"port {port} must be named http")
    for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        get = c.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path and get.get("port") == "http", where, f"{probe} must GET {path} on port http")

    job = next((d for (k, _), d in docs.items() if k == "Job"), None)
    if job is None:
        fail("base", "no migration Job")
    else:
        where = f"Job/{job['metadata']['name']}"
        jpod = job["spec"]["template"]["spec"]
        secure(where, jpod)
        check(jpod["containers"][0].get("args") == ["migrate"], where, "args must be [migrate]")
        check(jpod.get("securityContext") == pod.get("securityContext"), where, "pod securityContext differs from the Deployment's")

    for (kind, name), doc in docs.items():
        selector = None
        if kind == "Service":
            selector = doc["spec"]["selector"]
            annotations = doc["metadata"].get("annotations", {})
            check(annotations.get("prometheus.io/scrape") == "true" and annotations.get("prometheus.io/port") == str(port),
                  f"Service/{name}", f"needs prometheus.io/scrape and prometheus.io/port={port}")
            check(any(p["port"] == port for p in doc["spec"]["ports"]), f"Service/{name}", f"must expose {port}")
        elif kind == "PodDisruptionBudget":
            selector = doc["spec"]["selector"]["matchLabels"]
        if selector is not None:
            check(selector.items() <= labels.items(), f"{kind}/{name}", "selector does not match the Deployment's pods")

    scaled = next((d for (k, _), d in docs.items() if k == "ScaledObject"), None)
    if scaled is None:
        fail("base", "no ScaledObject")
    else:
        where = f"ScaledObject/{scaled['metadata']['name']}"
        spec = scaled["spec"]
        check(spec["scaleTargetRef"].get("name") == "instructd", where, "must target Deployment instructd")
        check(spec.get("cooldownPeriod", 300) > job_timeout, where, f"cooldownPeriod must exceed llm.job_timeout_secs ({job_timeout})")
        window = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior", {}) \
            .get("scaleDown", {}).get("stabilizationWindowSeconds", 300)
        check(window > job_timeout, where, f"HPA scaleDown stabilizationWindowSeconds must exceed {job_timeout}")
        check(1 <= spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), where, "need 1 <= min <= max replicas")
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        check(trigger["type"] == "rabbitmq", where, "trigger must be rabbitmq")
        check(meta.get("protocol") == "http", where, "protocol must be http (the management API counts unacked messages)")
        check(meta.get("mode") == "QueueLength", where, "mode must be QueueLength")
        check(meta.get("queueName") == DEFAULTS["broker"]["request_queue"], where, "queueName must be broker.request_queue")
        check(meta.get("value") == str(concurrency), where, f"value should be worker.concurrency ({concurrency})")
        auth = trigger.get("authenticationRef", {}).get("name")
        ta = docs.get(("TriggerAuthentication", auth))
        check(ta is not None and any(r["parameter"] == "host" for r in ta["spec"].get("secretTargetRef", [])),
              where, "authenticationRef must name a TriggerAuthentication that gives `host` from a Secret")

    where = "deploy/systemd/instructd.service"
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    check(seconds(settings.get("TimeoutStopSec", "90")) > grace, where, f"TimeoutStopSec must exceed {grace}")
    check(settings.get("ProtectSystem") == "strict", where, "ProtectSystem must be strict")
    check(settings.get("NoNewPrivileges") == "yes", where, "NoNewPrivileges must be yes")
    check(settings.get("DynamicUser") == "yes" or "User" in settings, where, "needs DynamicUser or User")
    check(settings.get("Restart") in ("on-failure", "always"), where, "needs a Restart policy")

    where = "deploy/Dockerfile"
    stages = [[]]
    for ins in dockerfile.parse_file(str(dockerfile_path)):
        if ins.cmd == "FROM" and stages[-1]:
            stages.append([])
        stages[-1].append(ins)
    final = {ins.cmd: ins.value for ins in stages[-1]}
    check(len(stages) >= 2, where, "must be multi-stage")
    user = final.get("USER", ("0",))[0].split(":")[0]
    check(user.isdigit() and user != "0", where, "final stage needs a numeric non-root USER")
    check(final.get("EXPOSE") == (str(port),), where, f"must EXPOSE {port}")
    check(final.get("ENTRYPOINT") == ("/usr/local/bin/instructd",), where, "ENTRYPOINT must be the binary")
    check(final.get("CMD") == ("run",), where, "CMD must be [run]")
    check(user == str(pod["securityContext"]["runAsUser"]), where, "USER differs from the Deployment's runAsUser")
    # The build stage must hold every path the workspace's Cargo.toml reads: its members, its
    # patches, and the files of the targets it names (else cargo cannot load the workspace).
    copied = {ins.value[0].rstrip("/") for ins in stages[0] if ins.cmd == "COPY"}
    manifest = tomllib.loads((ROOT / "Cargo.toml").read_text())
    needed = set(manifest["workspace"]["members"]) - {"."}
    needed |= {patch["path"] for patches in manifest.get("patch", {}).values() for patch in patches.values()}
    for kind, directory in (("test", "tests"), ("bench", "benches")):
        needed |= {target.get("path", f"{directory}/{target['name']}.rs") for target in manifest.get(kind, [])}
    for path in sorted(needed):
        check(any(path == c or path.startswith(c + "/") for c in copied), where, f"the build stage does not COPY {path}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("rendered", type=Path)
    parser.add_argument("--k8s-version", action="append", required=True)
    args = parser.parse_args()

    print(f"  kubernetes-validate {version('kubernetes-validate')} (strict), Kubernetes {', '.join(args.k8s_version)};"
          f" KEDA CRD models cloudcoil-models-keda {version('cloudcoil.models.keda')}")
    docs = {}
    sources = [(args.rendered, "base"), (ROOT / "deploy/kubernetes/secret.example.yaml", "secret.example.yaml")]
    for path, origin in sources:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            name = doc["metadata"]["name"]
            where = f"{origin}: {doc['kind']}/{name}"
            validate_schema(doc, where, args.k8s_version)
            if origin == "base":
                # The generated ConfigMap's name carries kustomize's hash: index it without.
                if doc["kind"] == "ConfigMap":
                    name = re.sub(r"-[a-z0-9]{10}$", "", name)
                docs[(doc["kind"], name)] = doc
            elif doc["kind"] == "Secret":
                docs[("Secret", name)] = doc
            print(f"  {'ok  ' if not any(e.startswith(where + ':') for e in errors) else 'FAIL'} {where}")
    # References in the base to the generated ConfigMap carry the hash too.
    for (kind, _), doc in docs.items():
        for volume in doc.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
            if "configMap" in volume:
                volume["configMap"]["name"] = re.sub(r"-[a-z0-9]{10}$", "", volume["configMap"]["name"])
    check_policy(docs, (ROOT / "deploy/systemd/instructd.service").read_text(), ROOT / "deploy/Dockerfile")
    for error in errors:
        print(f"  error: {error}")
    print(f"  {'policy ok' if not errors else f'{len(errors)} error(s)'}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
