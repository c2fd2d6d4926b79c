"""Exact percentiles from every recorded response time, and the server's own view from /metrics."""

from __future__ import annotations

import math
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}
# The normal approximation of the binomial that `quantile_interval` leans on wants a rank spread of a few samples:
# for the p99 that takes 405 or more responses (a 10 s step at 100/s gives 1,000).
MIN_RANK_SD = 2.0


def percentiles_ms(times_ms: list[float]) -> dict[str, float | None]:
    """The mean and exact percentiles of every recorded time. The mean is given beside the median because a cascade's
    median can hide it: where an early stage answers most rows, the p50 is that stage's time alone."""
    summary: dict[str, float | None] = dict.fromkeys(["mean", *PERCENTILES])
    if times_ms:
        arr = np.asarray(times_ms)
        summary["mean"] = round(float(arr.mean()), 4)
        summary.update({k: round(float(np.percentile(arr, q)), 4) for k, q in PERCENTILES.items()})
    return summary


def quantile_interval(times_ms: list[float], q: float, z: float = 1.96) -> list[float] | None:
    """A distribution-free 95% interval for the q-quantile (0 < q < 1) of what was sampled: the order statistics at
    ranks n q -/+ z sqrt(n q (1 - q)), as the count of samples under the true quantile is binomial(n, q). From 1,000
    responses it runs from about the 17th- to the 3rd-largest. It covers sampling alone: a second run under other
    conditions (a busier host, a colder CPU) can read outside it. None with too few samples for the approximation."""
    n = len(times_ms)
    spread = math.sqrt(n * q * (1.0 - q))
    if spread < MIN_RANK_SD:
        return None
    ordered = np.sort(np.asarray(times_ms))
    low = max(0, math.floor(n * q - z * spread))
    high = min(n - 1, math.ceil(n * q + z * spread))
    return [round(float(ordered[low]), 4), round(float(ordered[high]), 4)]


def scrape_buckets(base_url: str, route: str = "/predict") -> dict[float, float]:
    """Cumulative bucket counts of the request-duration histogram for one route (all statuses)."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=5) as r:  # noqa: S310 - loopback
        text = r.read().decode()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "intent_request_duration_seconds":
            continue
        for s in family.samples:
            if s.name.endswith("_bucket") and s.labels.get("route") == route:
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    return buckets


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile over the difference of two scrapes: linear within a bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            width = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / width if width else 0.0)
        prev_bound, prev_count = bound, count
    return prev_bound
