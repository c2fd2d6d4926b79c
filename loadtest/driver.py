"""A small, fast HTTP/1.1 keep-alive load driver on raw asyncio streams, for overload, shutdown and
soak runs that must be scripted tightly. Plain HTTP, to any host: a soak drives a service on another machine
(`--host`); what reads a service's processes on this machine (loadtest.service_readings.ProcessTree) is used only for
one the run started itself.

Open loop: requests are scheduled at a fixed rate and handed to a pool of connections; latency
is measured from the scheduled time, so a server that falls behind cannot hide it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np


@dataclass
class Result:
    status: int
    latency_s: float
    retry_after: bool
    body: bytes
    server_ms: float | None = None  # the service's model path for it (its server-timing), where it says
    service_ms: float | None = None  # the service's whole time for it (`service` in its server-timing)
    # From the time it was due to the driver's writing it: the driver's own lateness (its event loop held or its
    # process not running), or a wait for a free connection while all of them were busy.
    send_wait_s: float = 0.0


# A quoted string (RFC 9110's, with backslash escapes; an unterminated one runs to the end) may hold commas and
# semicolons, which separate entries and parameters only outside one: `desc="a, b; c"` is one parameter.
_QUOTED = re.compile(r'"(?:\\.|[^"\\])*"?')


def server_timings(header: str | None) -> dict[str, float]:
    """A server-timing header's durations by name (ours: `tokenize` and `inference`, the model path, and
    `service`, the service's whole time for the request), skipping any entry without a number."""
    out: dict[str, float] = {}
    # A quoted duration is not read: the grammar has none.
    text = _QUOTED.sub('""', header) if header and '"' in header else header or ""
    for entry in text.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            if param.startswith("dur="):
                with contextlib.suppress(ValueError):
                    out[name] = out.get(name, 0.0) + float(param[4:])
    return out


MODEL_PATH = ("tokenize", "inference")


def model_path_ms(timings: dict[str, float]) -> float | None:
    """The service's model path (tokenize and inference) from a header's durations, or None where it gives
    neither."""
    spent = [timings[name] for name in MODEL_PATH if name in timings]
    return sum(spent) if spent else None


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    connect_errors: int = 0  # never accepted (refused): the request was not sent
    lost: int = 0  # sent on an open connection, but no response came back
    scheduled: int = 0

    def classes(self) -> dict[str, int]:
        out = dict(Counter(str(r.status) for r in self.results))
        if self.connect_errors:
            out["refused"] = self.connect_errors
        if self.lost:
            out["lost"] = self.lost
        return out

    def latency_ms(self, status: int | None = 200) -> dict[str, float | None]:
        lat = [r.latency_s * 1000 for r in self.results if status is None or r.status == status]
        if not lat:
            return {"mean": None, "p50": None, "p99": None, "max": None}
        arr = np.asarray(lat)
        return {
            "mean": round(float(arr.mean()), 3),
            "p50": round(float(np.percentile(arr, 50)), 3),
            "p99": round(float(np.percentile(arr, 99)), 3),
            "max": round(float(arr.max()), 3),
        }


class Refused(Exception):
    """The connection could not be opened: the request never reached the server."""


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.refused = False  # set on the replacement for a connection that could not be opened

    async def request(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None or self.writer.is_closing():
            try:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            except OSError as exc:
                raise Refused(str(exc)) from None
        assert self.reader is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)}
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.writer.close()
            self.writer = None
        return status, headers, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def http_target(base_url: str) -> tuple[str, int]:
    """(host, port) of the target, refusing a URL that is not plain http: the driver writes HTTP/1.1 on a bare
    socket, with no TLS."""
    url = urlparse(base_url)
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"the load driver speaks plain HTTP only, got {base_url!r}")
    return url.hostname, url.port or 80


async def exchange(conn: Connection, raw: bytes, since: float, report: Report) -> Connection:
    """Send one request and record the outcome; returns the connection to use next."""
    sending = time.perf_counter()
    try:
        status, headers, body = await conn.request(raw)
    except Refused:
        report.connect_errors += 1
        fresh = Connection(conn.host, conn.port)
        fresh.refused = True
        return fresh
    except (OSError, asyncio.IncompleteReadError, ValueError):
        report.lost += 1
        conn.close()
        return Connection(conn.host, conn.port)
    latency = time.perf_counter() - since
    timings = server_timings(headers.get("server-timing"))
    model, service = model_path_ms(timings), timings.get("service")
    report.results.append(Result(status, latency, "retry-after" in headers, body, model, service, sending - since))
    return conn


def predict_request(
    host: str,
    text: str,
    close: bool = False,
    batch: int = 1,
    rng: random.Random | None = None,
    texts: list[str] | None = None,
) -> bytes:
    """POST /predict, or /predict/batch with `batch` texts (drawn from `texts`) when batch > 1."""
    path = "/predict"
    if batch > 1 and texts and rng:
        body = json.dumps({"texts": [rng.choice(texts) for _ in range(batch)]}).encode()
        path = "/predict/batch"
    else:
        body = json.dumps({"text": text}).encode()
    extra = "Connection: close\r\n" if close else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def open_loop(
    base_url: str,
    rate: float,
    seconds: float,
    texts: list[str],
    connections: int = 64,
    seed: int = 0,
    batch: int = 1,
    report: Report | None = None,
) -> Report:
    """Offer `rate` requests/s for `seconds`, on at most `connections` keep-alive connections. Results go
    into `report` if given, as they come in (a long run can read and clear them as it goes)."""
    host, port = http_target(base_url)
    rng = random.Random(seed)
    report = report if report is not None else Report()
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def worker() -> None:
        conn = Connection(host, port)
        try:
            while (item := await queue.get()) is not None:
                scheduled, raw = item
                conn = await exchange(conn, raw, scheduled, report)
        finally:
            conn.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    start = time.perf_counter()
    n = int(rate * seconds)
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((due, predict_request(host, rng.choice(texts), batch=batch, rng=rng, texts=texts)))
    report.scheduled = n
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    return report


async def closed_loop(
    base_url: str,
    seconds: float,
    texts: list[str],
    connections: int = 16,
    close_each: bool = False,
    stop: asyncio.Event | None = None,
    batch: int = 1,
) -> Report:
    """As fast as `connections` concurrent clients can go: measures saturation throughput."""
    host, port = http_target(base_url)
    report = Report()
    deadline = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        conn, rng = Connection(host, port), random.Random(k)
        try:
            while time.perf_counter() < deadline and not (stop and stop.is_set()):
                raw = predict_request(host, rng.choice(texts), close_each, batch=batch, rng=rng, texts=texts)
                conn = await exchange(conn, raw, time.perf_counter(), report)
                if conn.refused:
                    await asyncio.sleep(0.01)  # the server is gone or full: do not spin
        finally:
            conn.close()

    await asyncio.gather(*(worker(k) for k in range(connections)))
    report.scheduled = len(report.results)
    return report
