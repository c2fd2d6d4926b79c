"""The keep-warm thread's priority and arguments (its behaviour in the queue: tests/test_inference_queue.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest

from app.http import keep_warm
from app.http.keep_warm import KeepWarm, lower_priority


def _in_a_thread(fn: Callable[[], str]) -> tuple[str, int, int]:
    """`fn()` in a fresh thread: what it said, and the policy and nice value that thread then had."""
    out: list[tuple[str, int, int]] = []

    def body() -> None:
        said = fn()
        tid = threading.get_native_id()
        out.append((said, os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, tid)))

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    assert out, "the thread did not finish"
    return out[0]


def test_the_thread_runs_at_idle_priority_and_only_that_thread() -> None:
    said, policy, _ = _in_a_thread(lower_priority)
    assert (said, policy) == ("SCHED_IDLE", os.SCHED_IDLE)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's own thread is untouched


def test_nice_19_where_idle_scheduling_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError("not allowed here")

    monkeypatch.setattr(keep_warm.os, "sched_setscheduler", refuse)
    said, policy, nice = _in_a_thread(lower_priority)
    assert (said, policy, nice) == ("nice 19", os.SCHED_OTHER, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19


@pytest.mark.parametrize(("period_s", "texts"), [(0.0, ("a",)), (-1.0, ("a",)), (0.01, ())])
def test_a_period_and_a_text_are_required(period_s: float, texts: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="positive period and at least one text"):
        KeepWarm(period_s, lambda _: True, lambda _: None, texts, lambda: None)


def test_no_throw_away_query_when_the_thread_wakes_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """A late wake-up means other work holds the CPU: the thread then skips its turn rather than risk being
    preempted while it holds the GIL the event loop needs."""
    reads: list[float] = []

    class LateClock:
        """Each reading a second after the one before: every wait looks far longer than asked."""

        def monotonic(self) -> float:
            reads.append(float(len(reads)))
            return reads[-1]

    monkeypatch.setattr(keep_warm, "time", LateClock())
    warmed: list[str] = []
    looked: list[float] = []

    def idle(seconds: float) -> bool:
        looked.append(seconds)
        return True

    kw = KeepWarm(0.001, idle, warmed.append, ("a",), lambda: None).start()
    pause = threading.Event()  # never set: a sleep that a busy machine cannot shorten or skip
    for _ in range(3000):  # up to 30 s: an idle-priority thread waits for a free CPU
        if len(reads) >= 20:
            break
        pause.wait(0.01)
    kw.stop()
    assert len(reads) >= 20  # the loop kept turning,
    assert (warmed, looked) == ([], [])  # and never asked whether the queue was idle, nor warmed
