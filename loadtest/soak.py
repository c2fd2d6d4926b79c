"""`make soak`: an hour (`--minutes`) of open-loop load at a fixed share (`--share`, half) of the capacity
measured first (a few seconds closed-loop), with the service's memory and latency written every minute:
RSS summed over its processes (the supervisor and its workers), p50, mean, p99 and errors, and how late the load
driver's own event loop ran (a request due while it is held reads the stall as latency). To place a slow
minute, each also gives the hypervisor's steal; the p99 of the service's whole time, of its model path (both
from the server-timing header), of the time outside the service and of the part of it before the driver wrote
the request; the service's CPU per request; and the CPU time of a fixed piece of work in the driver (the
machine's own speed: loadtest.host).

`--host URL` drives a service already running elsewhere instead, so that the driver does not share the service's
cores: its RSS (the workers', without the supervisor) and CPU come from its /metrics
(loadtest.service_readings), and steal and the canary are the driver's machine's.

The bar, checked at the end: no request fails; after a warm-up of 5 minutes, RSS grows by at most 5%;
the p99 of the last 10 minutes is at most 20% above the p99 of the first 10 after the warm-up. A run
shorter than 25 minutes scales the warm-up and both windows down in proportion (a 1-minute run: 12 s of
warm-up, windows of 24 s). Writes reports/soak.json and reports/soak.png (RSS, p50/p99 and errors over
time); exits 1 if the bar is not met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.cpu import current, measurement_context
from loadtest.cli_args import (
    MAX_MINUTES,
    MAX_RATE,
    MAX_SECONDS,
    MAX_WORKERS,
    at_most,
    path_arg,
    positive_float,
    positive_int,
    require_url,
    require_writable_dir,
)
from loadtest.driver import Report, closed_loop, open_loop
from loadtest.host import Canary, Steal
from loadtest.queries import load_queries
from loadtest.server import ROOT, ServerExited, free_port, our_server, ready_problem, stop, wait_ready
from loadtest.service_readings import ProcessTree, Reading, ScrapedService, ServiceReader

WARMUP_S = 300.0
COMPARE_S = 600.0
RSS_GROWTH_MAX = 0.05
P99_RISE_MAX = 0.20


@dataclass
class Tick:
    """What came back in one sampling interval, which ended `t_s` seconds into the run."""

    t_s: float
    rss_mb: float
    requests: int
    errors: int
    latencies_ms: np.ndarray = field(repr=False)  # of the requests answered 200
    driver_lag_ms: float  # the longest the driver's event loop woke late in the interval: its own stalls
    steal: float | None = None  # the share of the machine's CPU time the hypervisor took in the interval
    # The service's own model path (its server-timing: tokenize and inference) for each answer that gave one,
    # and the CPU seconds its processes used in the interval: a slow minute with a slow model path is slow work,
    # one without is time outside the model (HTTP, queueing, a vCPU not running).
    model_ms: np.ndarray | None = field(default=None, repr=False)
    server_cpu_s: float | None = None
    canary_ms: float | None = None  # the CPU time of a fixed piece of work at the tick's end (loadtest.host.Canary)
    # The service's whole time (`service` in its server-timing: from its first look at the request to its
    # response), and each such answer's latency less it: the time outside the service (the loopback, the kernel,
    # the wait for a worker's event loop, the driver). The two split a slow minute that the model path does not
    # explain between the service's own queue and HTTP handling, and everything around it.
    service_ms: np.ndarray | None = field(default=None, repr=False)
    outside_ms: np.ndarray | None = field(default=None, repr=False)
    # Of the time outside the service, how long each answer's request waited in the driver before it was written
    # (loadtest.driver.Result.send_wait_s): the part of a tail that is the instrument's own or its connections'.
    send_wait_ms: np.ndarray | None = field(default=None, repr=False)


class LoopLag:
    """How late this event loop wakes a task that sleeps `period_s` at a time. The driver measures latency from
    each request's scheduled time, so anything that holds its loop (its own bookkeeping, a CPU taken by the
    server) shows up in every request due meanwhile; this says how much of a tail is the instrument's."""

    def __init__(self, period_s: float = 0.01) -> None:
        self.period_s = period_s
        self.worst_s = 0.0

    async def run(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(self.period_s)
            self.worst_s = max(self.worst_s, time.perf_counter() - asked - self.period_s)

    def take_ms(self) -> float:
        """The worst lag since the last call, in ms, and start again."""
        worst, self.worst_s = self.worst_s, 0.0
        return worst * 1000


def percentile(latencies: list[np.ndarray], q: float) -> float | None:
    joined = np.concatenate(latencies) if latencies else np.empty(0)
    return round(float(np.percentile(joined, q)), 3) if joined.size else None


def p50_mean_p99(latencies: list[np.ndarray]) -> dict[str, float | None]:
    """A minute's p50, mean and p99, from its latencies joined once (in the driver's loop, once a minute)."""
    joined = np.concatenate(latencies) if latencies else np.empty(0)
    if not joined.size:
        return {"p50_ms": None, "mean_ms": None, "p99_ms": None}
    p50, p99 = np.percentile(joined, [50, 99])
    return {
        "p50_ms": round(float(p50), 3),
        "mean_ms": round(float(joined.mean(dtype=np.float64)), 3),
        "p99_ms": round(float(p99), 3),
    }


def phases(duration_s: float, warmup_s: float = WARMUP_S, compare_s: float = COMPARE_S) -> tuple[float, float]:
    """(warm-up, comparison window), scaled down in proportion when the run is shorter than both windows
    after the warm-up."""
    needed = warmup_s + 2 * compare_s
    if duration_s >= needed:
        return warmup_s, compare_s
    scale = duration_s / needed
    return warmup_s * scale, compare_s * scale


def minute_of(tick: Tick, minute_s: float = 60.0) -> int:
    """The minute (from 0) that a tick ended in."""
    return max(0, int(np.ceil(tick.t_s / minute_s)) - 1)


def steal_share(ticks: list[Tick]) -> float | None:
    """The ticks' mean steal share (they are of equal length), None where no tick has one."""
    shares = [t.steal for t in ticks if t.steal is not None]
    return round(float(np.mean(shares)), 4) if shares else None


# The per-answer columns of a tick whose p99 each minute and both windows report: (its Tick field, its key's stem).
TAIL_COLUMNS = (
    ("model_ms", "model"),
    ("service_ms", "service"),
    ("outside_ms", "outside"),
    ("send_wait_ms", "send_wait"),
)


def tail_p99(ticks: list[Tick], column: str) -> float | None:
    """The p99 of one per-answer column (a Tick field: the model path, the service's time, the time outside it,
    the driver's wait before writing) over the ticks' answers, None where no tick has it."""
    arrays = [getattr(t, column) for t in ticks]
    return percentile([a for a in arrays if a is not None], 99)


def cpu_ms_per_request(ticks: list[Tick]) -> float | None:
    """The service's CPU milliseconds per request sent, None where the CPU was not read or nothing was sent."""
    used = [t.server_cpu_s for t in ticks if t.server_cpu_s is not None]
    requests = sum(t.requests for t in ticks if t.server_cpu_s is not None)
    return round(sum(used) * 1000 / requests, 3) if used and requests else None


def canary_ms(ticks: list[Tick]) -> float | None:
    """The median of the ticks' canary readings, None where there are none."""
    readings = [t.canary_ms for t in ticks if t.canary_ms is not None]
    return round(float(np.median(readings)), 3) if readings else None


def minute_rows(ticks: list[Tick], minute_s: float = 60.0) -> list[dict[str, Any]]:
    """One row per minute (the last one may be partial): RSS at its end, requests, p50, mean, p99, errors, the
    driver's worst loop lag, the share of CPU time the hypervisor took, the p99 of the service's whole time, of
    the time outside it, of the driver's wait before writing and of the model path, its CPU per request, and the
    canary's CPU time (the machine's own speed)."""
    by_minute: dict[int, list[Tick]] = {}
    for tick in ticks:
        by_minute.setdefault(minute_of(tick, minute_s), []).append(tick)
    return [
        {
            "minute": index + 1,
            "t_s": round(group[-1].t_s, 1),
            "rss_mb": round(group[-1].rss_mb, 1),
            "requests": sum(t.requests for t in group),
            **p50_mean_p99([t.latencies_ms for t in group]),
            "errors": sum(t.errors for t in group),
            "driver_lag_max_ms": round(max(t.driver_lag_ms for t in group), 3),
            "steal": steal_share(group),
            **{f"{stem}_p99_ms": tail_p99(group, column) for column, stem in TAIL_COLUMNS},
            "server_cpu_ms_per_request": cpu_ms_per_request(group),
            "canary_ms": canary_ms(group),
        }
        for index, group in sorted(by_minute.items())
    ]


def finished_minutes(ticks: list[Tick], start: int, minute_s: float = 60.0) -> tuple[list[dict[str, Any]], int]:
    """The rows of the minutes that ended since tick `start` (a minute has ended once a later tick exists), and
    where the next call starts. Each minute is summarised once: recomputing every minute so far at each tick held
    the driver's event loop for a time that grew with the run (130 ms a tick by minute 60 at 1,600 req/s, on an
    AMD EPYC with AVX-512 VNNI), and the requests due meanwhile read it as latency."""
    if not ticks:
        return [], start
    current = minute_of(ticks[-1], minute_s)
    end = start
    while end < len(ticks) and minute_of(ticks[end], minute_s) < current:
        end += 1
    return minute_rows(ticks[start:end], minute_s), end


def evaluate(
    ticks: list[Tick], duration_s: float, warmup_s: float = WARMUP_S, compare_s: float = COMPARE_S
) -> dict[str, Any]:
    """The bar over the whole run: no errors; RSS after the warm-up at most 5% above its value at the end of
    the warm-up; the p99 of the last `compare_s` at most 20% above that of the first `compare_s` after the
    warm-up (both scaled down for a short run)."""
    warmup, compare = phases(duration_s, warmup_s, compare_s)
    errors = sum(t.errors for t in ticks)
    after = [t for t in ticks if t.t_s >= warmup] or ticks[-1:]
    rss_base = after[0].rss_mb if after else 0.0
    rss_peak = max((t.rss_mb for t in after), default=0.0)
    growth = (rss_peak - rss_base) / rss_base if rss_base else 0.0
    # A tick belongs to a window if it ended inside it.
    first = [t for t in ticks if warmup < t.t_s <= warmup + compare]
    last = [t for t in ticks if t.t_s > duration_s - compare]
    p99_first = percentile([t.latencies_ms for t in first], 99)
    p99_last = percentile([t.latencies_ms for t in last], 99)
    lag_first = max((t.driver_lag_ms for t in first), default=None)
    lag_last = max((t.driver_lag_ms for t in last), default=None)
    rise = (p99_last / p99_first - 1) if p99_first and p99_last is not None else None
    checks = {
        "no_errors": errors == 0,
        "rss_flat": growth <= RSS_GROWTH_MAX,
        "p99_steady": rise is not None and rise <= P99_RISE_MAX,
    }
    return {
        "warmup_s": round(warmup, 1),
        "compare_s": round(compare, 1),
        "errors": errors,
        "rss_after_warmup_mb": round(rss_base, 1),
        "rss_peak_after_warmup_mb": round(rss_peak, 1),
        "rss_growth": round(growth, 4),
        "p99_first_ms": p99_first,
        "p99_last_ms": p99_last,
        "p99_rise": None if rise is None else round(rise, 4),
        # Not a check: whether a rise is the load driver's own (its event loop held) or the service's.
        "driver_lag_max_first_ms": None if lag_first is None else round(lag_first, 3),
        "driver_lag_max_last_ms": None if lag_last is None else round(lag_last, 3),
        # Nor these: whether a rise is in the service's model path, in its CPU per request, and in the machine.
        **{
            f"{stem}_p99_{window}_ms": tail_p99(window_ticks, column)
            for column, stem in TAIL_COLUMNS
            for window, window_ticks in (("first", first), ("last", last))
        },
        "server_cpu_ms_per_request_first": cpu_ms_per_request(first),
        "server_cpu_ms_per_request_last": cpu_ms_per_request(last),
        "canary_first_ms": canary_ms(first),
        "canary_last_ms": canary_ms(last),
        "checks": checks,
        "passed": all(checks.values()),
    }


def plot(ticks: list[Tick], rows: list[dict[str, Any]], verdict: dict[str, Any], path: Path) -> None:
    """RSS at every tick, p50 and p99 per minute, errors per minute; the warm-up and both p99 windows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_lat, ax_err) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    t_min = [t.t_s / 60 for t in ticks]
    ax_rss.plot(t_min, [t.rss_mb for t in ticks], color="tab:blue")
    ax_rss.axvspan(0, verdict["warmup_s"] / 60, color="grey", alpha=0.2, label="warm-up")
    ax_rss.set_ylabel("RSS, MB")
    ax_rss.legend(loc="lower right")
    row_t = [r["t_s"] / 60 for r in rows]
    ax_lat.plot(row_t, [r["p50_ms"] for r in rows], marker=".", label="p50")
    ax_lat.plot(row_t, [r["p99_ms"] for r in rows], marker=".", label="p99")
    ax_lat.plot(row_t, [r["service_p99_ms"] for r in rows], marker=".", label="p99, the service's whole time")
    ax_lat.plot(row_t, [r["model_p99_ms"] for r in rows], marker=".", label="p99, the service's model path")
    ax_lat.plot(row_t, [r["driver_lag_max_ms"] for r in rows], linestyle=":", label="driver's loop lag, max")
    duration_min = ticks[-1].t_s / 60 if ticks else 0.0
    warm, comp = verdict["warmup_s"] / 60, verdict["compare_s"] / 60
    ax_lat.axvspan(warm, warm + comp, color="tab:green", alpha=0.1, label="first window")
    ax_lat.axvspan(duration_min - comp, duration_min, color="tab:red", alpha=0.1, label="last window")
    ax_lat.set_ylabel("latency, ms")
    ax_lat.legend(loc="upper right")
    ax_err.bar(row_t, [r["errors"] for r in rows], width=0.6, color="tab:red")
    ax_err.set_ylabel("errors per minute")
    ax_err.set_xlabel("minutes")
    fig.suptitle(f"soak: {'passed' if verdict['passed'] else 'FAILED'} {verdict['checks']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


class NothingAnswered(Exception):
    """No request got a 200 before the soak: a service that refuses every one (401 with INTENT_API_KEY set, say)
    had been measured at a capacity of 0 and then offered nothing for the whole run."""


def warm_up(base: str, texts: list[str], seconds: float) -> dict[str, int]:
    """A few seconds closed-loop on the driver's 16 connections, so that the run starts on a warm service with its
    connections open (an open loop started cold read 130 ms in its first minute, most of it before the writes).
    Returns its answers by status."""
    return asyncio.run(closed_loop(base, min(2.0, seconds), texts, connections=16)).classes()


def measure_capacity(base: str, texts: list[str], seconds: float) -> tuple[float, dict[str, int]]:
    """Closed-loop peak (requests/s answered 200), after the warm-up, and the measurement's answers by status."""
    warm_up(base, texts, seconds)
    report = asyncio.run(closed_loop(base, seconds, texts, connections=16))
    return sum(1 for r in report.results if r.status == 200) / seconds, report.classes()


def require_answers(base: str, answers: dict[str, int]) -> None:
    """Raises NothingAnswered unless some request was answered 200."""
    if not answers.get("200"):
        seen = ", ".join(f"{status}: {n}" for status, n in answers.items()) or "none"
        raise NothingAnswered(f"{base} answered no request with 200 before the soak (answers: {seen})")


def next_tick(previous: float, tick_s: float, now: float) -> float:
    """When the tick after one due at `previous` is due: on a fixed grid, so that the time a tick spends reading the
    service does not push every later tick back (an hour of 5-s ticks each a few tens of ms late put 11 ticks, not
    12, in some minutes); a tick that ran past its successor's time restarts the grid from now."""
    due = previous + tick_s
    return due if due > now else now + tick_s


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


async def drive(
    base: str,
    rate: float,
    duration_s: float,
    texts: list[str],
    service: ServiceReader,
    tick_s: float,
    minute_s: float,
) -> tuple[list[Tick], list[dict[str, Any]]]:
    """Open loop at `rate` for `duration_s`; every `tick_s`, what came back since the last tick (then dropped,
    so that an hour of results does not pile up in memory) and the service's RSS and CPU (read off the event
    loop, so that a slow read does not hold the requests due meanwhile). A reading that fails (a remote service's
    /metrics not answering) counts as an error, and its tick repeats the last RSS. Prints each finished minute,
    and returns the ticks and the minutes' rows it printed."""
    report = Report()
    lag = LoopLag()
    steal = Steal()
    canary = Canary()
    last_rss = 0.0
    watcher = asyncio.create_task(lag.run())
    load = asyncio.create_task(open_loop(base, rate, duration_s, texts, connections=16, report=report))
    ticks: list[Tick] = []
    seen_lost = seen_refused = 0
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    summarised = 0  # ticks already printed as part of a minute's row

    def take(reading: Reading) -> None:
        nonlocal seen_lost, seen_refused, last_rss
        results = report.results[:]
        report.results.clear()  # nothing awaits between these two lines: no result is lost
        lost, refused = report.lost - seen_lost, report.connect_errors - seen_refused
        seen_lost, seen_refused = report.lost, report.connect_errors
        ok = np.array([r.latency_s * 1000 for r in results if r.status == 200], dtype=np.float32)
        model = np.array([r.server_ms for r in results if r.status == 200 and r.server_ms is not None], np.float32)
        timed = [(r.latency_s * 1000, r.service_ms) for r in results if r.status == 200 and r.service_ms is not None]
        service = np.array([spent for _, spent in timed], dtype=np.float32)
        outside = np.array([latency - spent for latency, spent in timed], dtype=np.float32)
        send_wait = np.array([r.send_wait_s * 1000 for r in results if r.status == 200], dtype=np.float32)
        errors = sum(1 for r in results if r.status != 200) + lost + refused + (reading.rss_mb is None)
        last_rss = last_rss if reading.rss_mb is None else reading.rss_mb
        t = time.perf_counter() - start
        requests = len(results) + lost + refused
        ticks.append(
            Tick(
                round(t, 2),
                last_rss,
                requests,
                errors,
                ok,
                lag.take_ms(),
                steal=steal.take(),
                model_ms=model,
                service_ms=service,
                outside_ms=outside,
                send_wait_ms=send_wait,
                server_cpu_s=reading.cpu_s,
                canary_ms=canary.take_ms(),
            )
        )

    def print_minutes(final: bool) -> None:
        nonlocal summarised
        if final:
            new, summarised = minute_rows(ticks[summarised:], minute_s), len(ticks)
        else:
            new, summarised = finished_minutes(ticks, summarised, minute_s)
        rows.extend(new)
        for row in new:
            print(
                f"  minute {row['minute']:>3}: RSS {row['rss_mb']:7.1f} MB  {row['requests']:>6} requests  "
                f"p50 {row['p50_ms']} ms  mean {row['mean_ms']} ms  p99 {row['p99_ms']} ms  errors {row['errors']}  "
                f"driver lag {row['driver_lag_max_ms']} ms  steal {_share(row['steal'])}  "
                f"service p99 {row['service_p99_ms']} ms  outside p99 {row['outside_p99_ms']} ms  "
                f"send wait p99 {row['send_wait_p99_ms']} ms  "
                f"model p99 {row['model_p99_ms']} ms  server CPU {row['server_cpu_ms_per_request']} ms/request  "
                f"canary {row['canary_ms']} ms",
                flush=True,
            )

    try:
        due = start + tick_s
        while not load.done():
            await asyncio.wait({load}, timeout=max(0.0, due - time.perf_counter()))
            take(await asyncio.to_thread(service.take))
            due = next_tick(due, tick_s, time.perf_counter())
            print_minutes(final=False)
        await load
    finally:
        watcher.cancel()
        await asyncio.wait({watcher})  # ended before the loop closes; a cancel of drive itself still goes through
    print_minutes(final=True)
    return ticks, rows


def run(
    minutes: float = 60.0,
    share: float = 0.5,
    workers: int = 2,
    rate: float | None = None,
    capacity_s: float = 5.0,
    warmup_s: float = WARMUP_S,
    compare_s: float = COMPARE_S,
    minute_s: float = 60.0,
    host: str | None = None,
) -> tuple[dict[str, Any], list[Tick]]:
    """Starts the service with `workers` and stops it after; or, with `host` (its base URL), drives one already
    running, which it reads through /metrics. The service's output goes to a temporary file whose last lines say why
    where it does not start (it had said only "server exited with 2"), removed after."""
    duration = minutes * 60
    tick_s = max(0.5, min(5.0, duration / 12))
    proc = log = None
    if host is None:
        port = free_port()
        cmd, env = our_server(port, workers)
        handle, name = tempfile.mkstemp(prefix="soak-server-", suffix=".log")
        log = Path(name)
        with os.fdopen(handle, "wb") as out:  # the server holds its own copy
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=out)
        base = f"http://127.0.0.1:{port}"
    else:
        base = host.rstrip("/")
    texts = load_queries()
    capacity = None
    try:
        wait_ready(base, proc, "/ready", 120, log)
        if rate is None:
            capacity, answers = measure_capacity(base, texts, capacity_s)
            rate = share * capacity
        else:
            answers = warm_up(base, texts, capacity_s)
        require_answers(base, answers)
        reader: ServiceReader = ProcessTree(proc.pid) if proc is not None else ScrapedService(base)
        print(f"soak: {duration / 60:g} min at {rate:.1f} req/s (capacity {capacity} req/s) on {base}", flush=True)
        ticks, rows = asyncio.run(drive(base, rate, duration, texts, reader, tick_s, minute_s))
    finally:
        if proc is not None:
            stop(proc)
        if log is not None:
            log.unlink(missing_ok=True)
    verdict = evaluate(ticks, duration, warmup_s, compare_s)
    result = {
        "minutes": minutes,
        "host": host,
        "workers": workers if host is None else None,
        "rss_of": reader.where,
        "capacity_rps": None if capacity is None else round(capacity, 1),
        "share": share if capacity is not None else None,
        "rate_rps": round(rate, 1),
        "requests": sum(t.requests for t in ticks),
        **verdict,
        "per_minute": rows,
        "rss_samples": [[t.t_s, round(t.rss_mb, 2)] for t in ticks],
    }
    return result, ticks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.soak", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--minutes",
        type=at_most(positive_float, MAX_MINUTES),
        default=60.0,
        help="length of the run (default: an hour)",
    )
    p.add_argument("--share", type=float, default=0.5, help="share of the measured capacity to offer")
    p.add_argument(
        "--rate",
        type=at_most(positive_float, MAX_RATE),
        default=None,
        help="a fixed rate (requests/s) instead of --share",
    )
    p.add_argument(
        "--workers",
        type=at_most(positive_int, MAX_WORKERS),
        default=2,
        help="workers of the service it starts (not with --host)",
    )
    p.add_argument(
        "--host",
        default=None,
        help="drive a service already running at this URL (on another machine, say) instead of starting one; "
        "its RSS and CPU come from its /metrics",
    )
    p.add_argument(
        "--capacity-seconds",
        type=at_most(positive_float, MAX_SECONDS),
        default=5.0,
        help="length of the capacity measurement",
    )
    p.add_argument("--out-dir", type=path_arg, default=ROOT / "reports", help="where soak.json and soak.png go")
    a = p.parse_args(argv)
    if not 0 < a.share <= 1:
        p.error("--share must be in (0, 1]")
    a.host = require_url(p, "--host", a.host, "http://10.0.0.5:8000")
    if a.host is not None and not a.host.startswith("http://"):
        p.error(f"--host must be an http:// URL: the load driver speaks plain HTTP, got {a.host!r}")
    require_writable_dir(p, "--out-dir", a.out_dir)  # now, not after the hour
    if a.host is not None and (problem := ready_problem(a.host)) is not None:
        print(f"error: {a.host} is not ready: {problem}", file=sys.stderr)
        return 2
    print(f"CPU: {current().describe()}", flush=True)
    try:
        result, ticks = run(a.minutes, a.share, a.workers, a.rate, a.capacity_seconds, host=a.host)
    except (NothingAnswered, ServerExited) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "soak.json").write_text(json.dumps({**result, "context": measurement_context()}, indent=2) + "\n")
    plot(ticks, result["per_minute"], result, a.out_dir / "soak.png")
    summary = {k: v for k, v in result.items() if k not in ("per_minute", "rss_samples")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {a.out_dir / 'soak.json'} and {a.out_dir / 'soak.png'}")
    print("soak:", "passed" if result["passed"] else f"FAILED {[k for k, v in result['checks'].items() if not v]}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
