"""`make scaleout`: N replicas of the service behind a real HAProxy (Debian's package) on loopback, under
open-loop load, with the balancer's config from deploy/haproxy/haproxy.cfg. The load is sized from the
machine: the closed-loop peak (single texts and batches of 16, a few seconds each) of one replica alone and of
the pool through the balancer, and both phases offer `--load-share` (half) of the replicas' summed capacity, or
of the pool's where that is less (replicas sharing cores). Two measurements:

- kill, `--kills` times (5): SIGKILL one replica mid-load (each in turn), at the first moment HAProxy shows
  requests in flight on it; how many requests failed (the bar: none, as the balancer sends the ones the
  dead replica did not answer to another), against how many were in flight on it when it died;
- rolling: SIGTERM each replica in turn, wait for it to exit, start it again and wait until HAProxy
  has it back in rotation; how many requests failed (the bar: none).

Writes reports/scaleout.json as {"replicas", "balancer", "capacity", "rate_rps", "kills": [{"requests",
"failed", "in_flight_on_killed", "killed", ...}, ...], "kill": (the kills summed), "rolling": {"requests",
"failed", "restarts"}, "passed"}; exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from app.config import effective_cpus
from loadtest import debian
from loadtest.cli_args import (
    MAX_RATE,
    MAX_SECONDS,
    MAX_WORKERS,
    at_most,
    path_arg,
    positive_float,
    positive_int,
    require_writable_dir,
)
from loadtest.driver import Report, closed_loop, open_loop
from loadtest.queries import BUILTIN
from loadtest.server import ROOT, ServerExited, free_port, log_tail, our_server, wait_ready

CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
# Long enough for HAProxy's /ready check (every 200 ms, one failure) to take a stopping replica out of
# rotation while it still answers; then its listeners close and it drains.
SHUTDOWN_DELAY_S = 1.0
# The kill phase's mix: single texts at the rate, plus batches of BATCH texts at a tenth of it (each takes a
# few ms, so the victim has requests in flight).
BATCH = 16
BATCH_SHARE = 0.1
MAX_KILLS = 1000


def render(template: str, frontend_port: int, replica_ports: list[int], stats_socket: Path) -> str:
    """The shipped config with this run's ports and socket: its `bind`, `server` and `stats socket` lines."""
    out: list[str] = []
    servers_written = False
    for line in template.splitlines():
        stripped = line.strip()
        indent = line[: len(line) - len(line.lstrip())]
        if stripped.startswith("stats socket "):
            line = re.sub(r"stats socket \S+", f"stats socket {stats_socket}", line)
        elif stripped.startswith("bind "):
            line = f"{indent}bind 127.0.0.1:{frontend_port}"
        elif stripped.startswith("server "):
            if servers_written:
                continue
            servers_written = True
            out.extend(f"{indent}server replica{i + 1} 127.0.0.1:{p}" for i, p in enumerate(replica_ports))
            continue
        out.append(line)
        if stripped in ("global", "defaults"):
            # A line per request on the balancer's stdout (the run's haproxy.log): retries and failures.
            out.extend(
                ["    log stdout format raw local0"]
                if stripped == "global"
                else ["    log global", "    option httplog"]
            )
    if not servers_written:
        raise ValueError("the HAProxy config has no server lines to replace")
    return "\n".join(out) + "\n"


# HAProxy's httplog line, from the backend/server on: timers, status, bytes, two cookies, the termination state,
# the connection counts ending in the retries (prefixed "+" when redispatched).
HTTPLOG = re.compile(
    r"\[(?P<accepted>\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\.\d{3})\] \S+"
    r" (?P<server>\S+/\S+) (?P<timers>\S+) (?P<status>-?\d+) \S+ \S+ \S+ (?P<state>\S{4})"
    r" \S+/\S+/\S+/\S+/(?P<retries>\+?\d+) "
)


def balancer_log(path: Path, since: datetime | None = None) -> dict[str, Any]:
    """What the balancer's own log says of the requests it accepted from `since` on (local time, as HAProxy
    logs it): how many, how many it retried, and every line of a request that did not end normally in a 200
    (status and termination state, e.g. "SD--": the server aborted while sending the body)."""
    logged = retried = 0
    unusual: list[str] = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        m = HTTPLOG.search(line)
        if m is None or (since is not None and datetime.strptime(m["accepted"], "%d/%b/%Y:%H:%M:%S.%f") < since):
            continue
        logged += 1
        retried += m["retries"].lstrip("+") != "0"
        if m["status"] != "200" or m["state"][:2] != "--":
            unusual.append(line[m.start("server") :][:200])
    return {"logged": logged, "retried": retried, "unusual": unusual[:20]}


def haproxy_binary() -> str:
    """Debian's haproxy, installed with apt-get when it is not there yet."""
    return debian.require("haproxy")


def haproxy_version(binary: str) -> str:
    first = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    return " ".join(first.split()[:3])


def show_stat(stats_socket: Path) -> dict[str, dict[str, str]]:
    """HAProxy's `show stat` for the replicas backend: server name -> its CSV fields."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(str(stats_socket))
        s.sendall(b"show stat\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    lines = b"".join(chunks).decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return {r["svname"]: r for r in rows if r.get("pxname") == "replicas" and r["svname"] != "BACKEND"}


@dataclass
class Replica:
    name: str
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd, env = our_server(self.port, workers=1)
        env["INTENT_SHUTDOWN_DELAY_S"] = str(SHUTDOWN_DELAY_S)
        out = self.log.open("ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=out)
        out.close()
        wait_ready(f"http://127.0.0.1:{self.port}", self.proc, "/ready", 120, self.log)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_status(stats_socket: Path, name: str, want: str, timeout: float = 30) -> float:
    """Seconds until HAProxy reports server `name` with a status starting with `want` (UP or DOWN)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            status = show_stat(stats_socket).get(name, {}).get("status", "")
        except (FileNotFoundError, ConnectionRefusedError):
            # A starting HAProxy can accept on its frontend port before its stats socket exists.
            status = ""
        if status.startswith(want):
            return time.monotonic() - start
        time.sleep(0.05)
    raise RuntimeError(f"HAProxy did not see {name} {want} within {timeout:.0f} s")


@contextlib.contextmanager
def balancer(
    work: Path, replica_ports: list[int], want: str = "UP", log: Path | None = None, binary: str | None = None
) -> Iterator[tuple[str, Path]]:
    """HAProxy (`binary`, else Debian's) with the shipped config in front of `replica_ports` (named replica1,
    replica2, ... in order), once it sees every replica `want` (UP or DOWN): its URL and its stats socket. Stopped
    on the way out."""
    binary = binary or haproxy_binary()
    stats_socket, config, frontend = work / "haproxy.sock", work / "haproxy.cfg", free_port()
    config.write_text(render(CONFIG.read_text(), frontend, replica_ports, stats_socket))
    out = log.open("wb") if log is not None else None
    sink = out if out is not None else subprocess.DEVNULL
    proc = subprocess.Popen([binary, "-W", "-db", "-f", str(config)], stdout=sink, stderr=sink)
    if out is not None:
        out.close()
    try:
        for i in range(len(replica_ports)):
            if proc.poll() is not None:
                tail = log_tail(log)
                raise RuntimeError(f"HAProxy exited with {proc.returncode}" + (f": {tail}" if tail else ""))
            wait_status(stats_socket, f"replica{i + 1}", want)
        yield f"http://127.0.0.1:{frontend}", stats_socket
    finally:
        proc.terminate()
        proc.wait(30)


def summary(report: Report) -> dict[str, Any]:
    answers = report.classes()
    ok = answers.get("200", 0)
    return {
        "requests": report.scheduled,
        "failed": report.scheduled - ok,
        "answers": answers,
        "latency_ms": report.latency_ms(),
    }


def in_flight(stats_socket: Path, name: str) -> int:
    """Requests HAProxy has on server `name` now: its current sessions plus its queue."""
    row = show_stat(stats_socket)[name]
    return int(row["scur"] or 0) + int(row["qcur"] or 0)


async def kill_phase(
    base: str, victim: Replica, stats_socket: Path, rate: float, seconds: float, seed: int = 0
) -> dict[str, Any]:
    """Single texts at `rate`, plus batches at a tenth of it; `victim` is killed at the first moment HAProxy
    shows it busy, then started again and awaited back in rotation."""
    texts = list(BUILTIN)
    singles = asyncio.create_task(open_loop(base, rate, seconds, texts, connections=32, seed=seed))
    batches = asyncio.create_task(
        open_loop(base, rate * BATCH_SHARE, seconds, texts, connections=8, seed=seed + 1000, batch=BATCH)
    )
    await asyncio.sleep(seconds / 3)
    deadline = time.monotonic() + seconds / 3
    while (busy := await asyncio.to_thread(in_flight, stats_socket, victim.name)) == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0)
    victim.signal(signal.SIGKILL)
    down_after = await asyncio.to_thread(wait_status, stats_socket, victim.name, "DOWN")
    report = merge([await singles, await batches])
    await asyncio.to_thread(victim.wait)
    await asyncio.to_thread(victim.start)  # back, for the next kill and the rolling restart
    await asyncio.to_thread(wait_status, stats_socket, victim.name, "UP")
    return {
        **summary(report),
        "in_flight_on_killed": busy,
        "killed": victim.name,
        "marked_down_after_s": round(down_after, 3),
    }


def total(kills: list[dict[str, Any]]) -> dict[str, int]:
    """The kills summed: requests, failed, and requests in flight on the killed replicas."""
    return {key: sum(int(k[key]) for k in kills) for key in ("requests", "failed", "in_flight_on_killed")}


def measure_capacity(base: str, seconds: float, connections: int = 8) -> dict[str, float]:
    """Closed-loop peak at `base`: single texts, then batches of BATCH texts (requests/s answered 200), after
    a one-second warm-up."""
    texts = list(BUILTIN)
    asyncio.run(closed_loop(base, 1.0, texts, connections=connections))
    singles = asyncio.run(closed_loop(base, seconds, texts, connections=connections))
    batches = asyncio.run(closed_loop(base, seconds, texts, connections=max(1, connections // 2), batch=BATCH))
    return {
        "single_rps": round(sum(1 for r in singles.results if r.status == 200) / seconds, 1),
        f"batch{BATCH}_rps": round(sum(1 for r in batches.results if r.status == 200) / seconds, 1),
    }


def mix_rate(capacity: dict[str, float]) -> float:
    """The single-text rate at which the kill phase's mix (batches at BATCH_SHARE of it on top) uses all of
    `capacity`: one single request takes 1/single of it, one batch 1/batch."""
    single, batch = capacity["single_rps"], capacity[f"batch{BATCH}_rps"]
    if single <= 0 or batch <= 0:
        raise ValueError(f"no capacity measured: {capacity}")
    return 1 / (1 / single + BATCH_SHARE / batch)


def load_rate(replica: dict[str, float], pool: dict[str, float], replicas: int, share: float) -> float:
    """Single-text requests/s for the kill and rolling phases: `share` of the replicas' summed capacity (one
    replica's, measured alone, times their number), or of the pool's as measured through the balancer if
    that is less: replicas that share cores, with the balancer and the load generator beside them, add less
    than their number."""
    return share * min(replicas * mix_rate(replica), mix_rate(pool))


def merge(reports: list[Report]) -> Report:
    merged = Report()
    for r in reports:
        merged.results.extend(r.results)
        merged.connect_errors += r.connect_errors
        merged.lost += r.lost
        merged.scheduled += r.scheduled
    return merged


async def rolling_phase(base: str, replicas: list[Replica], stats_socket: Path, rate: float) -> dict[str, Any]:
    stop = asyncio.Event()
    restarts: list[dict[str, Any]] = []

    async def restart_all() -> None:
        await asyncio.sleep(1.0)
        for replica in replicas:
            t0 = time.monotonic()
            replica.signal(signal.SIGTERM)
            code = await asyncio.to_thread(replica.wait)
            exited = time.monotonic() - t0
            await asyncio.to_thread(replica.start)
            await asyncio.to_thread(wait_status, stats_socket, replica.name, "UP")
            restarts.append(
                {
                    "replica": replica.name,
                    "exit_code": code,
                    "exited_after_s": round(exited, 2),
                    "back_in_rotation_after_s": round(time.monotonic() - t0, 2),
                }
            )
        await asyncio.sleep(1.0)
        stop.set()

    # Open loop for as long as the restarts take: chunks of 2 s until they are done.
    reports: list[Report] = []
    orchestration = asyncio.create_task(restart_all())
    while not stop.is_set():
        reports.append(await open_loop(base, rate, 2.0, list(BUILTIN), connections=32, seed=len(reports)))
    await orchestration
    return {**summary(merge(reports)), "restarts": restarts}


def run(
    replicas_n: int = 3,
    kills: int = 5,
    kill_seconds: float = 6.0,
    load_share: float = 0.5,
    rate: float | None = None,
    capacity_seconds: float = 3.0,
    out: Path | None = None,
) -> dict[str, Any]:
    """`rate` fixes the single-text rate instead of sizing it from the measured capacity."""
    binary = haproxy_binary()  # before any replica starts, so that a missing HAProxy fails at once
    work = Path(tempfile.mkdtemp(prefix="scaleout-"))
    replicas = [Replica(f"replica{i + 1}", free_port(), work / f"replica{i + 1}.log") for i in range(replicas_n)]
    capacity: dict[str, Any] = {"cores": effective_cpus(), "load_share": load_share}
    try:
        for replica in replicas:
            replica.start()
        if rate is None:
            capacity["replica"] = measure_capacity(f"http://127.0.0.1:{replicas[0].port}", capacity_seconds)
        ports = [r.port for r in replicas]
        with balancer(work, ports, log=work / "haproxy.log", binary=binary) as (base, stats_socket):
            if rate is None:
                capacity["pool"] = measure_capacity(base, capacity_seconds, connections=8 * replicas_n)
                rate = load_rate(capacity["replica"], capacity["pool"], replicas_n, load_share)
            phases_from = datetime.now()  # the balancer's log is read from here: the probe overloads on purpose
            kill_results = []
            for i in range(kills):
                victim = replicas[i % replicas_n]
                kill_results.append(asyncio.run(kill_phase(base, victim, stats_socket, rate, kill_seconds, i)))
            rolling = asyncio.run(rolling_phase(base, replicas, stats_socket, rate))
    finally:
        for replica in replicas:
            replica.stop()
    from app.cpu import measurement_context

    kill = total(kill_results)
    result = {
        "replicas": replicas_n,
        "balancer": haproxy_version(binary),
        "capacity": capacity,
        "rate_rps": round(rate, 1),
        "batch_rate_rps": round(rate * BATCH_SHARE, 1),
        "kills": kill_results,
        "kill": kill,
        "rolling": rolling,
        "passed": kill["failed"] == 0 and rolling["failed"] == 0,
        "balancer_log": balancer_log(work / "haproxy.log", phases_from),
        "context": measurement_context(),
    }
    if result["passed"]:
        shutil.rmtree(work, ignore_errors=True)
    else:
        result["kept"] = str(work)  # the replicas' and the balancer's logs, to see what went wrong
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def peaks(capacity: dict[str, Any]) -> str:
    """The measured peaks in words."""
    parts = [
        f"{where} {peak['single_rps']:g} req/s or {peak[f'batch{BATCH}_rps']:g} batches of {BATCH}/s"
        for where, peak in ((w, capacity[w]) for w in ("replica", "pool") if w in capacity)
    ]
    return ", ".join(parts) or "not measured (fixed rate)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.scaleout", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=at_most(positive_int, MAX_WORKERS), default=3)
    p.add_argument(
        "--kills", type=at_most(int, MAX_KILLS), default=5, help="kill phases, each SIGKILLs one replica (in turn)"
    )
    p.add_argument(
        "--kill-seconds", type=at_most(positive_float, MAX_SECONDS), default=6.0, help="length of each kill phase"
    )
    p.add_argument(
        "--load-share", type=float, default=0.5, help="share of the replicas' measured capacity the load uses"
    )
    p.add_argument(
        "--rate",
        type=at_most(positive_float, MAX_RATE),
        default=None,
        help="fixed single-text requests/s instead of sizing from capacity",
    )
    p.add_argument(
        "--capacity-seconds",
        type=at_most(positive_float, MAX_SECONDS),
        default=3.0,
        help="length of each capacity measurement",
    )
    p.add_argument("--out", type=path_arg, default=ROOT / "reports" / "scaleout.json")
    a = p.parse_args(argv)
    if a.replicas < 2:
        p.error("--replicas must be at least 2: one is killed while the others serve")
    if a.kills < 0:
        p.error("--kills must be 0 or more")
    if not 0 < a.load_share <= 1:
        p.error("--load-share must be in (0, 1]")
    require_writable_dir(p, "--out", a.out.parent)  # now, not after the run
    try:
        result = run(a.replicas, a.kills, a.kill_seconds, a.load_share, a.rate, a.capacity_seconds, a.out)
    except ServerExited as exc:
        print(f"error: a replica did not start: {exc}", file=sys.stderr)
        return 1
    kill, rolling = result["kill"], result["rolling"]
    print(
        f"{result['replicas']} replicas behind {result['balancer']} on {result['context']['cpu']}: "
        f"peak {peaks(result['capacity'])}; load "
        f"{result['rate_rps']:g} req/s + {result['batch_rate_rps']:g} batches/s"
    )
    for i, k in enumerate(result["kills"], 1):
        print(
            f"  kill {i}, SIGKILL {k['killed']}: {k['failed']} of {k['requests']} requests failed; "
            f"{k['in_flight_on_killed']} were in flight on it"
        )
    print(f"  kills: {kill['failed']} of {kill['requests']} requests failed")
    print(f"  rolling restart by SIGTERM: {rolling['failed']} of {rolling['requests']} requests failed")
    log = result["balancer_log"]
    print(
        f"  HAProxy logged {log['logged']} requests, retried {log['retried']}; unusual endings: {len(log['unusual'])}"
    )
    for line in log["unusual"]:
        print(f"    {line}")
    if "kept" in result:
        print(f"  logs kept in {result['kept']}")
    print(f"  wrote {a.out}")
    print("scaleout:", "passed" if result["passed"] else "FAILED (some requests failed)")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
