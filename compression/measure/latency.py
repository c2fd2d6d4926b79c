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


def interleaved_p50_ms(fns: dict[str, Callable[[str], Any]], texts: list[str], rounds: int = 7) -> dict[str, float]:
    """Each function's p50 per call, as the median over `rounds` rounds of its p50 on `texts`, the functions
    taking turns within each round in an order that rotates. Timing them one after another lets the machine's
    drift (other tenants, frequency) fall on one of them: the quantize stage read two int8 graphs 1% apart in
    one run and 30% in the next; interleaved, three runs read them 1-2% apart while the machine drifted 25%."""
    names = list(fns)
    for name in names:
        latencies_ms(fns[name], texts[:50], warmup=0)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            per_round[name].append(float(np.percentile(latencies_ms(fns[name], texts, warmup=0), 50)))
    return {name: float(np.median(p)) for name, p in per_round.items()}
