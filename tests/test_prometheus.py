"""A real Prometheus (Debian's package) scrapes the service on loopback and is queried over its API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from app.http.metrics import REQUEST_BUCKETS
from tests.conftest import ROOT
from tests.servers import free_port, get, post, running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CACHE = ROOT / ".cache" / "prometheus"


def _install() -> Path:
    """Debian's prometheus package, unpacked (not installed: no service scripts run) into .cache/."""
    binary = CACHE / "usr" / "bin" / "prometheus"
    if binary.exists():
        return binary.parent
    found = shutil.which("prometheus")
    if found and shutil.which("promtool"):
        return Path(found).parent
    CACHE.mkdir(parents=True, exist_ok=True)
    download = ["apt-get", "download", "prometheus"]
    if subprocess.run(download, cwd=CACHE, capture_output=True, check=False, timeout=300).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=True, timeout=300)
        subprocess.run(download, cwd=CACHE, capture_output=True, check=True, timeout=300)
    deb = next(CACHE.glob("prometheus_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(CACHE)], check=True, timeout=120)
    return binary.parent


@pytest.fixture(scope="module")
def prom_bin() -> Path:
    return _install()


def query(prom: str, expr: str) -> list[dict]:
    status, body = get(f"{prom}/api/v1/query?query={urllib.parse.quote(expr)}", 5)
    assert status == 200
    data = json.loads(body)
    assert data["status"] == "success"
    return data["data"]["result"]


def promtool(prom_bin: Path, *args: str) -> str:
    """promtool's output; it must exit 0."""
    r = subprocess.run([str(prom_bin / "promtool"), *args], capture_output=True, text=True, check=False, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_alert_rules_are_valid(prom_bin: Path) -> None:
    assert "SUCCESS: 6 rules found" in promtool(prom_bin, "check", "rules", str(ROOT / "deploy/prometheus/alerts.yml"))


def test_the_memory_alert_fires_for_a_leak_and_not_for_a_hot_reload(prom_bin: Path) -> None:
    """promtool's own rule tests (deploy/prometheus/alerts_test.yml): a worker growing 30 MB an hour, beside a
    steady one, fires IntentWorkerMemoryGrowing after its hour pending; a one-time step up does not."""
    assert "SUCCESS" in promtool(prom_bin, "test", "rules", str(ROOT / "deploy/prometheus/alerts_test.yml"))


def test_the_service_alerts_count_clients_requests_and_a_service_that_is_down(prom_bin: Path) -> None:
    """deploy/prometheus/alerts_errors_test.yml: IntentErrorRatio stays quiet through a rolling update of a quiet
    service (its draining pods answer /ready 503) and fires for 3% of predictions failing beside frequent health
    checks; IntentDown fires when no replica serves /metrics at all."""
    assert "SUCCESS" in promtool(prom_bin, "test", "rules", str(ROOT / "deploy/prometheus/alerts_errors_test.yml"))


def test_prometheus_scrapes_and_queries(prom_bin: Path, tmp_path: Path) -> None:
    with running_server() as (base, _):
        target = base.removeprefix("http://")
        prom_port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n  - job_name: intent\n    static_configs:\n      - targets: ['{target}']\n"
        )
        prom = subprocess.Popen(
            [
                str(prom_bin / "prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{prom_port}"
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if query(url, 'up{job="intent"}') and query(url, 'up{job="intent"}')[0]["value"][1] == "1":
                        break
                except (OSError, AssertionError):
                    pass
                time.sleep(0.5)
            else:
                pytest.fail("Prometheus never scraped the service")
            sent = 60
            for i in range(sent):
                assert post(base + "/predict", {"text": f"what is my balance {i}"})[0] == 200
            expr = 'sum(intent_requests_total{route="/predict",status="200"})'
            value = None
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                result = query(url, expr)
                value = float(result[0]["value"][1]) if result else None
                if value == sent:
                    break
                time.sleep(0.5)
            assert value == sent
            # Cumulative buckets since start: needs one scrape, where rate() would need two in its window.
            p99_expr = (
                'histogram_quantile(0.99, sum by (le) (intent_request_duration_seconds_bucket{route="/predict"}))'
            )
            stage_expr = "histogram_quantile(0.5, sum by (le, stage) (intent_stage_duration_seconds_bucket))"
            p99 = query(url, p99_expr)
            seconds = float(p99[0]["value"][1])
            print(f"\nPrometheus: {value:.0f} requests counted, server p99 {seconds * 1000:.2f} ms")
            # A finite quantile from the service's buckets (histogram_quantile caps it at the highest finite
            # bucket), not a latency bar: one slow request on a loaded machine must not fail this test.
            assert 0 < seconds <= REQUEST_BUCKETS[-1]
            stage = query(url, stage_expr)
            assert {r["metric"]["stage"] for r in stage} == {"tokenize", "queue", "inference"}
            # The worker's own memory and CPU, which the IntentWorkerMemoryGrowing alert reads.
            (resident,) = query(url, "intent_worker_resident_bytes")
            assert float(resident["value"][1]) > 50e6  # a worker with the served model loaded
            (cpu,) = query(url, "sum(intent_worker_cpu_seconds_total)")
            assert float(cpu["value"][1]) > 0
        finally:
            prom.terminate()
            prom.wait(20)
