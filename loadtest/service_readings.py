"""The service's memory and CPU, read once per soak tick: from its process tree where the soak started it, or from
its /metrics where it runs elsewhere (`make soak SOAK_ARGS="--host URL"`), so that the driver can run on another
machine and leave the service's cores to the service."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from typing import Protocol

from loadtest.host import ServerCpu
from loadtest.procs import rss_mb

# The service's own metrics (app/http/metrics.py): each worker's resident memory, and the workers' CPU seconds.
RESIDENT = "intent_worker_resident_bytes"
CPU = "intent_worker_cpu_seconds_total"


@dataclass(frozen=True)
class Reading:
    rss_mb: float | None  # None: nothing could be read
    cpu_s: float | None  # CPU seconds since the last reading; None for the first, or where it could not be read


class ServiceReader(Protocol):
    where: str  # what the RSS covers, for the report

    def take(self) -> Reading: ...


class ProcessTree:
    """A service on this machine: its process tree's RSS (the supervisor and every worker) and CPU time."""

    where = "the process tree (supervisor and workers), /proc"

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._cpu = ServerCpu(pid)

    def take(self) -> Reading:
        return Reading(rss_mb(self.pid), self._cpu.take())


def metric_sum(text: str, name: str) -> float | None:
    """The sum of one metric's samples over every label set in a Prometheus exposition, or None if it has none.
    A line scan: the exposition is read in the driver's process, and a full parse holds its interpreter longer."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            found = True
    return total if found else None


class ScrapedService:
    """A service read through its /metrics: the RSS summed over its live workers and the CPU seconds they used since
    the last reading. The supervisor and multiprocessing's resource tracker are not in it: 79 and 13 MB of a
    2-worker service's 384 on this project's AMD EPYC, neither of them growing."""

    where = "the workers, from /metrics (intent_worker_resident_bytes)"

    def __init__(self, base: str, timeout_s: float = 5.0) -> None:
        self.url = base.rstrip("/") + "/metrics"
        self.timeout_s = timeout_s
        self._cpu: float | None = None
        self.take()  # the CPU counter's starting point, as ProcessTree takes its own

    def take(self) -> Reading:
        try:
            with urllib.request.urlopen(self.url, timeout=self.timeout_s) as r:  # noqa: S310 - the URL the user gave
                text = r.read().decode()
        except (OSError, ValueError):
            return Reading(None, None)
        resident, cpu = metric_sum(text, RESIDENT), metric_sum(text, CPU)
        used = None if cpu is None or self._cpu is None else max(0.0, cpu - self._cpu)
        if cpu is not None:
            self._cpu = cpu
        return Reading(None if resident is None else resident / 2**20, used)
