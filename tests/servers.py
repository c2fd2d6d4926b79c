"""Start the real service (python -m app under uvicorn) on a free loopback port, for integration tests."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from loadtest.server import free_port, stop
from tests.conftest import ROOT

__all__ = ["free_port", "get", "post", "running_server"]

SERVE_PYTHON = ROOT / ".venv-serve" / "bin" / "python"


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str, payload: object, timeout: float = 5.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextmanager
def running_server(
    python: Path = SERVE_PYTHON,
    env: dict[str, str] | None = None,
    startup_timeout: float = 60.0,
    preexec: Callable[[], None] | None = None,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`preexec` runs in the child before `python -m app` starts (to lower a resource limit, say)."""
    port = free_port()
    # The caller's env may name a metrics directory; the test runner's own environment may not.
    inherited = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    full_env = {
        **inherited,
        "INTENT_HOST": "127.0.0.1",
        "INTENT_PORT": str(port),
        "INTENT_WORKERS": "1",
        "INTENT_SHUTDOWN_DELAY_S": "0.5",
        **(env or {}),
    }
    proc = subprocess.Popen(
        [str(python), "-m", "app"],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=preexec,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            try:
                if get(base + "/ready", 0.5)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("server did not become ready")
        yield base, proc
    finally:
        stop(proc, grace_s=20)
        if proc.stderr:
            proc.stderr.close()
