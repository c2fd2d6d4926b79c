"""Where a request's server time goes at a given arrival rate: mean tokenize, queue wait, inference and
whole-request time from the server's own histograms, over an open-loop run per rate.

    python -m loadtest.stages --rates 100,800,100

Run the client on another core than the server (the defaults do) so that only the server is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import urllib.request

from app.cpu import current
from loadtest.cli_args import MAX_SECONDS, at_most, cpu_list, path_arg, positive_float, positive_floats
from loadtest.driver import open_loop
from loadtest.queries import QueryError, load_queries
from loadtest.server import free_port, our_server, pinned, serve

_STAGE = re.compile(r'^intent_stage_duration_seconds_(sum|count)\{stage="(\w+)"\} (\S+)$', re.M)
_REQUEST = re.compile(r'^intent_request_duration_seconds_(sum|count)\{route="/predict",status="200"\} (\S+)$', re.M)
PARTS = ("tokenize", "queue", "inference", "request")


def totals(base_url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as r:  # noqa: S310 - loopback only
        text = r.read().decode()
    out = {(m[2], m[1]): float(m[3]) for m in _STAGE.finditer(text)}
    out.update({("request", m[1]): float(m[2]) for m in _REQUEST.finditer(text)})
    return out


def mean_ms(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], part: str) -> float | None:
    n = after.get((part, "count"), 0.0) - before.get((part, "count"), 0.0)
    if n <= 0:
        return None
    return round((after[(part, "sum")] - before.get((part, "sum"), 0.0)) / n * 1000, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=positive_floats, default="100,800,100")
    p.add_argument("--seconds", type=at_most(positive_float, MAX_SECONDS), default=8.0)
    p.add_argument("--server-cpus", type=cpu_list, default="0")
    p.add_argument("--data", type=path_arg, default=None, help="CLINC150 JSON whose validation texts are sent")
    p.add_argument("--log", type=path_arg, default=None)
    a = p.parse_args(argv)
    try:
        texts = load_queries(a.data)
    except QueryError as exc:
        p.error(str(exc))
    print(f"CPU: {current().describe()}", flush=True)
    port = free_port()
    cmd, env = our_server(port, workers=1)
    print(f"server: 1 worker, {' '.join(pinned([], a.server_cpus)) or 'unpinned'}")
    print("| rate /s | tokenize ms | queue ms | inference ms | whole request ms |")
    print("|---|---|---|---|---|")
    with serve(cmd, env, port, a.server_cpus or None, log=a.log) as base:
        for rate in a.rates:
            before = totals(base)
            asyncio.run(open_loop(base, rate, a.seconds, texts, connections=8))
            after = totals(base)
            print(f"| {rate:.0f} | " + " | ".join(str(mean_ms(before, after, part)) for part in PARTS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
