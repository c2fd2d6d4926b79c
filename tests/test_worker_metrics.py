"""/metrics with several workers: the multiprocess files, read while a worker is still creating its own, and after
workers are gone."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import values

from app.config import Settings
from app.http.main import create_app, create_app_from_env
from app.http.metrics import Metrics
from loadtest.procs import cpu_seconds, rss_mb
from tests.fakes import FakeClassifier, fake_factory
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


def test_the_model_info_shows_the_versions_live_workers_serve_and_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload sets the replaced version's series to 0; in multiprocess mode the series cannot be removed, so every
    version a worker had served read 0 beside the one it serves. During a rollout both versions read 1."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    old, new = ("2026.01.01-old", "m", "energy_knn"), ("2026.02.02-new", "m", "energy_knn")
    labels = ("version", "name", "oos_rule")
    series = {}
    try:
        for pid in (os.getpid(), os.getppid()):  # two live workers
            worker = values.MultiProcessValue(lambda pid=pid: pid)
            for served in (old, new):
                series[pid, served] = worker(
                    "gauge", "intent_model_info", "intent_model_info", labels, served, "", multiprocess_mode="livemax"
                )
        series[os.getpid(), new].set(1)  # this one has reloaded, the other not yet
        series[os.getppid(), old].set(1)
        during = Metrics().exposition().decode()
        series[os.getppid(), old].set(0)
        series[os.getppid(), new].set(1)
        after = Metrics().exposition().decode()
    finally:
        values.close_all_multiprocess_files()

    def info(text: str) -> set[str]:
        return {line for line in text.splitlines() if line.startswith("intent_model_info")}

    line = 'intent_model_info{{name="m",oos_rule="energy_knn",version="{}"}} 1.0'
    assert info(during) == {line.format("2026.01.01-old"), line.format("2026.02.02-new")}
    assert info(after) == {line.format("2026.02.02-new")}
    assert "# TYPE intent_model_info gauge" in after


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


def test_a_worker_under_a_dead_workers_pid_starts_its_gauges_from_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel reuses pids: a worker started under a dead one's opened its gauge files, and counted its
    requests in flight up and down from the dead worker's 3, which /metrics then reported with none in flight."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv("INTENT_WORKERS", "2")
    try:
        dead = values.MultiProcessValue(lambda: os.getpid())  # the dead worker, as its files say
        dead(
            "gauge", "intent_in_flight_requests", "intent_in_flight_requests", (), (), "", multiprocess_mode="livesum"
        ).set(3)
        names = ("route", "method", "status"), ("/predict", "POST", "200")
        dead("counter", "intent_requests", "intent_requests_total", *names, "").inc(5)
        values.close_all_multiprocess_files()  # which also forgets every value class made so far: make it after
        # As in a worker, whose prometheus_client is imported with PROMETHEUS_MULTIPROC_DIR set: values go to files.
        monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
        app = create_app_from_env()
        text = app.state.metrics.exposition().decode()
    finally:
        values.close_all_multiprocess_files()
    assert "intent_in_flight_requests 0.0" in text.splitlines()
    # Its counts stay: totals never fall.
    assert 'intent_requests_total{method="POST",route="/predict",status="200"} 5.0' in text.splitlines()


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


def _samples(text: str, name: str) -> dict[str, float]:
    """`name`'s samples in an exposition, by their label set as written (`{pid="12"}`, or "" for none)."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, _, value = line.rpartition(" ")
            out[series[len(name) :]] = float(value)
    return out


def test_a_sample_writes_this_workers_resident_memory_and_the_cpu_time_it_used() -> None:
    metrics = Metrics()
    before = resource.getrusage(resource.RUSAGE_SELF)
    metrics.sample_worker()
    after = resource.getrusage(resource.RUSAGE_SELF)
    # This process alone (rss_mb would add the test runner's children, if any).
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    text = metrics.exposition().decode()
    (resident,) = _samples(text, "intent_worker_resident_bytes").values()
    assert 0.8 * rss <= resident <= 1.25 * rss  # the same process a moment apart
    (cpu,) = _samples(text, "intent_worker_cpu_seconds_total").values()
    assert before.ru_utime + before.ru_stime <= cpu <= after.ru_utime + after.ru_stime
    sum(i * i for i in range(200_000))  # some CPU time between two samples
    metrics.sample_worker()
    (later,) = _samples(metrics.exposition().decode(), "intent_worker_cpu_seconds_total").values()
    now = resource.getrusage(resource.RUSAGE_SELF)
    assert cpu < later <= now.ru_utime + now.ru_stime  # counted once, never twice


def test_a_service_reports_its_resident_memory_and_cpu_from_the_lifespan() -> None:
    with TestClient(create_app(Settings(warmup_queries=0), fake_factory(FakeClassifier()))) as client:
        text = client.get("/metrics").text
    assert set(_samples(text, "intent_worker_resident_bytes")) == {""}  # one process: no pid label
    assert _samples(text, "intent_worker_cpu_seconds_total")[""] > 0


@pytest.mark.integration
def test_each_worker_of_a_running_service_reports_its_own_resident_memory() -> None:
    """Each worker's series is its own process's memory, as /proc reads it. /ready answers once one worker serves;
    the other may still be loading the model, and shows the memory it sampled before the load until its lifespan
    samples again. So the scrape is read again until every series is near its worker's memory now, or a minute
    passes (a busy machine only makes it slower)."""
    with running_server(env={"INTENT_WORKERS": "2"}) as (base, proc):
        pids = workers(proc.pid)
        deadline = time.monotonic() + 60
        while True:
            status, body = get(base + "/metrics")
            assert status == 200
            resident = _samples(body.decode(), "intent_worker_resident_bytes")
            cpu = _samples(body.decode(), "intent_worker_cpu_seconds_total")[""]
            now = {f'{{pid="{pid}"}}': rss_mb(pid) * 2**20 for pid in pids}
            used = sum(sum(cpu_seconds(pid).values()) for pid in pids)  # after the scrape, which read it before
            near = set(resident) == set(now) and all(0.8 * now[s] <= resident[s] <= 1.25 * now[s] for s in now)
            if near or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert set(resident) == set(now)
    for series, rss in now.items():
        assert 0.8 * rss <= resident[series] <= 1.25 * rss, (series, resident, now)
    assert 0 < cpu <= used + 0.05  # /proc counts in clock ticks of 10 ms
