"""Whether a directory can be written, found before the work rather than after it: before any factory stage runs
(not after an hour's training), and before a load test starts its server (not when it writes its results)."""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from pathlib import Path


def write_problem(directory: Path) -> str | None:
    """Why no file can be made in `directory`, an existing directory (None if one can): a file is made there and
    removed. A trial, not os.access, which passes root where the kernel refuses (/proc, /sys)."""
    try:
        handle, trial = tempfile.mkstemp(prefix=".write-check-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(handle)
    os.unlink(trial)
    return None


def dir_write_problem(directory: Path) -> str | None:
    """Why `directory` cannot be written (None if it can): made (with its parents) if missing, tried with
    `write_problem`, then the directories it made removed again, so that a run refused or failed later leaves no
    empty directory behind; the run makes them when it writes."""
    made: list[Path] = []  # deepest first
    try:
        if directory.exists() and not directory.is_dir():
            return "it is not a directory"
        made = list(itertools.takewhile(lambda d: not d.exists(), (directory, *directory.parents)))
        directory.mkdir(parents=True, exist_ok=True)
        return write_problem(directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        for path in made:
            with contextlib.suppress(OSError):  # something else wrote there meanwhile: not ours to remove
                path.rmdir()
