"""`python -m app` as a process: each of several workers logs as the README says (JSON, at INTENT_LOG_LEVEL), and
a SIGTERM ends it cleanly at any point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from loadtest.procs import children
from loadtest.server import stop
from tests.conftest import ROOT
from tests.servers import SERVE_PYTHON, free_port, post, running_server


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


@pytest.mark.integration
def test_one_worker_stopped_by_sigterm_exits_0_and_leaves_no_temporary_directory(tmp_path: Path) -> None:
    """uvicorn's one server raises the SIGTERM again after its drained shutdown: the default handler had ended the
    process there (exit -15), before `python -m app` removed the pointer directory it made, on every stop."""
    env = {"INTENT_ADMIN_KEY": "k", "TMPDIR": str(tmp_path)}
    with running_server(env=env) as (_, proc):
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("intent-model-")] != []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("intent-")] == []


@pytest.mark.integration
def test_a_sigterm_while_the_model_is_checked_leaves_no_process_behind(tmp_path: Path) -> None:
    """The check runs in a child process before the port is bound: a SIGTERM then had ended the parent alone. Now
    it waits for the check to end, and nothing starts."""
    proc = subprocess.Popen(
        [str(SERVE_PYTHON), "-m", "app"],
        cwd=ROOT,
        env={**os.environ, "INTENT_PORT": str(free_port()), "INTENT_WORKERS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not (checking := children(proc.pid)):  # the check's child process has started
            assert proc.poll() is None, "it ended before its check began"
            assert time.monotonic() < deadline, "no check was seen"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0
        # Ended at once, mid-spawn, the check's child had failed with tracebacks of its own; now the check ends first.
        assert err == b""
    finally:
        stop(proc, grace_s=5)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in checking):
        assert time.monotonic() < deadline, f"left running: {checking}"
        time.sleep(0.05)
