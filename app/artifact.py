"""Read an artifact directory: card.json through the card schema, every served file against its sha256,
and labels.json. Any problem is one clear line in a ModelLoadError."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from app.card import LABELS_FILE, ModelCard
from app.errors import ModelLoadError


@dataclass(frozen=True)
class Artifact:
    directory: Path
    card: ModelCard
    labels: list[str]

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def oos_index(self) -> int:
        return self.labels.index(self.card.oos_label)

    def path(self, name: str) -> Path:
        return self.directory / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_card(directory: Path) -> ModelCard:
    card_path = directory / "card.json"
    if not card_path.is_file():
        raise ModelLoadError(f"missing {card_path}")
    try:
        return ModelCard.model_validate_json(card_path.read_bytes())
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "card"
        raise ModelLoadError(f"invalid {card_path}: {where}: {first['msg']}") from None
    except OSError as exc:
        raise ModelLoadError(f"unreadable {card_path}: {exc}") from None


def load_artifact(directory: Path, verify: bool = True) -> Artifact:
    if not directory.is_dir():
        raise ModelLoadError(f"model directory not found: {directory}")
    card = read_card(directory)
    for name in card.served_files:
        path = directory / name
        if not path.is_file():
            raise ModelLoadError(f"missing model file {path}")
        if verify:
            expected = card.files[name].sha256
            got = sha256_file(path)
            if got != expected:
                raise ModelLoadError(f"sha256 mismatch for {path}: expected {expected[:12]}..., got {got[:12]}...")
    try:
        labels = json.loads((directory / LABELS_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"unreadable {LABELS_FILE}: {exc}") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ModelLoadError(f"{LABELS_FILE} must be a non-empty JSON list of strings")
    if len(set(labels)) != len(labels):
        raise ModelLoadError(f"{LABELS_FILE} has duplicate labels")
    if card.oos_label not in labels:
        raise ModelLoadError(f"the OOS label '{card.oos_label}' is not in {LABELS_FILE}")
    if card.num_labels is not None and card.num_labels != len(labels):
        raise ModelLoadError(f"card.json says {card.num_labels} labels but {LABELS_FILE} has {len(labels)} labels")
    return Artifact(directory=directory, card=card, labels=labels)


def check_served(model_dir: str, verify: bool = True) -> str | None:
    """Load `model_dir` as a worker will (files, sha256, tokenizer, labels against every stage's logits) and
    release it: the error, or None. `python -m app` runs it in a child process before binding the port."""
    from app.runtime import OnnxClassifier

    try:
        OnnxClassifier(load_artifact(Path(model_dir), verify), 1, 1).close()
    except ModelLoadError as exc:
        return str(exc)
    return None
