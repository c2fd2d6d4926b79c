"""What the machine did while a load ran, read beside the latencies so that a slow stretch can be placed: the
hypervisor's steal, the CPU seconds the service used, and the CPU time a fixed piece of work takes (the
machine's own speed, which a noisy neighbour changes without any steal)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from loadtest.procs import cpu_seconds


class Steal:
    """The share of all the vCPUs' time that the hypervisor gave to others since the last call (the `steal` column
    of /proc/stat), None where the kernel does not report it. A p99 that rises while this does is the host's. One
    that rises while it stays at zero is not the hypervisor taking the vCPUs away, though a neighbour can still
    slow them (the Canary)."""

    def __init__(self, path: Path = Path("/proc/stat")) -> None:
        self.path = path
        self._last = self._read()

    def _read(self) -> tuple[float, float] | None:
        """(steal, all) jiffies summed over the CPUs, or None."""
        try:
            fields = self.path.read_text().split("\n", 1)[0].split()
        except OSError:
            return None
        if len(fields) < 9 or fields[0] != "cpu":
            return None
        jiffies = [float(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
        return jiffies[7], sum(jiffies)

    def take(self) -> float | None:
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return (now[0] - last[0]) / (now[1] - last[1])


class ServerCpu:
    """The CPU seconds a process tree used since the last call. Counted per process, so that a worker that exits
    takes only its own time out, and one that starts counts from zero."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._last = cpu_seconds(pid)

    def take(self) -> float:
        now, last = cpu_seconds(self.pid), self._last
        self._last = now
        return sum(max(0.0, used - last.get(p, 0.0)) for p, used in now.items())


class Canary:
    """The CPU time (this thread's, so preemption does not count) that one fixed piece of work takes: a pass over
    `megabytes` of memory, larger than a core's L2, and `steps` of interpreter work, the two kinds of work the
    service does. On one machine it should not move; if it rises with the service's CPU per request, the machine
    got slower (a neighbour on the shared caches, memory or the core's other thread), not the service. It costs
    about 1 ms a call (0.75 ms idle, 0.93-1.25 under the soak's load, on an AMD EPYC with AVX-512 VNNI), run on
    the caller's thread."""

    def __init__(self, megabytes: int = 4, steps: int = 20_000) -> None:
        self._memory = np.ones(megabytes * 2**20 // 8)
        self.steps = steps

    def take_ms(self) -> float:
        began = time.thread_time()
        total = float(self._memory.sum())
        for step in range(self.steps):
            total += step
        return (time.thread_time() - began) * 1000
