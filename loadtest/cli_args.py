"""Argument checks the load-test CLIs share (loadtest.run, loadtest.compare, loadtest.soak): each bad value is
refused by argparse in one line, naming its option, before any server starts or anything is measured.

The `type=` functions raise argparse.ArgumentTypeError, which argparse reports as
"error: argument --rate: must be a positive, finite number, got 'nan'"; the checks of a parsed value
(`require_url`, `require_writable_dir`) call the parser's own error.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from compression.writable import dir_write_problem

N = TypeVar("N", int, float)

# Bounds far beyond any real run: a huge value (`--minutes 1e308`) overflowed, or made a file name too long, where it
# became a count of requests, a timeout or a directory, after the server had started.
MAX_RATE = 100_000  # requests/s
MAX_USERS = 10_000
MAX_SECONDS = 86_400  # a day, for one phase
MAX_MINUTES = 10_080  # a week


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


def require_url(parser: argparse.ArgumentParser, option: str, value: str | None, example: str) -> None:
    """The parser's usage error unless `value` (None: not given) is an http(s) URL with a host."""
    if value is not None and not is_http_url(value):
        parser.error(f"{option} must be a URL, such as {example}, got {value!r}")


def require_writable_dir(parser: argparse.ArgumentParser, option: str, directory: Path) -> None:
    """The parser's usage error unless `directory` can be written: checked before the run, not when the run's
    results are written at its end."""
    problem = dir_write_problem(directory)
    if problem is not None:
        parser.error(f"{option} {directory} cannot be written: {problem}")
