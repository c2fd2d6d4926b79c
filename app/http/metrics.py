"""Prometheus metrics. Each app has its own registry; with several workers, the multiprocess collector."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
import resource
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# From 10 us up: a query spends well under a millisecond in each stage, and tokenizing one takes 20-50 us, which
# a lowest bucket of 50 us held whole (any quantile of it was interpolation, 25 us at the median whatever it was).
STAGE_BUCKETS = (
    1e-5,
    2e-5,
    3e-5,
    4e-5,
    5e-5,
    1e-4,
    2e-4,
    3e-4,
    5e-4,
    7.5e-4,
    1e-3,
    1.5e-3,
    2e-3,
    3e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
    0.1,
    0.25,
    1.0,
)
# Fine between 0.5 and 2 ms, where a healthy /predict lands, so server-side percentiles are precise.
REQUEST_BUCKETS = (
    1e-4,
    2.5e-4,
    5e-4,
    6e-4,
    7e-4,
    8e-4,
    9e-4,
    1e-3,
    1.1e-3,
    1.2e-3,
    1.3e-3,
    1.4e-3,
    1.5e-3,
    1.75e-3,
    2e-3,
    2.5e-3,
    3e-3,
    4e-3,
    5e-3,
    7.5e-3,
    1e-2,
    2e-2,
    5e-2,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# How often each worker writes its resident memory and CPU time into its metrics: a scrape reads values at most
# this old. In multiprocess mode prometheus_client has no process collector (each scrape is one worker's), so
# without these /metrics said nothing of a worker's memory, which a leak alert and `make soak --host` read.
WORKER_SAMPLE_S = 1.0
MODEL_INFO = "intent_model_info"


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def drop_gauges_of_a_reused_pid() -> None:
    """Remove the `live` gauge files named with this process's pid: a worker that died under the same pid (the
    kernel reuses them) left them, and a new worker opening them had started from its values. A gauge counted up and
    down (intent_in_flight_requests) then kept the dead worker's count as an offset for good. Called once, as a
    worker starts, before it creates any metric."""
    if (directory := multiprocess_dir()) is None:
        return
    for path in glob.glob(os.path.join(directory, f"gauge_live*_{os.getpid()}.db")):
        with contextlib.suppress(OSError):  # a scrape removed it first, as the owner is gone
            os.remove(path)


class WorkerFilesCollector(multiprocess.MultiProcessCollector):
    """prometheus_client's multiprocess collector, less the files that hold nothing yet, and less the gauges of
    workers that are gone.

    A worker creates each of its .db files empty and sizes it a moment later; a scrape that reads one in between
    fails whole (struct.error, prometheus/client_python#1199, open in 0.26), and a worker killed in that moment
    leaves the empty file, and the failure, for good. An empty file has recorded nothing, and a file never
    shrinks, so skipping the empty ones loses no count.

    uvicorn replaces a worker that dies or hangs, and on SIGHUP replaces every worker. A gauge says what a worker
    is doing now, so one that is gone must not count: its `live` gauge files are skipped and removed here, as
    `multiprocess.mark_process_dead` would remove them, because uvicorn's supervisor has no hook to call it.
    Without this, intent_ready read 0 for good after a SIGHUP (the old workers' last value) while every worker
    served, and intent_model_info kept a dead worker's version beside the one a later reload installed. Counters
    and histograms keep a gone worker's counts, so totals never fall."""

    def collect(self) -> Iterable[Any]:
        files = []
        for f in glob.glob(os.path.join(self._path, "*.db")):
            pid = _live_gauge_owner(f)
            if pid is not None and not _running(pid):
                # Another worker's scrape may remove it first, and a file that stays is skipped all the same.
                with contextlib.suppress(OSError):
                    os.remove(f)
            elif _holds_anything(f):
                files.append(f)
        merged: Iterable[Any] = self.merge(files, accumulate=True)  # type: ignore[no-untyped-call]
        return merged


_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def _live_gauge_owner(path: str) -> int | None:
    """The worker's pid in a `live` gauge's file name (gauge_livesum_1234.db), else None."""
    found = _LIVE_GAUGE_FILE.fullmatch(os.path.basename(path))
    return int(found.group(1)) if found else None


def _running(pid: int) -> bool:
    """Whether a process `pid` exists. The workers share one PID namespace (a container's, or the host's). A worker
    that has died counts until its supervisor reaps it, a moment later."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _holds_anything(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except FileNotFoundError:  # removed since the listing: it holds nothing now either
        return False


class ServedVersionsOnly(Collector):
    """`source`'s metrics, less the intent_model_info series at 0: the versions a reload replaced.

    A reload sets the replaced version's series to 0 and the new one's to 1. An info metric's series should go
    instead, but a multiprocess gauge cannot remove one (prometheus_client 0.26's `Gauge.remove` warns and leaves
    it in the worker's file), so every version a worker had served read 0 beside the one it serves, one more
    series per reload. A version some live worker still serves (during a rollout) reads 1 and stays."""

    def __init__(self, source: Collector) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        for metric in self._source.collect():  # each scrape builds its metrics anew: filtering them changes no state
            if metric.name == MODEL_INFO:
                metric.samples = [sample for sample in metric.samples if sample.value != 0]
            yield metric


def resident_bytes() -> int | None:
    """This process's resident memory (Linux's /proc/self/statm), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "intent_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "intent_request_duration_seconds",
            "Server-side time from request arrival to response, by route and status",
            ["route", "status"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "intent_stage_duration_seconds",
            "Time per query in each stage: tokenize, queue (admission to inference), inference",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram("intent_batch_size", "Texts per request", buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "intent_in_flight_requests",
            "Requests admitted and not yet answered",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter("intent_rejected", "Requests refused, by reason", ["reason"], registry=r)
        self.predictions = Counter("intent_predictions", "Predicted intents", ["intent"], registry=r)
        self.answered_by = Counter(
            "intent_answered_by", "Queries by the model of the served path that answered them", ["stage"], registry=r
        )
        self.keep_warm = Counter(
            "intent_keep_warm_queries", "Queries run only to keep caches warm (INTENT_KEEP_WARM_MS)", registry=r
        )
        self.truncated = Counter("intent_truncated_texts", "Texts cut to the model's token window", registry=r)
        self.model_info = Gauge(
            MODEL_INFO,
            "The served model and its OOS rule",
            ["version", "name", "oos_rule"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.reloads = Counter(
            "intent_model_reloads", "Model reloads in this worker, by result (ok, rejected)", ["result"], registry=r
        )
        self.ready = Gauge("intent_ready", "1 when the worker serves traffic", registry=r, multiprocess_mode="livemin")
        # One series per live worker (a `pid` label) with several workers: a worker that grows shows as itself.
        self.resident = Gauge(
            "intent_worker_resident_bytes",
            f"Resident memory of each worker process, sampled every {WORKER_SAMPLE_S:g} s",
            registry=r,
            multiprocess_mode="liveall",
        )
        # Set when the worker is sampled, not as texts come and go: in multiprocess mode each set writes the worker's
        # file (about 2 us), which a queued request would have paid twice or more.
        self.queue_depth = Gauge(
            "intent_queue_depth",
            f"Texts queued or being classified, summed over the workers, sampled every {WORKER_SAMPLE_S:g} s",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_pending: Callable[[], int] = lambda: 0  # the inference queue puts its count here
        # Summed over the workers, gone ones included, as every counter is: rate() is the service's CPU in cores.
        self.cpu = Counter("intent_worker_cpu_seconds", "CPU time (user and system) the workers have used", registry=r)
        self._cpu_counted = 0.0  # of this process's CPU time, what the counter holds
        self.sample_worker()  # at once: a gauge reads 0 until set, and the model's load comes before the sampler
        self.tokenize = self.stage.labels("tokenize")
        self.queue = self.stage.labels("queue")
        self.inference = self.stage.labels("inference")
        # labels() hashes and locks on every call; the label sets here are small and fixed (known
        # routes, HTTP methods, status codes, the model's intents), so each child is looked up once.
        self._request_children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._intent_children: dict[str, Any] = {}
        self._stage_children: dict[str, Any] = {}

    def observe_request(self, route: str, method: str, status: str, seconds: float) -> None:
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(route, method, status), self.latency.labels(route, status))
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def count_request(self, route: str, method: str, status: str) -> None:
        """A request counted and not timed: one that nothing answered (the client left before its body was whole)."""
        self.requests.labels(route, method, status).inc()

    def count_prediction(self, intent: str, stage: str = "transformer") -> None:
        child = self._intent_children.get(intent)
        if child is None:
            child = self._intent_children[intent] = self.predictions.labels(intent)
        child.inc()
        by = self._stage_children.get(stage)
        if by is None:
            by = self._stage_children[stage] = self.answered_by.labels(stage)
        by.inc()

    def sample_worker(self) -> None:
        """Write this worker's queue depth, resident memory, and the CPU time it has used since the last sample."""
        self.queue_depth.set(self.queue_pending())
        usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process
        used = usage.ru_utime + usage.ru_stime
        self.cpu.inc(max(0.0, used - self._cpu_counted))
        self._cpu_counted = max(used, self._cpu_counted)
        rss = resident_bytes()
        if rss is not None:
            self.resident.set(rss)

    async def sample_worker_every(self, seconds: float = WORKER_SAMPLE_S) -> None:
        """`sample_worker` now and every `seconds` until cancelled: the lifespan runs it in each worker."""
        while True:
            self.sample_worker()
            await asyncio.sleep(seconds)

    def exposition(self) -> bytes:
        directory = multiprocess_dir()
        if directory:
            merged = CollectorRegistry()
            WorkerFilesCollector(merged, path=directory)  # type: ignore[no-untyped-call]
            return generate_latest(ServedVersionsOnly(merged))
        return generate_latest(ServedVersionsOnly(self.registry))
