"""The framework's cost per request, in process: the ASGI app driven directly (no sockets, no
client) with an instant classifier, so all that is timed is routing, parsing, validation,
metrics and the response.

    python -m loadtest.overhead

It compares POST /predict on the service middleware's direct path with the same request through
FastAPI's router (which CORS forces), and GET /health, which always goes through the router.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from app.config import Settings
from app.cpu import current
from app.engine.engine import Prediction
from app.http.main import create_app

BODY = b'{"text": "book a flight to rome"}'


class InstantClassifier:
    def __init__(self) -> None:
        self.labels = ["book_flight", "oos"]
        self.version = "instant"

    def predict(self, text: str, top_k: int = 0) -> Prediction:
        return Prediction(intent="book_flight", confidence=0.9)

    def warm(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _factory(settings: Settings) -> tuple[InstantClassifier, dict[str, Any]]:
    clf = InstantClassifier()
    return clf, {"version": clf.version, "labels": clf.labels}


def _scope(method: str, path: str, body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }


async def _call(app: Any, method: str, path: str, body: bytes) -> int:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    status = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(_scope(method, path, body), receive, send)
    return status


async def _median_us(app: Any, method: str, path: str, body: bytes, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        status = await _call(app, method, path, body)
        times.append(time.perf_counter() - start)
        if status != 200:
            raise SystemExit(f"{method} {path} answered {status}")
    return statistics.median(times) * 1e6


async def measure(n: int, rounds: int) -> dict[str, list[float]]:
    direct = create_app(Settings(warmup_queries=0), _factory)
    routed = create_app(Settings(warmup_queries=0, cors_origins=["https://example.org"]), _factory)
    cases = [
        ("POST /predict, direct path", direct, "POST", "/predict", BODY),
        ("POST /predict, FastAPI route (CORS on)", routed, "POST", "/predict", BODY),
        ("GET /health, FastAPI route", direct, "GET", "/health", b""),
    ]
    results: dict[str, list[float]] = {name: [] for name, *_ in cases}
    async with direct.router.lifespan_context(direct), routed.router.lifespan_context(routed):
        for _, app, method, path, body in cases:  # warm-up
            await _median_us(app, method, path, body, n // 5)
        for _ in range(rounds):  # interleaved rounds, so drift on a noisy machine hits every case alike
            for name, app, method, path, body in cases:
                results[name].append(await _median_us(app, method, path, body, n))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000, help="requests per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {current().describe()}", flush=True)
    results = asyncio.run(measure(args.requests, args.rounds))
    print("| request | median µs per round | best |")
    print("|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {' / '.join(f'{v:.1f}' for v in values)} | {min(values):.1f} |")


if __name__ == "__main__":
    main()
