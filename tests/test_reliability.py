"""Reliability under real uvicorn: graceful shutdown under load, overload (scaled down), and a short soak."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from loadtest import soak, stress
from loadtest.driver import closed_loop
from loadtest.queries import BUILTIN
from tests.servers import get, running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sigterm_drains_without_losing_accepted_requests() -> None:
    with running_server(env={"INTENT_SHUTDOWN_DELAY_S": "1.0", "INTENT_WORKERS": "1"}) as (base, proc):

        async def scenario() -> tuple:
            stop = asyncio.Event()
            # One connection per request, so a refused connection means "not accepted", never "lost".
            load = asyncio.create_task(closed_loop(base, 8, list(BUILTIN), connections=8, close_each=True, stop=stop))
            await asyncio.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            t0 = time.perf_counter()
            ready_status = None
            while time.perf_counter() - t0 < 0.5:
                status = await asyncio.to_thread(lambda: get(base + "/ready", 1.0)[0])
                if status == 503:
                    ready_status = (status, time.perf_counter() - t0)
                    break
            served_during_delay = await asyncio.to_thread(lambda: get(base + "/health", 1.0)[0])
            await asyncio.sleep(3.0)
            stop.set()
            return await load, ready_status, served_during_delay

        report, ready, health_during_delay = asyncio.run(scenario())
        proc.wait(20)
    answers = report.classes()
    assert ready is not None
    print(f"\nSIGTERM under load: answers {answers}, /ready 503 after {ready[1] * 1000:.0f} ms")
    assert ready[0] == 503
    assert health_during_delay == 200  # still serving while load balancers catch up
    assert report.lost == 0
    assert set(answers) <= {"200", "refused"}
    assert answers["200"] > 100
    assert answers.get("refused", 0) > 0  # listeners did close after the drain
    assert proc.returncode == 0


def test_overload_scaled_down() -> None:
    result = stress.run(seconds=6, factor=3.0, workers=1, max_queue=16, cpus=None)
    print(f"\noverload: {result}")
    assert result["checks"]["only_200_429_503"], result["answers"]
    assert result["checks"]["shed_has_retry_after"]
    assert result["answers"].get("429", 0) > 0  # the queue did fill: load really exceeded capacity
    assert result["checks"]["accepted_p99_within_bound"], result["accepted_latency_ms"]
    assert result["checks"]["memory_flat"], result["rss_mb"]
    assert result["checks"]["recovered"], (result["before_ms"], result["after_ms"])


def test_short_soak() -> None:
    result = soak.run(seconds=20, rate=100, workers=1, warmup_s=5, sample_every=0.5)
    print(f"\nsoak: requests {result['requests']}, errors {result['errors']}, RSS growth {result['rss_growth']:.2%}")
    assert result["errors"] == 0
    assert result["requests"] == 2000
    assert result["rss_growth"] <= 0.10
