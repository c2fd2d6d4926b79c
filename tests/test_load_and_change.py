"""The service under load and change: a burst past the queue's limit in two workers, with a reload in the middle.
Every request gets one answer (200, or 429 with Retry-After), each 200 names the model that answered it, and the
gauges read 0 once the burst is over."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from pathlib import Path

import pytest

from app.http.metrics import Metrics
from tests.servers import get, running_server
from tests.test_reload import AUTH, KEY, new_version

TEXTS = ["what is my account balance", "book a flight to rome", "tell me a joke", "set an alarm for six"]


def call(url: str, payload: object, headers: dict[str, str] | None = None) -> tuple[int, Message, dict]:
    req = urllib.request.Request(
        url, json.dumps(payload).encode(), {"content-type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def sample(metrics: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE)
    assert found, name
    return float(found.group(1))


@pytest.mark.integration
@pytest.mark.slow
def test_a_burst_past_the_queue_with_a_reload_in_two_workers_answers_every_request_once(tmp_path: Path) -> None:
    target = new_version(tmp_path)
    env = {"INTENT_WORKERS": "2", "INTENT_ADMIN_KEY": KEY, "INTENT_MAX_QUEUE": "8", "INTENT_MAX_BATCH": "8"}
    with running_server(env=env) as (base, _):
        old = json.loads(get(base + "/model")[1])["version"]
        batch = {"texts": TEXTS}
        with ThreadPoolExecutor(16) as pool:
            burst = [pool.submit(call, base + "/predict/batch", batch) for _ in range(40)]
            reloaded = pool.submit(call, base + "/admin/reload", {"model_dir": str(target)}, AUTH)
            burst += [pool.submit(call, base + "/predict/batch", batch) for _ in range(40)]
            assert reloaded.result()[0] == 200
            burst += [pool.submit(call, base + "/predict/batch", batch) for _ in range(40)]
            answers = [f.result() for f in burst]
        for status, headers, body in answers:
            if status == 429:
                assert (headers["Retry-After"], body["error"]["type"]) == ("1", "overloaded")
            else:
                assert status == 200, body
                assert body["model_version"] in (old, "2026.12.01-rollout")
                assert len(body["predictions"]) == len(TEXTS)
        deadline = time.monotonic() + 60  # only catches a gauge that never comes back
        while True:
            metrics = get(base + "/metrics")[1].decode()
            if sample(metrics, "intent_in_flight_requests") == 0.0:
                break
            assert time.monotonic() < deadline, "in-flight requests never returned to 0"
            time.sleep(0.05)
        answered = sum(
            float(n)
            for n in re.findall(r'^intent_requests_total\{[^}]*route="/predict/batch"[^}]*\} (\S+)$', metrics, re.M)
        )
        assert answered == len(answers)
        assert sample(metrics, 'intent_rejected_total{reason="overloaded"}') == sum(a[0] == 429 for a in answers)


def test_tokenize_times_of_20_to_50_us_land_in_buckets_of_their_own() -> None:
    """Tokenizing a text takes 20-50 us: all of it had fallen in the lowest bucket (50 us), so every quantile of
    the stage was an interpolation inside it (25 us at the median, whatever the real times were)."""
    metrics = Metrics()
    for seconds in (1.5e-5, 2.5e-5, 3.5e-5, 4.5e-5):
        metrics.tokenize.observe(seconds)
    (family,) = [f for f in metrics.registry.collect() if f.name == "intent_stage_duration_seconds"]
    cumulative = [s.value for s in family.samples if s.name.endswith("_bucket") and s.labels["stage"] == "tokenize"]
    assert sorted(set(cumulative)) == [0.0, 1.0, 2.0, 3.0, 4.0]
