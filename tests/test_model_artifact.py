"""The committed artifact: integrity, size, and the accuracy bar as served (threshold included)."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from app.artifact import load_artifact
from app.classifier import OnnxClassifier
from tests.conftest import MODEL_DIR


def test_sha256_of_every_file_matches_card(card: dict) -> None:
    assert set(card["files"]) == {"model.onnx", "tokenizer.json", "labels.json"}
    for name, entry in card["files"].items():
        data = (MODEL_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]


def test_artifact_contract(card: dict) -> None:
    labels = json.loads((MODEL_DIR / "labels.json").read_text())
    assert len(labels) == 151
    assert card["oos_label"] == "oos"
    assert 0.0 <= card["oos_threshold"] < 1.0
    assert (MODEL_DIR / "model.onnx").stat().st_size <= 25 * 1024 * 1024
    for key in ("version", "metrics", "training", "seed", "versions", "licenses"):
        assert key in card


def test_served_model_meets_validation_bar(validation: tuple[list[str], list[str]], card: dict) -> None:
    texts, intents = validation
    clf = OnnxClassifier(load_artifact(MODEL_DIR), 1, 1)
    pred = np.array([clf.predict(t).intent for t in texts])
    gold = np.array(intents)
    in_scope = gold != "oos"
    ins = float((pred[in_scope] == gold[in_scope]).mean())
    oos = float((pred[~in_scope] == "oos").mean())
    weighted = 0.818 * ins + 0.182 * oos
    assert ins >= 0.95
    assert oos >= 0.85
    assert weighted >= 0.935
    recorded = card["metrics"]["validation"]
    assert abs(recorded["in_scope_accuracy"] - ins) < 1e-3
    assert abs(recorded["oos_recall"] - oos) < 1e-3
