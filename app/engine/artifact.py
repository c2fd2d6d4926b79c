"""Read an artifact directory: card.json through the strict card model, every file the spec names against its
sha256, and the labels. Any problem is one line in a ModelLoadError."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from app.engine.errors import ModelLoadError
from app.engine.spec import CARD_FILE, Card


@dataclass(frozen=True)
class Artifact:
    directory: Path
    card: Card
    labels: list[str]

    @property
    def version(self) -> str:
        return self.card.version

    def path(self, name: str) -> Path:
        return self.directory / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validation_message(exc: ValidationError) -> str:
    """The first error of a pydantic validation as 'where: what'."""
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "card"
    return f"{where}: {first['msg']}"


def read_card(directory: Path) -> Card:
    path = directory / CARD_FILE
    if not path.is_file():
        raise ModelLoadError(f"missing {path}")
    try:
        return Card.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise ModelLoadError(f"invalid {path}: {validation_message(exc)}") from None
    except OSError as exc:
        raise ModelLoadError(f"unreadable {path}: {exc}") from None


def read_labels(path: Path, count: int, oos_label: str) -> list[str]:
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"unreadable {path.name}: {exc}") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ModelLoadError(f"{path.name} must be a non-empty JSON list of strings")
    if len(set(labels)) != len(labels):
        raise ModelLoadError(f"{path.name} has duplicate labels")
    if oos_label not in labels:
        raise ModelLoadError(f"the OOS label '{oos_label}' is not in {path.name}")
    if count != len(labels):
        raise ModelLoadError(f"the spec says {count} labels but {path.name} has {len(labels)}")
    return labels


def load_artifact(directory: Path, verify: bool = True) -> Artifact:
    if not directory.is_dir():
        if directory.exists():  # a file given for the directory had read "not found"
            raise ModelLoadError(f"not a model directory but a file: {directory}")
        raise ModelLoadError(f"model directory not found: {directory}")
    card = read_card(directory)
    for name in card.spec.files:
        path = directory / name
        if not path.is_file():
            raise ModelLoadError(f"missing model file {path}")
        if verify:
            expected = card.files[name].sha256
            got = sha256_file(path)
            if got != expected:
                raise ModelLoadError(f"sha256 mismatch for {path}: expected {expected[:12]}..., got {got[:12]}...")
            size, stated = path.stat().st_size, card.files[name].bytes
            if size != stated:  # the right file, and a card that misstates it: not a card to trust
                raise ModelLoadError(f"size mismatch for {path}: the card says {stated} bytes, the file has {size}")
    spec = card.spec.labels
    labels = read_labels(directory / spec.file, spec.count, spec.oos_label)
    return Artifact(directory=directory, card=card, labels=labels)
