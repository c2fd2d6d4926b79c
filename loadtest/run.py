"""`make loadtest`: open-loop rates and a step-up to saturation against one server, then a table.

Targets only loopback. Writes reports/loadtest/<scenario>/ (Locust CSV and HTML, summary.json)
and reports/loadtest/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from app.config import KEEP_WARM_MS_MAX
from app.cpu import current, measurement_context
from loadtest.cli_args import (
    MAX_SECONDS,
    MAX_WORKERS,
    at_most,
    cpu_list,
    path_arg,
    positive_floats,
    positive_int,
    positive_ints,
    positive_ints_or_none,
    require_url,
    require_writable_dir,
)
from loadtest.queries import QueryError, read_queries
from loadtest.server import LOOPBACK, ROOT, free_port, our_server, pinned, ready_problem, serve

P99_LIMIT_MS = 50.0


def run_locust(
    host: str,
    out: Path,
    mode: str,
    users: int,
    seconds: int,
    rate: float = 0.0,
    cpus: str | None = None,
    batch_share: float = 0.0,
    data: str | None = None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "LOADTEST_MODE": mode,
        "LOADTEST_RATE": str(rate or 1),
        "LOADTEST_USERS": str(users),
        "LOADTEST_OUT": str(out),
        "LOADTEST_BATCH_SHARE": str(batch_share),
        "PYTHONPATH": str(ROOT),
    }
    if data:
        env["LOADTEST_DATA"] = data
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtest" / "locustfile.py"),
        "--headless",
        "--host",
        host,
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds}s",
        "--stop-timeout",
        "5",
        "--csv",
        str(out / "locust"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--exit-code-on-error",
        "0",
    ]
    with (out / "locust.log").open("wb") as log:
        subprocess.run(
            pinned(cmd, cpus),
            env=env,
            cwd=ROOT,
            check=True,
            timeout=seconds + 60,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    return summary


@dataclass(frozen=True)
class Placement:
    """Where a phase runs: the server's worker count and CPU set, and the load generator's CPU set."""

    workers: int
    server_cpus: str | None
    locust_cpus: str | None

    def describe(self) -> str:
        return f"{self.workers} worker(s) on CPUs {self.server_cpus}, Locust on CPUs {self.locust_cpus}"


# Latency is measured with the load generator on its own core, so that it never preempts the server
# mid-request; throughput is measured with every core serving, the generator sharing them.
LATENCY = Placement(workers=1, server_cpus="0", locust_cpus="1")
THROUGHPUT = Placement(workers=2, server_cpus="0,1", locust_cpus="0,1")

ServerFactory = Callable[[int, int], tuple[list[str], dict[str, str]]]  # (port, workers) -> (cmd, env)


def open_loop(host: str, out: Path, rates: list[float], seconds: int, cpus: str | None, data: str | None) -> list[Any]:
    results = []
    for rate in rates:
        users = max(4, int(rate * 0.02))  # enough users that each one's pacing interval is >> p99
        s = run_locust(host, out / f"open_{int(rate)}", "open", users, seconds, rate, cpus, data=data)
        results.append(s)
        print(
            f"  open {rate:>6.0f}/s: p50 {s['latency_ms']['p50']} ms  mean {s['latency_ms']['mean']} ms  "
            f"p99 {s['latency_ms']['p99']} ms "
            f"(95%: {s.get('latency_p99_interval_ms')})  "
            f"server p50 {s['server_latency_ms']['p50']} ms  errors {s['errors']}",
            flush=True,
        )
    return results


def saturation(
    host: str, out: Path, steps: list[int], seconds: int, cpus: str | None, data: str | None
) -> tuple[list[Any], dict[str, Any]]:
    results = []
    for users in steps:
        s = run_locust(host, out / f"closed_{users}", "closed", users, seconds, cpus=cpus, data=data)
        results.append(s)
        print(
            f"  closed {users:>3} users: {s['throughput_rps']} req/s  p99 {s['latency_ms']['p99']} ms  "
            f"errors {s['errors']}  Locust {s['load_generator']['cores']} cores  "
            f"connections by server process {s['connections_by_process']}",
            flush=True,
        )
    ok = [s for s in results if s["errors"] == 0 and (s["latency_ms"]["p99"] or 1e9) <= P99_LIMIT_MS]
    best = max(ok, key=lambda s: s["throughput_rps"]) if ok else None
    summary = {
        "throughput_rps": best["throughput_rps"] if best else None,
        "users": best["users"] if best else None,
        "p99_ms": best["latency_ms"]["p99"] if best else None,
        "rule": f"highest throughput with p99 <= {P99_LIMIT_MS} ms and 0 errors",
    }
    return results, summary


@dataclass(frozen=True)
class Scenario:
    """The load both `make loadtest` and `make compare` apply: open-loop rates, then closed-loop steps."""

    rates: list[float]
    steps: list[int]
    seconds: int  # per open-loop rate
    step_seconds: int  # per saturation step
    latency: Placement
    throughput: Placement


def measure(
    make_server: ServerFactory | None,
    host: str | None,
    out: Path,
    scenario: Scenario,
    data: str | None = None,
    server_env: dict[str, str] | None = None,
    ready_timeout: float = 120.0,
) -> dict[str, Any]:
    """The open-loop rates under the latency placement, then the saturation steps under the throughput
    placement; a fresh server for each phase, unless `host` names one already running."""
    latency, throughput = scenario.latency, scenario.throughput

    @contextmanager
    def server(placement: Placement, log: Path) -> Iterator[str]:
        if host is not None or make_server is None:
            yield host or ""
            return
        port = free_port()
        cmd, env = make_server(port, placement.workers)
        env = {**env, **(server_env or {})}
        with serve(cmd, env, port, placement.server_cpus, timeout=ready_timeout, log=log) as url:
            yield url

    out.mkdir(parents=True, exist_ok=True)
    print(f"  latency phase: {latency.describe()}", flush=True)
    with server(latency, out / "server_latency.log") as url:
        open_results = open_loop(url, out, scenario.rates, scenario.seconds, latency.locust_cpus, data)
    print(f"  throughput phase: {throughput.describe()}", flush=True)
    with server(throughput, out / "server_throughput.log") as url:
        steps_results, best = saturation(url, out, scenario.steps, scenario.step_seconds, throughput.locust_cpus, data)
    return {
        "open_loop": open_results,
        "saturation_steps": steps_results,
        "saturation": best,
        "placement": {"latency": asdict(latency), "throughput": asdict(throughput)},
    }


def load_name(s: dict[str, Any]) -> str:
    """A phase's load in words: "open 100/s" or "closed, 8 users"."""
    return f"open {s['target_rate']:.0f}/s" if s["mode"] == "open" else f"closed, {s['users']} users"


def empty_phases(result: dict[str, Any]) -> list[str]:
    """The phases in which no request succeeded (Locust's `requests` counts the successful ones): a target that
    answers nothing right had read as a clean table and exit status 0."""
    return [load_name(s) for s in result["open_loop"] + result["saturation_steps"] if not s["requests"]]


def table(name: str, result: dict[str, Any]) -> str:
    lines = [
        f"{name}",
        "| load | req/s | p50 ms | mean ms | p90 ms | p99 ms | p99.9 ms | server p50 | server p99 | errors "
        "| Locust's cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["open_loop"] + result["saturation_steps"]:
        load = load_name(s)
        lat, srv = s["latency_ms"], s["server_latency_ms"]
        lines.append(
            f"| {load} | {s['throughput_rps']} | {lat['p50']} | {lat['mean']} | {lat['p90']} | {lat['p99']} "
            f"| {lat['p99_9']} "
            f"| {srv['p50']} | {srv['p99']} | {s['errors']} | {s['load_generator']['cores']} |"
        )
    sat = result["saturation"]
    lines.append(f"saturation: {sat['throughput_rps']} req/s at p99 {sat['p99_ms']} ms ({sat['rule']})")
    return "\n".join(lines)


def add_placement_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CPU placement (taskset lists; empty: no pinning)")
    workers = at_most(positive_int, MAX_WORKERS)
    g.add_argument("--latency-workers", type=workers, default=LATENCY.workers)
    g.add_argument("--latency-server-cpus", type=cpu_list, default=LATENCY.server_cpus)
    g.add_argument("--latency-locust-cpus", type=cpu_list, default=LATENCY.locust_cpus)
    g.add_argument("--workers", type=workers, default=THROUGHPUT.workers, help="server workers, throughput phase")
    g.add_argument("--server-cpus", type=cpu_list, default=THROUGHPUT.server_cpus)
    g.add_argument("--locust-cpus", type=cpu_list, default=THROUGHPUT.locust_cpus)


def keep_warm_ms(text: str) -> float:
    """A value the service takes for INTENT_KEEP_WARM_MS: one it refuses had stopped the run with a traceback when
    its server would not start (compare's: after building the baselines' stand-in model)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= KEEP_WARM_MS_MAX:  # nan too
        raise argparse.ArgumentTypeError(f"must be a number from 0 to {KEEP_WARM_MS_MAX}, got {text!r}")
    return value


def add_keep_warm_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keep-warm-ms",
        type=keep_warm_ms,
        default=0.0,
        help="our server's INTENT_KEEP_WARM_MS (0, the service's default: off); recorded with the results",
    )


def keep_warm_env(ms: float) -> dict[str, str]:
    return {"INTENT_KEEP_WARM_MS": str(ms)}


def add_scenario_args(
    p: argparse.ArgumentParser, rates: str, steps: str, seconds: int, step_seconds: int, no_steps: bool = False
) -> None:
    """The load's options, each checked as it is parsed: rates and steps are comma lists, neither empty unless
    `no_steps` lets `--steps ""` skip the saturation phase."""
    steps_type = positive_ints_or_none if no_steps else positive_ints
    p.add_argument("--rates", type=positive_floats, default=rates, help=f"open-loop rates, req/s (default: {rates})")
    p.add_argument("--steps", type=steps_type, default=steps, help=f"saturation steps, users (default: {steps})")
    p.add_argument("--seconds", type=at_most(positive_int, MAX_SECONDS), default=seconds, help="per open-loop rate")
    p.add_argument(
        "--step-seconds", type=at_most(positive_int, MAX_SECONDS), default=step_seconds, help="per saturation step"
    )


def scenario_from_args(a: argparse.Namespace) -> Scenario:
    return Scenario(
        rates=list(a.rates),
        steps=list(a.steps),
        seconds=a.seconds,
        step_seconds=a.step_seconds,
        latency=Placement(a.latency_workers, a.latency_server_cpus or None, a.latency_locust_cpus or None),
        throughput=Placement(a.workers, a.server_cpus or None, a.locust_cpus or None),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__)
    p.add_argument("--host", default=os.environ.get("HOST_URL"), help="target a running server (loopback only)")
    add_scenario_args(p, rates="100,400,800", steps="8,16,32,64", seconds=12, step_seconds=10, no_steps=True)
    add_placement_args(p)
    p.add_argument("--inference-mode", choices=["inline", "thread"], default="inline")
    add_keep_warm_arg(p)
    p.add_argument("--data", type=path_arg, default=None, help="CLINC150 JSON whose validation texts are sent")
    p.add_argument("--out", type=path_arg, default=ROOT / "reports" / "loadtest")
    a = p.parse_args(argv)
    a.host = require_url(p, "--host", a.host, "http://127.0.0.1:8000")
    require_writable_dir(p, "--out", a.out)
    try:  # the texts Locust will send, read here so that a bad --data is one line, not a Locust failure per phase
        texts, a.queries = read_queries(a.data)
    except QueryError as exc:
        p.error(str(exc))
    a.query_count = len(texts)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    cpu = current().describe()
    print(f"CPU: {cpu}", flush=True)
    scenario = scenario_from_args(a)
    if a.host:
        from urllib.parse import urlparse

        if urlparse(a.host).hostname not in LOOPBACK:
            print("error: load tests target loopback addresses only", file=sys.stderr)
            return 2
        if (problem := ready_problem(a.host)) is not None:
            print(f"error: {a.host} is not ready: {problem}", file=sys.stderr)
            return 2
    result = measure(
        None if a.host else our_server,
        a.host,
        a.out,
        scenario,
        data=None if a.data is None else str(a.data),
        server_env={"INTENT_INFERENCE_MODE": a.inference_mode, **keep_warm_env(a.keep_warm_ms)},
    )
    result["setup"] = {
        "inference_mode": a.inference_mode,
        "keep_warm_ms": a.keep_warm_ms,
        "cores": os.cpu_count(),
        "host": a.host,
        "queries": {"source": a.queries, "count": a.query_count},
    }
    result["context"] = measurement_context()
    (a.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    latency, throughput = scenario.latency.describe(), scenario.throughput.describe()
    print(table(f"intent service on {cpu} (latency: {latency}; throughput: {throughput})", result))
    if empty := empty_phases(result):
        print(f"error: no request succeeded in {', '.join(empty)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
