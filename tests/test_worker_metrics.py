"""/metrics with several workers: the multiprocess files, read while a worker is still creating its own, and after
workers are gone."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import values

from app.http.metrics import Metrics
from tests.servers import get, running_server


def test_a_worker_file_not_yet_sized_leaves_the_scrape_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker creates each .db file empty and sizes it a moment later (prometheus/client_python#1199); a scrape
    in that moment, or after a worker died in it, must still report every other worker's counts."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    worker = values.MultiProcessValue(lambda: 101)
    try:
        for route, method, count in (("/predict", "POST", 3), ("/ready", "GET", 1)):
            names = ("route", "method", "status"), (route, method, "200")
            worker("counter", "intent_requests", "intent_requests_total", *names, "HTTP requests").inc(count)
        (tmp_path / "counter_102.db").touch()  # a second worker's file, created and not yet sized
        (tmp_path / "histogram_102.db").touch()
        text = Metrics().exposition().decode()
    finally:
        values.close_all_multiprocess_files()
    lines = {line for line in text.splitlines() if line.startswith("intent_requests_total")}
    assert lines == {
        'intent_requests_total{method="POST",route="/predict",status="200"} 3.0',
        'intent_requests_total{method="GET",route="/ready",status="200"} 1.0',
    }


def gone_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_gone_workers_gauges_do_not_count_and_its_counts_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn replaces a worker that died, and on SIGHUP every worker: the gauges say what the live workers do
    now, while counters keep every request ever answered."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    dead, live = gone_pid(), os.getpid()
    old, new = ("2026.01.01-old", "m", "energy_knn"), ("2026.02.02-new", "m", "energy_knn")
    info = ("version", "name", "oos_rule")
    try:
        for pid, ready, served, in_flight, answered in ((dead, 0, old, 3, 5), (live, 1, new, 0, 2)):
            worker = values.MultiProcessValue(lambda pid=pid: pid)
            worker("gauge", "intent_ready", "intent_ready", (), (), "", multiprocess_mode="livemin").set(ready)
            worker(
                "gauge", "intent_model_info", "intent_model_info", info, served, "", multiprocess_mode="livemax"
            ).set(1)
            in_flight_gauge = worker(
                "gauge",
                "intent_in_flight_requests",
                "intent_in_flight_requests",
                (),
                (),
                "",
                multiprocess_mode="livesum",
            )
            in_flight_gauge.set(in_flight)
            names = ("route", "method", "status"), ("/predict", "POST", "200")
            worker("counter", "intent_requests", "intent_requests_total", *names, "").inc(answered)
        text = Metrics().exposition().decode()
    finally:
        values.close_all_multiprocess_files()
    lines = {line for line in text.splitlines() if line.startswith(("intent_ready", "intent_model_info", "intent_in"))}
    assert lines == {
        "intent_ready 1.0",
        'intent_model_info{name="m",oos_rule="energy_knn",version="2026.02.02-new"} 1.0',
        "intent_in_flight_requests 0.0",
    }
    assert 'intent_requests_total{method="POST",route="/predict",status="200"} 7.0' in text.splitlines()
    # The gone worker's gauge files are removed, as prometheus_client's mark_process_dead does; its counter stays.
    assert sorted(p.name for p in tmp_path.glob(f"*_{dead}.db")) == [f"counter_{dead}.db"]


@pytest.mark.integration
@pytest.mark.slow
def test_after_sighup_replaces_every_worker_the_service_reads_ready() -> None:
    """SIGHUP makes uvicorn start a new worker for each one and then stop the old one, whose last act sets its
    intent_ready to 0. The alert on min(intent_ready) == 0 must not fire for workers that are gone."""
    with running_server(env={"INTENT_WORKERS": "2"}) as (base, proc):
        before = workers(proc.pid)
        assert len(before) == 2
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120  # only catches a restart that never ends
        while set(workers(proc.pid)) & set(before) or len(workers(proc.pid)) != 2:
            assert time.monotonic() < deadline, "uvicorn did not replace the workers"
            time.sleep(0.2)
        assert get(base + "/ready")[0] == 200
        for _ in range(10):  # fresh connections: either worker may answer the scrape
            status, body = get(base + "/metrics")
            assert status == 200
            ready = [line for line in body.decode().splitlines() if line.startswith("intent_ready")]
            assert ready == ["intent_ready 1.0"]


def workers(supervisor: int) -> list[int]:
    """The supervisor's worker processes (multiprocessing's resource tracker is not one)."""
    kids = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(k) for k in kids if "resource_tracker" not in Path(f"/proc/{k}/cmdline").read_text()]


def test_a_gone_workers_gauge_removed_by_another_scrape_first_leaves_this_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers can scrape at once, and both find the same gone worker's file; the second removal fails."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    dead = gone_pid()
    try:
        worker = values.MultiProcessValue(lambda: dead)
        worker("gauge", "intent_ready", "intent_ready", (), (), "", multiprocess_mode="livemin").set(0)
        live = values.MultiProcessValue(lambda: os.getpid())
        live("gauge", "intent_ready", "intent_ready", (), (), "", multiprocess_mode="livemin").set(1)

        def already_gone(path: str) -> None:
            raise FileNotFoundError(path)

        monkeypatch.setattr("app.http.metrics.os.remove", already_gone)
        text = Metrics().exposition().decode()
    finally:
        values.close_all_multiprocess_files()
    assert [line for line in text.splitlines() if line.startswith("intent_ready")] == ["intent_ready 1.0"]
