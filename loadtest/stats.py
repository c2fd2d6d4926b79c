"""Exact percentiles from every recorded response time, and the server's own view from /metrics."""

from __future__ import annotations

import math
import urllib.request

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99_9": 99.9}


def percentiles_ms(times_ms: list[float]) -> dict[str, float | None]:
    if not times_ms:
        return {k: None for k in PERCENTILES}
    arr = np.asarray(times_ms)
    return {k: round(float(np.percentile(arr, q)), 4) for k, q in PERCENTILES.items()}


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
