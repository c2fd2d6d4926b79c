"""Keep-warm: between sparse requests, throw-away queries keep every stage's weights in the CPU's caches.

They run in a thread of their own at the kernel's idle priority, not on the event loop. A throw-away query on the
loop holds up every request that arrives while it runs (the served cascade's transformer takes 0.6-0.9 ms), which
cost more at the tail than the warm caches saved (docs/one-small-model.md). A SCHED_IDLE thread is preempted as
soon as the loop has work, and ONNX Runtime releases the GIL while it runs and lets two runs share a session. The
price is CPU time the machine had spare: most of a core for each idle worker at a short period, which a CPU-based
autoscaler would read as load. And it is for cores with nothing else to do: a lowest-priority thread that holds
the GIL when it is preempted stalls the loop until a CPU is free for it, so the thread skips its turn when it
wakes late, which is what a busy CPU does to it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)
# A wake-up this much later than asked means the CPU was busy with other work: on this project's AMD EPYC VM the
# thread's 0.5 ms waits came back 0.125 ms late at the p99 on an idle core, and 19.5 ms at the median beside a
# training job.
BUSY_LATE_S = 0.001


def lower_priority() -> str:
    """Put the calling thread at SCHED_IDLE where the OS has it (Linux), else at nice 19; which one it got."""
    tid = threading.get_native_id()
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError:  # a sandbox that forbids it: nice is the next best
            pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except OSError:
        return "unchanged"
    return "nice 19"


class KeepWarm:
    """Every `period_s`, if `idle(period_s)` holds, `warm` one of `texts` (in turn) and call `on_warm`. The first
    failure stops it: real requests report a faulty model themselves."""

    def __init__(
        self,
        period_s: float,
        idle: Callable[[float], bool],
        warm: Callable[[str], None],
        texts: Sequence[str],
        on_warm: Callable[[], None],
    ) -> None:
        if period_s <= 0 or not texts:
            raise ValueError("keep-warm needs a positive period and at least one text")
        self.period_s = period_s
        self._idle, self._warm, self._texts, self._on_warm = idle, warm, tuple(texts), on_warm
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keep-warm", daemon=True)

    def start(self) -> KeepWarm:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 1.0) -> None:
        """Stop, and wait a little for a throw-away query in progress, so the model can be closed after. Not longer:
        on a machine busy with other work this thread may wait seconds for the CPU, and shutdown should not; a
        query still running when the model closes fails, and the thread ends on that failure."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        lower_priority()
        i = 0
        while True:
            asleep = time.monotonic()
            if self._stopping.wait(self.period_s):
                return
            if time.monotonic() - asleep > self.period_s + BUSY_LATE_S:
                # Woken late: other work holds the CPU, and a thread of the lowest priority that is preempted while
                # it holds the GIL stalls the event loop until the CPU is free again. Warm only a free CPU.
                continue
            if not self._idle(self.period_s):
                continue
            try:
                self._warm(self._texts[i % len(self._texts)])
            except Exception as exc:  # noqa: BLE001 - stop quietly; requests see the fault themselves
                log.warning("keep-warm stopped: the model failed", extra={"error_type": type(exc).__name__})
                return
            self._on_warm()
            i += 1
