"""Several teachers fine-tuned from different seeds, and the mean of their logits, which the prune stage's recovery
distils from. Fine-tuning alone moves a teacher's out-of-scope recall by several points from seed to seed, and its
students inherit the spread; the mean of three reads above the best of them (docs/one-small-model.md, "Where the
seed spread starts"). A student distilled from the mean costs what any student costs to serve; only the factory
pays, once per extra teacher.

Layout: the teacher stage's own output directory is member 0 (the teacher every other stage reads); member i
lives in `<teacher>/members/seed-<seed + i>`, a whole checkpoint with its own run record."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from compression import checkpoint
from compression.errors import FactoryError

if TYPE_CHECKING:
    import numpy as np

    from compression.training import Encoded

MEMBERS = "members"
_PREFIX = "seed-"


def member_dir(teacher_dir: Path, seed: int) -> Path:
    """Where the teacher stage writes the extra teacher fine-tuned with `seed`."""
    return teacher_dir / MEMBERS / f"{_PREFIX}{seed}"


def members(teacher_dir: Path) -> list[Path]:
    """The teacher itself, then its extra members in seed order: every checkpoint the recovery averages."""
    found = []
    for path in (teacher_dir / MEMBERS).glob(f"{_PREFIX}*"):
        seed = path.name.removeprefix(_PREFIX)
        if not (path.is_dir() and seed.isdigit()):
            raise FactoryError(f"{path} is not a teacher member directory ({_PREFIX}<seed>)")
        found.append((int(seed), path))
    return [teacher_dir, *(path for _, path in sorted(found))]


def mean_logits(teacher_dirs: list[Path], data: Encoded, labels: list[str]) -> np.ndarray:
    """The mean of the teachers' logits over `data`, one teacher in memory at a time. Every teacher must predict
    `labels` in that order: a mean over differently ordered outputs would be silently wrong."""
    if not teacher_dirs:
        raise FactoryError("no teacher to average")
    total = _logits(teacher_dirs[0], data, labels)
    for directory in teacher_dirs[1:]:
        total += _logits(directory, data, labels)
    return total / len(teacher_dirs)


def _logits(directory: Path, data: Encoded, labels: list[str]) -> np.ndarray:
    from compression.training import predict_logits

    model, _, their_labels = checkpoint.load(directory)
    if their_labels != labels:
        raise FactoryError(f"the teacher's labels ({directory}) differ from the student's")
    return predict_logits(model, data)
