#!/usr/bin/env python3
"""Structural checks of the deploy/ files that need no Docker engine and no Kubernetes cluster.

Run by deploy/validate as `check_manifests.py REPO_ROOT`. Prints one line per check, exits 1 if any
failed. What is checked:

* Kubernetes manifests (deploy/k8s/*.yaml): known apiVersion/kind pairs; metadata.name and
  namespace; spec (or data for ConfigMaps); Deployment selectors match their pod labels; every
  container has a pinned image, ports with an explicit protocol, liveness and readiness HTTP probes
  on /healthz or /readyz pointing at a declared port, resource requests, no privilege escalation;
  volumes and ConfigMap keys used by mounts exist; TOML held in ConfigMaps parses; `$(VAR)` in args
  is a declared env var; Services select an existing Deployment and target declared container ports
  of the same protocol; QUIC/STUN/TURN ports are UDP; HPA and PDB point at existing Deployments.
* deploy/docker-compose.yml: build contexts, Dockerfiles and build targets exist, bind-mounted files
  exist, depends_on names existing services, QUIC/STUN/TURN ports are published as UDP.
* deploy/prometheus.yml: scrape targets are compose services on a port they serve metrics on;
  deploy/alerts.yml: rules are mounted, complete, and use only metrics defined in the code.
* deploy/Dockerfile: has the `rendezvous` and `relay` stages; files it COPYs from the build context
  exist; the binaries it builds are [[bin]] targets of the workspace.
* deploy/grafana/*.json: valid dashboard JSON with unique panel ids, and every meshpunch_* metric a
  query uses is defined in the rendezvous or relay source code.
* deploy/examples/*.toml: parse as TOML.
"""

import json
import pathlib
import re
import sys
import tomllib

import yaml

ROOT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
DEPLOY = ROOT / "deploy"
failures = []


def ok(msg):
    print(f"ok   {msg}")


def fail(msg):
    print(f"FAIL {msg}")
    failures.append(msg)


def check(cond, msg):
    if cond:
        ok(msg)
    else:
        fail(msg)
    return cond


# Ports that carry QUIC, STUN or TURN must be UDP wherever they are declared.
UDP_PORT_NAMES = {"quic", "stun", "turn"}

KNOWN_KINDS = {
    ("v1", "Namespace"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("v1", "Secret"),
    ("apps/v1", "Deployment"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"),
}


# --------------------------------------------------------------------------- Kubernetes
def load_k8s():
    docs = []
    files = sorted((DEPLOY / "k8s").glob("*.yaml"))
    check(files, "deploy/k8s has manifests")
    for f in files:
        try:
            loaded = [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
        except yaml.YAMLError as e:
            fail(f"{f.relative_to(ROOT)}: YAML syntax: {e}")
            continue
        ok(f"{f.relative_to(ROOT)}: YAML parses ({len(loaded)} objects)")
        for d in loaded:
            docs.append((f.name, d))
    return docs


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_k8s():
    docs = load_k8s()
    by_kind = {}
    for fname, d in docs:
        where = f"{fname}: {d.get('kind', '?')}/{(d.get('metadata') or {}).get('name', '?')}"
        if not isinstance(d, dict):
            fail(f"{fname}: a document is not a mapping")
            continue
        for field in ("apiVersion", "kind", "metadata"):
            check(field in d, f"{where}: has {field}")
        pair = (d.get("apiVersion"), d.get("kind"))
        check(pair in KNOWN_KINDS, f"{where}: apiVersion/kind {pair[0]}/{pair[1]} is a stable API")
        meta = d.get("metadata") or {}
        check(bool(meta.get("name")), f"{where}: metadata.name set")
        if d.get("kind") != "Namespace":
            check(meta.get("namespace") == "meshpunch", f"{where}: in namespace meshpunch")
        if d.get("kind") == "ConfigMap":
            check(isinstance(d.get("data"), dict) and d["data"], f"{where}: has data")
        elif d.get("kind") != "Namespace":
            check(isinstance(d.get("spec"), dict), f"{where}: has spec")
        by_kind.setdefault(d.get("kind"), []).append((where, d))

    configmaps = {d["metadata"]["name"]: d for _, d in by_kind.get("ConfigMap", [])}
    deployments = {d["metadata"]["name"]: d for _, d in by_kind.get("Deployment", [])}

    for where, cm in by_kind.get("ConfigMap", []):
        for key, text in cm["data"].items():
            # TOML in a ConfigMap is a copy of an example the Rust tests load with the real
            # config types (rendezvous/tests/redis_deploy_configs.rs, deploy/validate for relays).
            example = DEPLOY / "examples" / f"k8s-{key}"
            if key.endswith(".toml"):
                check(
                    example.is_file() and example.read_text() == text,
                    f"{where}: {key} is identical to deploy/examples/{example.name}",
                )
                try:
                    tomllib.loads(text)
                    ok(f"{where}: {key} is valid TOML")
                except tomllib.TOMLDecodeError as e:
                    fail(f"{where}: {key}: TOML: {e}")

    for where, dep in by_kind.get("Deployment", []):
        spec = dep["spec"]
        tmpl = spec.get("template") or {}
        pod_labels = (tmpl.get("metadata") or {}).get("labels") or {}
        check(
            labels_match((spec.get("selector") or {}).get("matchLabels"), pod_labels),
            f"{where}: selector.matchLabels match the pod template labels",
        )
        pod = tmpl.get("spec") or {}
        check((pod.get("securityContext") or {}).get("runAsNonRoot") is True, f"{where}: runAsNonRoot")
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        containers = pod.get("containers") or []
        check(containers, f"{where}: has containers")
        for c in containers:
            cw = f"{where} container {c.get('name')}"
            image = c.get("image", "")
            check(
                ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"),
                f"{cw}: image {image!r} has a pinned tag",
            )
            ports = {}
            for p in c.get("ports") or []:
                proto = p.get("protocol")
                check(proto in ("TCP", "UDP"), f"{cw}: port {p.get('name')} has protocol {proto}")
                if p.get("name") in UDP_PORT_NAMES:
                    check(proto == "UDP", f"{cw}: port {p['name']} is UDP")
                ports[p.get("name")] = p
                ports[p.get("containerPort")] = p
            for probe in ("livenessProbe", "readinessProbe"):
                pr = c.get(probe) or {}
                if "httpGet" in pr:
                    path = pr["httpGet"].get("path")
                    check(path in ("/healthz", "/readyz"), f"{cw}: {probe} on {path}")
                    check(pr["httpGet"].get("port") in ports, f"{cw}: {probe} port is a declared port")
                elif "exec" in pr or "tcpSocket" in pr:
                    ok(f"{cw}: {probe} ({'exec' if 'exec' in pr else 'tcpSocket'})")
                else:
                    fail(f"{cw}: {probe} missing")
            if "rendezvous" in dep["metadata"]["name"]:
                check(
                    ((c.get("readinessProbe") or {}).get("httpGet") or {}).get("path") == "/readyz",
                    f"{cw}: readiness uses /readyz (degraded when Redis is unreachable)",
                )
            check(((c.get("resources") or {}).get("requests")), f"{cw}: has resource requests")
            sc = c.get("securityContext") or {}
            check(sc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation false")
            check("ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{cw}: drops ALL capabilities")
            env_names = {e["name"] for e in c.get("env") or []}
            for arg in c.get("args") or []:
                for var in re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", arg):
                    check(var in env_names, f"{cw}: arg {arg!r} uses declared env {var}")
            for m in c.get("volumeMounts") or []:
                vol = volumes.get(m.get("name"))
                if not check(vol is not None, f"{cw}: mount {m.get('name')} has a volume"):
                    continue
                if "configMap" in vol:
                    cm_name = vol["configMap"]["name"]
                    cm = configmaps.get(cm_name)
                    if check(cm is not None, f"{cw}: ConfigMap {cm_name} is defined"):
                        if m.get("subPath"):
                            check(
                                m["subPath"] in cm["data"],
                                f"{cw}: ConfigMap {cm_name} has key {m['subPath']}",
                            )
                if "secret" in vol:
                    ok(f"{cw}: mounts Secret {vol['secret']['secretName']} (created by the operator, see comments)")

    for where, svc in by_kind.get("Service", []):
        spec = svc["spec"]
        targets = [
            d
            for d in deployments.values()
            if labels_match(spec.get("selector"), d["spec"]["template"]["metadata"]["labels"])
        ]
        if not check(targets, f"{where}: selector matches a Deployment"):
            continue
        cports = {}
        for d in targets:
            for c in d["spec"]["template"]["spec"]["containers"]:
                for p in c.get("ports") or []:
                    cports[p.get("name")] = p
                    cports[p.get("containerPort")] = p
        for p in spec.get("ports") or []:
            proto = p.get("protocol")
            check(proto in ("TCP", "UDP"), f"{where}: port {p.get('name')} declares protocol {proto}")
            if p.get("name") in UDP_PORT_NAMES:
                check(proto == "UDP", f"{where}: port {p['name']} is UDP")
            tp = cports.get(p.get("targetPort", p.get("port")))
            if check(tp is not None, f"{where}: targetPort {p.get('targetPort')} is a container port"):
                check(tp.get("protocol") == proto, f"{where}: targetPort {p.get('targetPort')} protocol matches")

    for where, hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"].get("scaleTargetRef") or {}
        check(
            ref.get("kind") == "Deployment" and ref.get("name") in deployments,
            f"{where}: scales existing Deployment {ref.get('name')}",
        )
        check(
            1 <= hpa["spec"].get("minReplicas", 1) <= hpa["spec"].get("maxReplicas", 0),
            f"{where}: 1 <= minReplicas <= maxReplicas",
        )
        check(hpa["spec"].get("metrics"), f"{where}: has metrics")

    for where, pdb in by_kind.get("PodDisruptionBudget", []):
        sel = (pdb["spec"].get("selector") or {}).get("matchLabels")
        check(
            any(labels_match(sel, d["spec"]["template"]["metadata"]["labels"]) for d in deployments.values()),
            f"{where}: selector matches a Deployment",
        )

    for kind in ("Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler"):
        check(by_kind.get(kind), f"k8s: has at least one {kind}")
    check(
        any(
            p.get("protocol") == "UDP"
            for _, s in by_kind.get("Service", [])
            for p in s["spec"].get("ports") or []
        ),
        "k8s: has a UDP Service",
    )


# --------------------------------------------------------------------------- Dockerfile
def dockerfile_stages(path):
    return set(re.findall(r"(?im)^FROM\s+\S+\s+AS\s+(\S+)", path.read_text()))


def workspace_bins():
    bins = set()
    for toml_path in ROOT.glob("*/Cargo.toml"):
        data = tomllib.loads(toml_path.read_text())
        for b in data.get("bin") or []:
            bins.add(b.get("name"))
    return bins


def check_dockerfile():
    path = DEPLOY / "Dockerfile"
    if not check(path.is_file(), "deploy/Dockerfile exists"):
        return
    stages = dockerfile_stages(path)
    for stage in ("builder", "rendezvous", "relay"):
        check(stage in stages, f"Dockerfile: has stage {stage}")
    text = path.read_text()
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] != "COPY" or any(w.startswith("--from") for w in words):
            continue
        for src in [w for w in words[1:-1] if not w.startswith("--")]:
            check(src == "." or (ROOT / src).exists(), f"Dockerfile: COPY source {src} exists")
    bins = workspace_bins()
    for b in re.findall(r"--bin\s+(\S+)", text):
        check(b in bins, f"Dockerfile: builds workspace binary {b}")
    check(
        (DEPLOY / "Dockerfile.dockerignore").is_file(),
        "Dockerfile.dockerignore keeps target/ and .git out of the context",
    )


# --------------------------------------------------------------------------- compose + prometheus
def check_compose():
    path = DEPLOY / "docker-compose.yml"
    if not check(path.is_file(), "deploy/docker-compose.yml exists"):
        return {}
    try:
        compose = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        fail(f"docker-compose.yml: YAML syntax: {e}")
        return {}
    ok("docker-compose.yml: YAML parses")
    services = compose.get("services") or {}
    check(isinstance(services, dict) and services, "docker-compose.yml: has services")
    rdv_nodes = [n for n, s in services.items() if "rendezvous" in n]
    check(len(rdv_nodes) >= 2, f"docker-compose.yml: two or more rendezvous nodes ({', '.join(rdv_nodes)})")
    for want in ("redis", "relay", "prometheus"):
        check(any(want in n for n in services), f"docker-compose.yml: has a {want} service")
    for name, svc in services.items():
        where = f"docker-compose.yml service {name}"
        check("image" in svc or "build" in svc, f"{where}: has image or build")
        build = svc.get("build")
        if isinstance(build, dict):
            ctx = (DEPLOY / build.get("context", ".")).resolve()
            check(ctx.is_dir(), f"{where}: build context {build.get('context')} exists")
            dockerfile = ctx / build.get("dockerfile", "Dockerfile")
            if check(dockerfile.is_file(), f"{where}: dockerfile {build.get('dockerfile')} exists"):
                if "target" in build:
                    check(
                        build["target"] in dockerfile_stages(dockerfile),
                        f"{where}: build target {build['target']} is a Dockerfile stage",
                    )
        for vol in svc.get("volumes") or []:
            src = vol.split(":", 1)[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith(".") or src.startswith("/"):
                check((DEPLOY / src).exists(), f"{where}: bind mount source {src} exists")
            else:
                check(src in (compose.get("volumes") or {}), f"{where}: named volume {src} is declared")
        deps = svc.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            check(dep in services, f"{where}: depends_on {dep} is a service")
        for port in svc.get("ports") or []:
            spec = str(port)
            container_port = spec.split(":")[-1]
            if any(p in container_port for p in ("443", "3478")):
                # The rendezvous' TLS-over-TCP fallback shares the QUIC port number: a /tcp
                # publication is fine next to the same port published as /udp.
                udp_twin = spec[: -len("/tcp")] + "/udp" if spec.endswith("/tcp") else None
                if udp_twin and udp_twin in [str(q) for q in svc.get("ports") or []]:
                    check(True, f"{where}: {spec} is the TLS fallback beside {udp_twin}")
                    continue
                check(spec.endswith("/udp"), f"{where}: QUIC/STUN/TURN port {spec} is published as UDP")
    return services


def check_prometheus(services):
    path = DEPLOY / "prometheus.yml"
    if not check(path.is_file(), "deploy/prometheus.yml exists"):
        return
    try:
        prom = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        fail(f"prometheus.yml: YAML syntax: {e}")
        return
    ok("prometheus.yml: YAML parses")
    jobs = prom.get("scrape_configs") or []
    check(jobs, "prometheus.yml: has scrape_configs")
    for job in jobs:
        for sc in job.get("static_configs") or []:
            for target in sc.get("targets") or []:
                host, _, port = target.rpartition(":")
                if host in ("localhost", "127.0.0.1"):
                    continue
                svc = services.get(host)
                if not check(svc is not None, f"prometheus.yml job {job.get('job_name')}: target {target} is a compose service"):
                    continue
                # The admin port is on the command line or in a mounted config file.
                served = " ".join(str(a) for a in svc.get("command") or [])
                for vol in svc.get("volumes") or []:
                    src = vol.split(":", 1)[0] if isinstance(vol, str) else ""
                    if (DEPLOY / src).is_file():
                        served += (DEPLOY / src).read_text()
                check(
                    f":{port}" in served,
                    f"prometheus.yml job {job.get('job_name')}: {host} serves admin HTTP on port {port}",
                )


def check_alerts(services):
    path = DEPLOY / "alerts.yml"
    if not check(path.is_file(), "deploy/alerts.yml exists"):
        return
    try:
        rules = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        fail(f"alerts.yml: YAML syntax: {e}")
        return
    ok("alerts.yml: YAML parses")
    known = defined_metrics()
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text()) or {}
    mounted = {
        str(v).split(":")[1]
        for v in (services.get("prometheus") or {}).get("volumes") or []
        if isinstance(v, str) and v.count(":") >= 1
    }
    for rf in prom.get("rule_files") or []:
        check(rf in mounted, f"prometheus.yml: rule file {rf} is mounted into the prometheus service")
    for group in rules.get("groups") or []:
        for rule in group.get("rules") or []:
            name = rule.get("alert", "?")
            check(bool(rule.get("expr")), f"alerts.yml {name}: has expr")
            check(bool((rule.get("annotations") or {}).get("summary")), f"alerts.yml {name}: has a summary")
            for m in re.findall(r"meshpunch_[a-z0-9_]+", rule.get("expr", "")):
                check(m in known, f"alerts.yml {name}: metric {m} is defined in rendezvous/ or relay/ source")


# --------------------------------------------------------------------------- Grafana
def defined_metrics():
    names = set()
    for crate in ("rendezvous", "relay"):
        for src in (ROOT / crate / "src").rglob("*.rs"):
            names.update(re.findall(r"\"(meshpunch_(?:rendezvous|relay)_[a-z0-9_]+)\"", src.read_text()))
    return names


def check_grafana():
    files = sorted((DEPLOY / "grafana").glob("*.json"))
    check(files, "deploy/grafana has dashboards")
    known = defined_metrics()
    for f in files:
        where = str(f.relative_to(ROOT))
        try:
            dash = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            fail(f"{where}: JSON: {e}")
            continue
        ok(f"{where}: JSON parses")
        for field in ("title", "uid", "panels", "schemaVersion"):
            check(field in dash, f"{where}: has {field}")
        panels = []
        for p in dash.get("panels") or []:
            panels.append(p)
            panels.extend(p.get("panels") or [])
        ids = [p.get("id") for p in panels]
        check(len(ids) == len(set(ids)) and None not in ids, f"{where}: panel ids unique")
        used = set()
        for p in panels:
            if p.get("type") == "row":
                continue
            check("gridPos" in p, f"{where}: panel {p.get('title')!r} has gridPos")
            targets = p.get("targets") or []
            check(targets, f"{where}: panel {p.get('title')!r} has queries")
            for t in targets:
                for m in re.findall(r"meshpunch_[a-z0-9_]+", t.get("expr", "")):
                    used.add(re.sub(r"_(bucket|sum|count)$", "", m) if m not in known else m)
        for m in sorted(used):
            check(m in known, f"{where}: metric {m} is defined in rendezvous/ or relay/ source")


# --------------------------------------------------------------------------- examples
def check_examples():
    files = sorted((DEPLOY / "examples").glob("*.toml"))
    check(files, "deploy/examples has configs")
    for f in files:
        try:
            tomllib.loads(f.read_text())
            ok(f"{f.relative_to(ROOT)}: valid TOML")
        except tomllib.TOMLDecodeError as e:
            fail(f"{f.relative_to(ROOT)}: TOML: {e}")


check_k8s()
check_dockerfile()
compose_services = check_compose()
check_prometheus(compose_services)
check_alerts(compose_services)
check_grafana()
check_examples()
print(f"check_manifests: {len(failures)} failure(s)")
sys.exit(1 if failures else 0)
