"""Locust users for the intent service.

Environment:
  LOADTEST_MODE     open (fixed arrival rate, default) or closed (as fast as possible, for saturation)
  LOADTEST_RATE     requests/s for the open loop, spread over all users
  LOADTEST_BATCH_SHARE  share of requests sent to /predict/batch (default 0)
  LOADTEST_OUT      where summary.json goes
  LOADTEST_DATA     CLINC150 JSON whose validation texts are sent (built-in examples otherwise)

Every response time is recorded from the request hook, so percentiles are exact, not Locust's
rounded ones; the p99 comes with a 95% interval (loadtest.stats.quantile_interval). In open mode the
latency is also measured from each request's *scheduled* send time, which counts the waiting that a
closed loop hides (coordinated omission).
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.parse
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, events, task
from locust.env import Environment

from app.cpu import current
from loadtest import connections
from loadtest.queries import load_queries
from loadtest.stats import histogram_quantile, percentiles_ms, quantile_interval, scrape_buckets

MODE = os.environ.get("LOADTEST_MODE", "open")
RATE = float(os.environ.get("LOADTEST_RATE", "100"))
BATCH_SHARE = float(os.environ.get("LOADTEST_BATCH_SHARE", "0"))
OUT = Path(os.environ.get("LOADTEST_OUT", "reports/loadtest"))
QUERIES = load_queries()

_times: dict[str, list[float]] = {"/predict": [], "/predict/batch": []}
_scheduled: list[float] = []
_errors: dict[str, int] = {}
_state: dict[str, Any] = {}
# How long after the last user started to read how the connections fell on the server's processes: by then every
# user has sent its first request, and so holds its keep-alive connection.
SETTLE_S = 0.5


@events.request.add_listener
def _record(name: str, response_time: float, exception: BaseException | None, **_: Any) -> None:
    if exception is None and name in _times:
        _times[name].append(response_time)
    elif exception is not None:
        key = f"{name}: {type(exception).__name__}: {str(exception)[:80]}"
        _errors[key] = _errors.get(key, 0) + 1


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    _state["started"] = time.perf_counter()
    _state["cpu_started"] = time.process_time()
    host = environment.host or ""
    _state["port"] = urllib.parse.urlsplit(host).port
    try:
        _state["labels"] = set(json.loads(_get(host + "/model"))["labels"])
        _state["buckets"] = scrape_buckets(host)
    except OSError:
        _state["labels"] = None
        _state["buckets"] = {}


@events.spawning_complete.add_listener
def _spawned(**_: Any) -> None:
    gevent.spawn_later(SETTLE_S, _read_connections)


def _read_connections() -> None:
    """Each server process holding any of the users' connections: how many, largest first (loadtest.connections).
    Read on this machine: this suite targets loopback only."""
    if _state.get("port"):
        _state["connections"] = connections.split(_state["port"])


def _get(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback target
        data: bytes = r.read()
        return data


@events.test_stop.add_listener
def _stop(environment: Environment, **_: Any) -> None:
    elapsed = time.perf_counter() - _state.get("started", time.perf_counter())
    cpu_s = time.process_time() - _state.get("cpu_started", time.process_time())
    host = environment.host or ""
    server: dict[str, float | None] = {"p50": None, "p99": None}
    try:
        after = scrape_buckets(host)
        for key, q in (("p50", 0.5), ("p99", 0.99)):
            v = histogram_quantile(q, _state.get("buckets", {}), after)
            server[key] = None if v is None else round(v * 1000, 4)
    except OSError:
        pass
    single = _times["/predict"]
    requests = len(single) + len(_times["/predict/batch"])
    summary = {
        "cpu": current().describe(),
        "mode": MODE,
        "target_rate": RATE if MODE == "open" else None,
        "users": int(os.environ.get("LOADTEST_USERS", "0")),
        "duration_s": round(elapsed, 2),
        "requests": requests,
        "errors": sum(_errors.values()),
        "error_kinds": _errors,
        "throughput_rps": round(requests / elapsed, 1) if elapsed else None,
        "latency_ms": percentiles_ms(single),
        "latency_p99_interval_ms": quantile_interval(single, 0.99),
        "latency_from_schedule_ms": percentiles_ms(_scheduled) if MODE == "open" else None,
        "batch_latency_ms": percentiles_ms(_times["/predict/batch"]),
        "server_latency_ms": server,
        "connections_by_process": _state.get("connections"),
        # What the load generator itself used while it measured (one process, so this is all of it). Where it
        # shares the server's cores (the throughput phase), this is CPU the server did not get.
        "load_generator": {
            "cpu_s": round(cpu_s, 3),
            "cores": round(cpu_s / elapsed, 3) if elapsed else None,
            "cpu_us_per_request": round(cpu_s / requests * 1e6, 1) if requests else None,
        },
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


class IntentUser(FastHttpUser):
    """Closed loop by default; in open mode each user keeps its own fixed schedule."""

    def on_start(self) -> None:
        self.rng = random.Random(id(self))
        users = max(1, int(os.environ.get("LOADTEST_USERS", "1")))
        self.interval = users / RATE if MODE == "open" else 0.0
        self.next_at = time.perf_counter() + self.rng.random() * self.interval

    def wait_time(self) -> float:
        return 0.0

    @task
    def classify(self) -> None:
        scheduled = None
        if MODE == "open":
            delay = self.next_at - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            scheduled = self.next_at
            self.next_at += self.interval
        if BATCH_SHARE and self.rng.random() < BATCH_SHARE:
            self._batch()
        else:
            self._single()
        if scheduled is not None:
            _scheduled.append((time.perf_counter() - scheduled) * 1000)

    def _check(self, intent: object) -> bool:
        labels = _state.get("labels")
        return isinstance(intent, str) and (labels is None or intent in labels)

    def _single(self) -> None:
        text = self.rng.choice(QUERIES)
        with self.client.post("/predict", json={"text": text}, name="/predict", catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"status {r.status_code}")
            elif not self._check((r.json() or {}).get("intent")):
                r.failure("malformed intent")
            else:
                r.success()

    def _batch(self) -> None:
        texts = self.rng.sample(QUERIES, 8)
        with self.client.post("/predict/batch", json={"texts": texts}, name="/predict/batch", catch_response=True) as r:
            preds = (r.json() or {}).get("predictions") if r.status_code == 200 else None
            if r.status_code != 200:
                r.failure(f"status {r.status_code}")
            elif not isinstance(preds, list) or len(preds) != 8 or not all(self._check(p.get("intent")) for p in preds):
                r.failure("malformed predictions")
            else:
                r.success()
