"""`python -m app` with several workers: each worker logs as the README says (JSON, at INTENT_LOG_LEVEL)."""

from __future__ import annotations

import json
import signal

import pytest

from tests.servers import post, running_server


@pytest.mark.integration
def test_every_worker_logs_json_at_the_configured_level() -> None:
    """uvicorn spawns the workers, which `python -m app`'s logging set-up never reached: their records had come out
    as bare text, and below WARNING not at all (no `ready`, no per-request line at `debug`)."""
    with running_server(env={"INTENT_WORKERS": "2", "INTENT_LOG_LEVEL": "debug"}) as (base, proc):
        for i in range(4):
            status, body = post(base + "/predict", {"text": f"what is my balance {i}"})
            assert status == 200, body
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    records = [json.loads(line) for line in err.decode().splitlines() if line.strip()]  # every line is JSON
    messages = [r["msg"] for r in records]
    assert messages.count("ready") == 2  # each worker's, at info
    assert messages.count("stopped") == 2
    requests = [r for r in records if r["logger"] == "app.access" and r["msg"] == "request"]  # debug lines
    assert [(r["route"], r["status"]) for r in requests if r["route"] == "/predict"] == [("/predict", 200)] * 4
