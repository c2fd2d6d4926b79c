"""/metrics with several workers: the multiprocess files, read while a worker is still creating its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import values

from app.http.metrics import Metrics


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
