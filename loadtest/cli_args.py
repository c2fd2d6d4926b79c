"""Argument checks the load-test CLIs share (loadtest.run, loadtest.compare, loadtest.soak): each bad value is
refused by argparse in one line, naming its option, before any server starts or anything is measured.

The `type=` functions raise argparse.ArgumentTypeError, which argparse reports as
"error: argument --rate: must be a positive, finite number, got 'nan'"; the checks of a parsed value
(`require_url`, `require_writable_dir`) call the parser's own error.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from compression.writable import dir_write_problem

N = TypeVar("N", int, float)

# Bounds far beyond any real run: a huge value (`--minutes 1e308`) overflowed, or made a file name too long, where it
# became a count of requests, a timeout or a directory, after the server had started.
MAX_RATE = 100_000  # requests/s
MAX_USERS = 10_000
MAX_SECONDS = 86_400  # a day, for one phase
MAX_MINUTES = 10_080  # a week
MAX_WORKERS = 64


def positive_float(text: str) -> float:
    """A number above 0 and finite: `nan` passes every `<= 0` check, and `inf` minutes never end."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def at_most(parse: Callable[[str], N], most: float) -> Callable[[str], N]:
    """`parse`, refusing a value over `most`."""

    def parse_at_most(text: str) -> N:
        value = parse(text)
        if value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:g}, got {text!r}")
        return value

    return parse_at_most


def _comma_list(text: str, parse: Callable[[str], N], what: str, most: float, empty: bool = False) -> list[N]:
    """Each comma-separated item of `text` through `parse`, none over `most`; empty items are skipped. A list with
    no item is refused unless `empty`: `--rates ""` had failed only at the end of the run, after all its measuring."""
    values = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            value = parse(item)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be comma-separated {what}, got {item!r} in {text!r}") from None
        if value > most:
            raise argparse.ArgumentTypeError(
                f"must be comma-separated {what}, each at most {most:g}, got {item!r} in {text!r}"
            )
        values.append(value)
    if not values and not empty:
        raise argparse.ArgumentTypeError(f"must be comma-separated {what}, got none in {text!r}")
    return values


def positive_floats(text: str) -> list[float]:
    """A comma-separated list of positive, finite numbers ("100,400,800"), at least one, none over MAX_RATE."""
    return _comma_list(text, positive_float, "positive, finite numbers", MAX_RATE)


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of whole numbers of at least 1 ("8,16,32"), at least one, none over MAX_USERS."""
    return _comma_list(text, positive_int, "whole numbers of at least 1", MAX_USERS)


def positive_ints_or_none(text: str) -> list[int]:
    """positive_ints, where "" is none (loadtest.run's `--steps ""`: no saturation phase)."""
    return _comma_list(text, positive_int, "whole numbers of at least 1", MAX_USERS, empty=True)


def is_http_url(text: str) -> bool:
    """Whether `text` is an http(s) URL with a host (and, if it has one, a valid port): not "localhost:8000", not
    "http://"."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def require_url(parser: argparse.ArgumentParser, option: str, value: str | None, example: str) -> str | None:
    """`value` (None: not given) as a base URL without trailing slashes, or the parser's usage error unless it is an
    http(s) URL with a host and nothing after it: "http://127.0.0.1:8000/" had made every request "//predict", which
    the service answers 404 and Locust counted as none."""
    if value is None:
        return None
    if not is_http_url(value):
        parser.error(f"{option} must be a URL, such as {example}, got {value!r}")
    parts = urlsplit(value)
    if parts.path.strip("/") or parts.query or parts.fragment:
        parser.error(f"{option} must be a URL with no path, query or fragment, such as {example}, got {value!r}")
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


def path_arg(text: str) -> Path:
    """A path made absolute now: Locust runs from the repository's root, so a relative --out or --data had meant one
    place to it and another to the run; and "" had meant the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a path, got ''")
    return Path(text).expanduser().absolute()


def cpu_list(text: str) -> str:
    """A taskset CPU list ("0", "0-3", "0,2", "0-6:2") of CPUs this process may run on, or "" for no pinning: any
    other had ended in taskset's error and a traceback after the run had started."""
    if not text.strip():
        return ""
    allowed = os.sched_getaffinity(0)
    for item in (x.strip() for x in text.split(",")):
        try:
            span, colon, stride = item.partition(":")
            first, dash, last = span.partition("-")
            cpus = range(int(first), int(last if dash else first) + 1, int(stride) if colon else 1)
        except ValueError:
            cpus = range(0)
        if not cpus or cpus.start < 0:
            raise argparse.ArgumentTypeError(f"must be a CPU list such as 0, 0-1 or 0,2, got {text!r}")
        if not set(cpus) <= allowed:
            raise argparse.ArgumentTypeError(
                f"must list only CPUs this process may use ({compact(allowed)}), got {text!r}"
            )
    return text.strip()


def compact(cpus: set[int]) -> str:
    """A CPU set as a taskset list: {0, 1, 2, 5} -> "0-2,5"."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def require_writable_dir(parser: argparse.ArgumentParser, option: str, directory: Path) -> None:
    """The parser's usage error unless `directory` can be written: checked before the run, not when the run's
    results are written at its end."""
    problem = dir_write_problem(directory)
    if problem is not None:
        parser.error(f"{option} {directory} cannot be written: {problem}")
