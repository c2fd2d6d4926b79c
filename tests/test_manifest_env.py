"""The service started with the Kubernetes Deployment's own environment, as its pods would start it: the
metrics directory it names does not exist yet (an emptyDir at /tmp starts empty)."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import yaml

from app.__main__ import prepare_metrics_dir
from tests.conftest import ROOT
from tests.servers import get, post, running_server

DEPLOYMENT = ROOT / "deploy" / "k8s" / "deployment.yaml"


def deployment_env() -> dict[str, str]:
    (container,) = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]["containers"]
    return {e["name"]: str(e["value"]) for e in container["env"]}


def test_prepare_metrics_dir_makes_it_and_drops_an_earlier_runs_files(tmp_path: Path) -> None:
    directory = tmp_path / "tmp" / "metrics"
    prepare_metrics_dir(directory)
    assert directory.is_dir()
    (directory / "counter_123.db").write_bytes(b"old")
    (directory / "keep.txt").write_text("not ours")
    prepare_metrics_dir(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]


@pytest.mark.slow
@pytest.mark.integration
def test_deployment_env_serves_and_counts_every_worker(tmp_path: Path) -> None:
    env = deployment_env()
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith("/tmp/")
    # The pod's /tmp is an empty volume: here, an empty directory standing in for it.
    env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / env["PROMETHEUS_MULTIPROC_DIR"].removeprefix("/tmp/"))
    assert int(env["INTENT_WORKERS"]) >= 2
    with running_server(env=env) as (base, proc):
        sent = 60
        for i in range(sent):
            status, body = post(base + "/predict", {"text": f"what is my balance {i}"})
            assert status == 200, body
        total = 0.0
        # Each scrape is answered by one worker; the multiprocess collector sums all of them.
        status, text = get(base + "/metrics")
        assert status == 200
        for line in text.decode().splitlines():
            if re.match(r'intent_requests_total\{.*route="/predict".*status="200"', line):
                total += float(line.rsplit(" ", 1)[1])
        assert total == sent
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0


def test_the_pods_environment_holds_only_settings_and_no_service_links() -> None:
    """The service refuses an INTENT_* variable that is not a setting (app.config): every one the Deployment sets
    is one, and Kubernetes adds none of its own (a Service named `intent` would set INTENT_PORT=tcp://...)."""
    from app.config import Settings

    spec = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["spec"]
    assert spec["enableServiceLinks"] is False
    known = {f"INTENT_{name.upper()}" for name in Settings.model_fields}
    assert [name for name in deployment_env() if name.startswith("INTENT_") and name not in known] == []
