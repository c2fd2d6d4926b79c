"""Per-call wall time, the way every latency figure of the factory is taken."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def latencies_ms(fn: Callable[[str], Any], texts: list[str], warmup: int = 50) -> np.ndarray:
    """Per-call wall time of fn(text) in milliseconds, after `warmup` untimed calls."""
    for t in texts[:warmup]:
        fn(t)
    times = np.empty(len(texts))
    for i, t in enumerate(texts):
        start = time.perf_counter()
        fn(t)
        times[i] = (time.perf_counter() - start) * 1000
    return times
