"""`make soak`: a bounded run at a moderate fixed rate that records RSS over time. Fails if RSS grows
more than 10% after warm-up, or if any request fails. Writes reports/soak.json."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from app.cpu import current, measurement_context
from loadtest.driver import open_loop
from loadtest.procs import rss_mb
from loadtest.queries import load_queries
from loadtest.server import ROOT, free_port, our_server, wait_ready


def run(seconds: float, rate: float, workers: int, warmup_s: float, sample_every: float) -> dict[str, Any]:
    port = free_port()
    cmd, env = our_server(port, workers)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        start = time.perf_counter()
        while not done.wait(sample_every):
            samples.append((round(time.perf_counter() - start, 1), round(rss_mb(proc.pid), 2)))

    try:
        wait_ready(base, proc, "/ready", 60)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        report = asyncio.run(open_loop(base, rate, seconds, load_queries(), connections=16))
        done.set()
        sampler.join()
    finally:
        proc.terminate()
        proc.wait(30)
    after_warmup = [rss for t, rss in samples if t >= warmup_s] or [rss for _, rss in samples]
    baseline, peak = after_warmup[0], max(after_warmup)
    growth = (peak - baseline) / baseline if baseline else 0.0
    errors = sum(1 for r in report.results if r.status != 200) + report.lost + report.connect_errors
    return {
        "seconds": seconds,
        "rate": rate,
        "requests": report.scheduled,
        "answers": report.classes(),
        "errors": errors,
        "latency_ms": report.latency_ms(200),
        "rss_after_warmup_mb": baseline,
        "rss_peak_mb": peak,
        "rss_growth": round(growth, 4),
        "samples": samples,
        "passed": errors == 0 and growth <= 0.10,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--warmup", type=float, default=None, help="default: 10%% of the run")
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "soak.json")
    a = p.parse_args(argv)
    print(f"CPU: {current().describe()}", flush=True)
    warmup = a.warmup if a.warmup is not None else a.seconds * 0.1
    result = run(a.seconds, a.rate, a.workers, warmup, max(0.5, a.seconds / 120))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({**result, "context": measurement_context()}, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    print("soak:", "passed" if result["passed"] else "FAILED")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
