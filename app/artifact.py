"""The model-artifact contract: read card.json, check every file, and fail with one clear line."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ModelLoadError

REQUIRED = ("model.onnx", "tokenizer.json", "labels.json")


@dataclass(frozen=True)
class Artifact:
    directory: Path
    card: dict[str, Any]
    labels: list[str]

    @property
    def version(self) -> str:
        return str(self.card.get("version", "unknown"))

    @property
    def oos_label(self) -> str:
        return str(self.card.get("oos_label", "oos"))

    @property
    def oos_threshold(self) -> float:
        return float(self.card.get("oos_threshold", 0.0))

    @property
    def oos_rule(self) -> str:
        return str(self.card.get("oos_rule", "max_prob"))

    @property
    def ort_disabled_optimizers(self) -> list[str]:
        """ORT graph rewrites the factory measured as slower for this model; older cards name none."""
        return list(self.card.get("ort_disabled_optimizers", []))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_artifact(directory: Path, verify: bool = True) -> Artifact:
    if not directory.is_dir():
        raise ModelLoadError(f"model directory not found: {directory}")
    card_path = directory / "card.json"
    if not card_path.is_file():
        raise ModelLoadError(f"missing {card_path}")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"unreadable {card_path}: {exc}") from None
    if not isinstance(card, dict) or not isinstance(card.get("files"), dict):
        raise ModelLoadError(f"{card_path} has no 'files' table")
    for name in REQUIRED:
        path = directory / name
        if not path.is_file():
            raise ModelLoadError(f"missing model file {path}")
        if verify:
            expected = card["files"].get(name, {}).get("sha256")
            if not expected:
                raise ModelLoadError(f"card.json lists no sha256 for {name}")
            got = sha256_file(path)
            if got != expected:
                raise ModelLoadError(f"sha256 mismatch for {path}: expected {expected[:12]}..., got {got[:12]}...")
    try:
        labels = json.loads((directory / "labels.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"unreadable labels.json: {exc}") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ModelLoadError("labels.json must be a non-empty JSON list of strings")
    if len(set(labels)) != len(labels):
        raise ModelLoadError("labels.json has duplicate labels")
    artifact = Artifact(directory=directory, card=card, labels=labels)
    if artifact.oos_label not in labels:
        raise ModelLoadError(f"the OOS label '{artifact.oos_label}' is not in labels.json")
    _check_oos_rule(artifact)
    _check_disabled_optimizers(card)
    return artifact


def _check_disabled_optimizers(card: dict[str, Any]) -> None:
    names = card.get("ort_disabled_optimizers", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n.isidentifier() for n in names):
        raise ModelLoadError("ort_disabled_optimizers must be a list of ONNX Runtime optimizer names")


# The scores the card's OOS threshold can apply to, and the thresholds that make sense for each.
OOS_RULES = ("max_prob", "energy")


def _check_oos_rule(artifact: Artifact) -> None:
    rule = artifact.oos_rule
    if rule not in OOS_RULES:
        raise ModelLoadError(f"oos_rule must be one of {', '.join(OOS_RULES)}, got {rule[:40]!r}")
    try:
        threshold = artifact.oos_threshold
    except (TypeError, ValueError):
        raise ModelLoadError("oos_threshold must be a number") from None
    if rule == "max_prob" and not 0.0 <= threshold < 1.0:
        raise ModelLoadError(f"oos_threshold must be in [0, 1) for max_prob, got {threshold}")
    if not math.isfinite(threshold):
        raise ModelLoadError(f"oos_threshold must be finite, got {threshold}")
