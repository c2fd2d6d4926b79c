"""Whether the factory can write where it will, found before any stage runs rather than after an hour's training."""

from __future__ import annotations

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
