"""A real artifact small enough to compute by hand: word `qN` is token id N, and each ONNX model maps a
one-word query to row N of a fixed matrix. It goes through the same card model, sha256 checks, sessions, stages
and rules as the committed model, so the engine can be tested on chosen numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from app.engine.artifact import sha256_file
from app.engine.rules import write_npz
from compression.stages.static import Dense, write_onnx


def _lookup_model(path: Path, rows: np.ndarray, head: np.ndarray | None = None) -> None:
    """input_ids [1, n] -> the mean of rows[ids] (@ head): the static stage's graph, with the matrix as its table
    (values exact in fp16 are used by the tests)."""
    width = rows.shape[1] if head is None else head.shape[1]
    weight = np.eye(width, dtype=np.float32) if head is None else head.astype(np.float32)
    write_onnx(path, rows, [Dense(weight, np.zeros(width, dtype=np.float32))], table_type="float16")


def make(
    directory: Path,
    labels: list[str],
    transformer: np.ndarray,
    first: np.ndarray | None = None,
    rule: dict[str, Any] | None = None,
    cascade_threshold: float = 0.8,
    head: np.ndarray | None = None,
    rule_files: dict[str, dict[str, np.ndarray]] | None = None,
) -> Path:
    """`rule` is the spec's rule (default max_prob at 0). With `head`, `transformer` holds each query's features
    instead, the logits are features @ head, and the model gets its features output from the factory's own graph
    surgery; `rule_files` are the npz files the rule reads, by name."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({f"q{i}": i for i in range(transformer.shape[0])}, unk_token="q0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "labels.json").write_text(json.dumps(labels))
    transformer_stage: dict[str, Any] = {"kind": "transformer", "file": "model.onnx"}
    if head is not None:
        from compression.graphs import add_features_output

        _lookup_model(directory / "model.onnx", transformer, head)
        add_features_output(directory / "model.onnx", directory / "model.onnx", source="pooled")
        transformer_stage["features_output"] = "features"
    else:
        _lookup_model(directory / "model.onnx", transformer)
    for name, arrays in (rule_files or {}).items():
        write_npz(directory / name, arrays)
    stages = [transformer_stage]
    if first is not None:
        _lookup_model(directory / "static.onnx", first)
        stages.insert(0, {"kind": "static", "file": "static.onnx", "threshold": cascade_threshold})
    names = ["tokenizer.json", "labels.json", "model.onnx", *(["static.onnx"] if first is not None else [])]
    names += list(rule_files or {})
    card = {
        "format": 3,
        "name": "tiny",
        "version": "tiny-1",
        "spec": {
            "tokenizer": {"file": "tokenizer.json", "max_length": 8},
            "labels": {"file": "labels.json", "count": len(labels)},
            "stages": stages,
            "rule": rule or {"kind": "max_prob", "threshold": 0.0},
        },
        "files": {n: {"sha256": sha256_file(directory / n), "bytes": (directory / n).stat().st_size} for n in names},
        "provenance": {"created": "2026-12-02T00:00:00Z"},
    }
    (directory / "card.json").write_text(json.dumps(card))
    return directory
