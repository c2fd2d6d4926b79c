"""`make loadtest`: open-loop rates and a step-up to saturation against one server, then a table.

Targets only loopback. Writes reports/loadtest/<scenario>/ (Locust CSV and HTML, summary.json)
and reports/loadtest/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from loadtest.server import LOOPBACK, ROOT, free_port, our_server, pinned, serve

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


def scenarios(
    host: str,
    out: Path,
    rates: list[float],
    steps: list[int],
    seconds: int,
    step_seconds: int,
    cpus: str | None,
    data: str | None,
) -> dict[str, Any]:
    open_loop = []
    for rate in rates:
        users = max(4, int(rate * 0.02))  # enough users that each one's pacing interval is >> p99
        s = run_locust(host, out / f"open_{int(rate)}", "open", users, seconds, rate, cpus, data=data)
        open_loop.append(s)
        print(
            f"  open {rate:>6.0f}/s: p50 {s['latency_ms']['p50']} ms  p99 {s['latency_ms']['p99']} ms  "
            f"errors {s['errors']}",
            flush=True,
        )
    saturation = []
    for users in steps:
        s = run_locust(host, out / f"closed_{users}", "closed", users, step_seconds, cpus=cpus, data=data)
        saturation.append(s)
        print(
            f"  closed {users:>3} users: {s['throughput_rps']} req/s  p99 {s['latency_ms']['p99']} ms  "
            f"errors {s['errors']}",
            flush=True,
        )
    ok = [s for s in saturation if s["errors"] == 0 and (s["latency_ms"]["p99"] or 1e9) <= P99_LIMIT_MS]
    best = max(ok, key=lambda s: s["throughput_rps"]) if ok else None
    return {
        "open_loop": open_loop,
        "saturation_steps": saturation,
        "saturation": {
            "throughput_rps": best["throughput_rps"] if best else None,
            "users": best["users"] if best else None,
            "p99_ms": best["latency_ms"]["p99"] if best else None,
            "rule": f"highest throughput with p99 <= {P99_LIMIT_MS} ms and 0 errors",
        },
    }


def table(name: str, result: dict[str, Any]) -> str:
    lines = [
        f"{name}",
        "| load | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | server p50 | server p99 | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["open_loop"] + result["saturation_steps"]:
        load = f"open {s['target_rate']:.0f}/s" if s["mode"] == "open" else f"closed, {s['users']} users"
        lat, srv = s["latency_ms"], s["server_latency_ms"]
        lines.append(
            f"| {load} | {s['throughput_rps']} | {lat['p50']} | {lat['p90']} | {lat['p99']} | {lat['p99_9']} "
            f"| {srv['p50']} | {srv['p99']} | {s['errors']} |"
        )
    sat = result["saturation"]
    lines.append(f"saturation: {sat['throughput_rps']} req/s at p99 {sat['p99_ms']} ms ({sat['rule']})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default=os.environ.get("HOST_URL"), help="target a running server (loopback only)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rates", default="100,400,800")
    p.add_argument("--steps", default="8,16,32,64")
    p.add_argument("--seconds", type=int, default=12, help="per open-loop rate")
    p.add_argument("--step-seconds", type=int, default=10, help="per saturation step")
    p.add_argument("--server-cpus", default=os.environ.get("SERVER_CPUS", "0,1"))
    p.add_argument("--locust-cpus", default=os.environ.get("LOCUST_CPUS", "0,1"))
    p.add_argument("--inference-mode", choices=["inline", "thread"], default="inline")
    p.add_argument("--data", default=None, help="CLINC150 JSON whose validation texts are sent")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "loadtest")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    rates = [float(x) for x in a.rates.split(",") if x]
    steps = [int(x) for x in a.steps.split(",") if x]
    a.out.mkdir(parents=True, exist_ok=True)
    setup = {
        "inference_mode": a.inference_mode,
        "server_cpus": a.server_cpus,
        "locust_cpus": a.locust_cpus,
        "workers": a.workers,
        "cores": os.cpu_count(),
    }
    if a.host:
        from urllib.parse import urlparse

        if urlparse(a.host).hostname not in LOOPBACK:
            print("error: load tests target loopback addresses only", file=sys.stderr)
            return 2
        result = scenarios(a.host, a.out, rates, steps, a.seconds, a.step_seconds, a.locust_cpus, a.data)
    else:
        port = free_port()
        cmd, env = our_server(port, a.workers)
        env["INTENT_INFERENCE_MODE"] = a.inference_mode
        with serve(cmd, env, port, a.server_cpus, log=a.out / "server.log") as host:
            result = scenarios(host, a.out, rates, steps, a.seconds, a.step_seconds, a.locust_cpus, a.data)
    result["setup"] = setup
    (a.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        table(f"intent service ({a.workers} workers, server CPUs {a.server_cpus}, Locust CPUs {a.locust_cpus})", result)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
