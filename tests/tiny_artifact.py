"""A real artifact small enough to compute by hand: word `qN` is token id N, and each ONNX model maps a
one-word query to row N of a fixed logits matrix. It goes through the same card schema, sha256 checks,
sessions and rules as the committed model, so the contract can be tested on chosen numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from app.artifact import sha256_file
from app.card import CARD_SCHEMA_VERSION
from compression.static import Dense, write_onnx


def _lookup_model(path: Path, logits: np.ndarray) -> None:
    """input_ids [1, 1] -> logits[id]: the static stage's graph, with the logits as the table (fp16-exact
    values are used by the tests) and an identity head."""
    width = logits.shape[1]
    identity = [Dense(np.eye(width, dtype=np.float32), np.zeros(width, dtype=np.float32))]
    write_onnx(path, logits, identity, table_type="float16")


def make(
    directory: Path,
    labels: list[str],
    transformer: np.ndarray,
    first: np.ndarray | None = None,
    oos_rule: str = "max_prob",
    oos_threshold: float = 0.0,
    cascade_threshold: float = 0.8,
    variants: list[dict[str, Any]] | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = transformer.shape[0]
    tokenizer = Tokenizer(models.WordLevel({f"q{i}": i for i in range(rows)}, unk_token="q0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "labels.json").write_text(json.dumps(labels))
    _lookup_model(directory / "model.onnx", transformer)
    card: dict[str, Any] = {
        "schema_version": CARD_SCHEMA_VERSION,
        "version": "tiny-1",
        "oos_rule": oos_rule,
        "oos_threshold": oos_threshold,
        "num_labels": len(labels),
        "variants": variants or [],
    }
    if first is not None:
        _lookup_model(directory / "static.onnx", first)
        card["cascade"] = {"model": "static.onnx", "threshold": cascade_threshold}
    names = ["model.onnx", "tokenizer.json", "labels.json"] + (["static.onnx"] if first is not None else [])
    card["files"] = {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size} for n in names}
    (directory / "card.json").write_text(json.dumps(card))
    return directory
