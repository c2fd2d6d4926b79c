"""Start a server under test on loopback, pinned to a CPU set, and stop it cleanly."""

from __future__ import annotations

import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = ("127.0.0.1", "localhost", "::1")


EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_handed_out: set[int] = set()


def ephemeral_ports(path: Path = EPHEMERAL_RANGE) -> range:
    """The ports the kernel picks the local end of outgoing connections from (Linux's default if unreadable)."""
    try:
        low, high = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A loopback port nothing listens on, outside the ephemeral range, and not handed out before by this
    process. A port from the ephemeral range (what binding port 0 gives) can become the local end of some
    outgoing connection before the server binds it, or while a killed server starts again on it: HAProxy then
    fails with 'Address already in use'."""
    ephemeral = ephemeral_ports()
    below, above = range(10000, ephemeral.start), range(ephemeral.stop, 65536)
    pool = below if len(below) >= len(above) else above
    if len(pool) < 1000:  # a kernel that hands out nearly every port: let it pick
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    rng = random.Random()
    for _ in range(1000):
        port = rng.choice(pool)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use, or still held by an earlier run's connections
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {pool.start}-{pool.stop - 1}")


def pinned(cmd: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if cpus and shutil.which("taskset") else cmd


class ServerExited(RuntimeError):
    """The server this machine started exited before it was ready."""


def log_tail(log: Path | None, lines: int = 3) -> str:
    """The last `lines` non-empty lines of a server's log, joined by " | ", or "" where there is none."""
    try:
        text = log.read_text(encoding="utf-8", errors="replace") if log is not None else ""
    except OSError:
        return ""
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])


def wait_ready(
    base: str, proc: subprocess.Popen[bytes] | None, path: str, timeout: float, log: Path | None = None
) -> None:
    """Until `base + path` answers 200; `proc`, the server's process where this machine started it, and `log`, where
    its stderr goes: a server that exits says why (a setting it refuses) in the error, which had said only "server
    exited with 2"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_tail(log)
            raise ServerExited(f"server exited with {proc.returncode}" + (f": {tail}" if tail else ""))
        try:
            with urllib.request.urlopen(base + path, timeout=1) as r:  # noqa: S310 - loopback
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {base} not ready after {timeout:.0f}s")


def ready_problem(base: str, within_s: float = 3.0, timeout_s: float = 1.0) -> str | None:
    """Why the service at `base` does not answer GET /ready with 200 (tried for about `within_s`), or None: a target
    that was down had been measured as errors alone, a run with rc 0, or waited for two minutes."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            with urllib.request.urlopen(base + "/ready", timeout=timeout_s) as r:  # noqa: S310 - the URL the user gave
                if r.status == 200:
                    return None
                problem = f"/ready answered {r.status}"
        except urllib.error.HTTPError as exc:
            problem = f"/ready answered {exc.code}"
        except urllib.error.URLError as exc:
            problem = str(exc.reason)
        except http.client.HTTPException as exc:  # something that does not speak HTTP
            problem = f"not an HTTP answer ({type(exc).__name__}: {str(exc).strip()})"
        except (OSError, ValueError) as exc:
            problem = str(exc) or type(exc).__name__
        if time.monotonic() + 0.2 >= deadline:
            return problem
        time.sleep(0.2)


def stop(proc: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    """SIGTERM, so the server drains; SIGKILL only if it has not exited after `grace_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serve(
    cmd: list[str],
    env: dict[str, str],
    port: int,
    cpus: str | None,
    ready_path: str = "/ready",
    timeout: float = 120.0,
    log: Path | None = None,
) -> Iterator[str]:
    base = f"http://127.0.0.1:{port}"
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(pinned(cmd, cpus), cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=out)
    try:
        wait_ready(base, proc, ready_path, timeout, log)
        yield base
    finally:
        stop(proc)
        if log:
            out.close()  # type: ignore[union-attr]


def our_server(port: int, workers: int, python: Path | None = None) -> tuple[list[str], dict[str, str]]:
    py = python or ROOT / ".venv-serve" / "bin" / "python"
    env = {
        "INTENT_HOST": "127.0.0.1",
        "INTENT_PORT": str(port),
        "INTENT_WORKERS": str(workers),
        "INTENT_ORT_INTRA_THREADS": "1",
        "INTENT_LOG_LEVEL": "warning",
        "INTENT_SHUTDOWN_DELAY_S": "0",
    }
    return [str(py), "-m", "app"], env


def floor_server(port: int, workers: int, python: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """Ours with a model that does no work (loadtest.floor): the same interpreter, settings and placement."""
    cmd, env = our_server(port, workers, python)
    return [cmd[0], "-m", "loadtest.floor"], env
