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
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


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


def _comma_list(text: str, parse: Callable[[str], T], what: str) -> list[T]:
    """Each comma-separated item of `text` through `parse`; empty items are skipped, so "" is none."""
    values = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            values.append(parse(item))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"must be comma-separated {what}, got {item!r} in {text!r}") from None
    return values


def positive_floats(text: str) -> list[float]:
    """A comma-separated list of positive, finite numbers ("100,400,800")."""
    return _comma_list(text, positive_float, "positive, finite numbers")


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of whole numbers of at least 1 ("8,16,32")."""
    return _comma_list(text, positive_int, "whole numbers of at least 1")


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


def writable_dir_problem(directory: Path) -> str | None:
    """Why `directory` cannot be written (None if it can): made (with its parents) if missing, then a file created in
    it and removed. A trial, not os.access, which passes root where the kernel refuses (/proc, /sys)."""
    if directory.exists() and not directory.is_dir():
        return "it is not a directory"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, trial = tempfile.mkstemp(prefix=".write-check-", dir=directory)
        os.close(handle)
        os.unlink(trial)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def require_writable_dir(parser: argparse.ArgumentParser, option: str, directory: Path) -> None:
    """The parser's usage error unless `directory` can be written: checked (and made) before the run, not when the
    run's results are written at its end."""
    problem = writable_dir_problem(directory)
    if problem is not None:
        parser.error(f"{option} {directory} cannot be written: {problem}")
