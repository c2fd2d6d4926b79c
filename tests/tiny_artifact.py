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
from app.oos import FeatureStats
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
    stats: FeatureStats | None = None,
    head: np.ndarray | None = None,
) -> Path:
    """With `stats` and `head`, `transformer` holds each query's features instead, the logits are features @
    head, and the model gets its features output from the factory's own graph surgery."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = transformer.shape[0]
    tokenizer = Tokenizer(models.WordLevel({f"q{i}": i for i in range(rows)}, unk_token="q0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "labels.json").write_text(json.dumps(labels))
    extra: dict[str, Any] = {}
    if stats is not None and head is not None:
        from compression.features import add_features_output

        zeros = np.zeros(head.shape[1], dtype=np.float32)
        write_onnx(directory / "model.onnx", transformer, [Dense(head.astype(np.float32), zeros)], "float16")
        add_features_output(directory / "model.onnx", directory / "model.onnx", source="pooled")
        stats.save(directory / "oos_stats.npz")
        extra = {"features_output": "features", "oos_stats": "oos_stats.npz"}
    else:
        _lookup_model(directory / "model.onnx", transformer)
    card: dict[str, Any] = {
        **extra,
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
    names += ["oos_stats.npz"] if extra else []
    card["files"] = {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size} for n in names}
    (directory / "card.json").write_text(json.dumps(card))
    return directory
