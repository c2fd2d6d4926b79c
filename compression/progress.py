"""Where a factory run is, in its log lines: the stage that is running and its place in the run (`[distill
3/11]`), and for a training loop, its step, share done and time left."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

_STAGE = contextvars.ContextVar("stage", default="-")
FORMAT = "%(asctime)s [%(stage)s] %(name)s %(message)s"


class StageFilter(logging.Filter):
    """Gives every record the running stage (`%(stage)s` in FORMAT)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.stage = _STAGE.get()
        return True


@contextlib.contextmanager
def stage(name: str, number: int, of: int) -> Iterator[None]:
    """Log lines inside are marked with the stage and its place in the run."""
    token = _STAGE.set(f"{name} {number}/{of}")
    try:
        yield
    finally:
        _STAGE.reset(token)


def time_left(done: int, total: int, elapsed_s: float) -> str:
    """The rest of the work at the pace so far, in words: "3 min 20 s left"."""
    if done <= 0 or total <= done:
        return "0 s left" if total <= done else "time left unknown"
    left = round(elapsed_s / done * (total - done))
    minutes, seconds = divmod(left, 60)
    return f"{minutes} min {seconds} s left" if minutes else f"{seconds} s left"


def every(total: int) -> int:
    """How many steps between two progress lines: about twenty in a run, at most 100 steps apart."""
    return max(1, min(100, total // 20))
