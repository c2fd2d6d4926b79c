"""Behaviour of the service with the real committed model, through the full app and its lifespan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.artifact import load_artifact, sha256_file
from app.config import Settings
from app.errors import ModelLoadError
from app.main import create_app
from app.runtime import OnnxClassifier
from tests.conftest import MODEL_DIR


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(model_dir=MODEL_DIR))) as c:
        yield c


def test_car_rental_example(client: TestClient) -> None:
    r = client.post("/predict", json={"text": "Hey, I'd like to rent a vehicle from Nov 1st to Nov 15th in Paris"})
    assert r.status_code == 200
    body = r.json()
    assert body["intent"] == "car_rental"
    assert 0.5 < body["confidence"] <= 1.0
    assert body["model_version"] == client.get("/model").json()["version"]
    assert "top_k" not in body


def test_top_k(client: TestClient) -> None:
    r = client.post("/predict", json={"text": "what's the balance on my checking account", "top_k": 3})
    body = r.json()
    assert r.status_code == 200
    assert body["intent"] == "balance"
    assert body["top_k"][0]["intent"] == "balance"
    assert len(body["top_k"]) == 3
    confidences = [x["confidence"] for x in body["top_k"]]
    assert confidences == sorted(confidences, reverse=True)


@pytest.mark.parametrize(
    "text",
    [
        "WHAT IS MY BALANCE???",
        "wat iz my ballance plz",
        "💳 freeze my card now 🙏",
        "قل لي نكتة",
        "tell\u200b me\u200d a\u2060 joke",
        "a" * 1000,
        "book " * 199,
    ],
)
def test_odd_texts_are_answered(client: TestClient, text: str) -> None:
    r = client.post("/predict", json={"text": text})
    assert r.status_code == 200
    assert r.json()["intent"] in client.get("/model").json()["labels"]


def test_oos_examples(client: TestClient) -> None:
    r = client.post("/predict", json={"text": "who won the chess world championship in 1972"})
    assert r.json()["intent"] == "oos"


def test_batch_equals_single_over_all_validation(client: TestClient, validation, card: dict) -> None:
    texts, intents = validation
    single = [client.post("/predict", json={"text": t}).json()["intent"] for t in texts]
    batched: list[str] = []
    for start in range(0, len(texts), 64):
        r = client.post("/predict/batch", json={"texts": texts[start : start + 64]})
        assert r.status_code == 200
        batched += [p["intent"] for p in r.json()["predictions"]]
    assert batched == single
    accuracy = sum(p == g for p, g in zip(batched, intents, strict=True)) / len(intents)
    assert accuracy == pytest.approx(card["metrics"]["validation"]["accuracy"], abs=1e-3)


def test_model_route_serves_the_card(client: TestClient, card: dict) -> None:
    body = client.get("/model").json()
    assert body["version"] == card["version"]
    assert len(body["labels"]) == 151
    assert body["files"]["model.onnx"]["sha256"] == card["files"]["model.onnx"]["sha256"]


def _rehash(directory: Path) -> None:
    card = json.loads((directory / "card.json").read_text())
    for name in card["files"]:
        card["files"][name]["sha256"] = sha256_file(directory / name)
    (directory / "card.json").write_text(json.dumps(card))


def _start(directory: Path) -> None:
    with TestClient(create_app(Settings(model_dir=directory, warmup_queries=0))):
        pass


def test_tampered_model_refuses_to_start(model_copy: Path) -> None:
    data = bytearray((model_copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256 mismatch for .*model.onnx"):
        _start(model_copy)


def test_missing_file_refuses_to_start(model_copy: Path) -> None:
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="missing model file .*tokenizer.json"):
        _start(model_copy)


def test_truncated_model_refuses_to_start(model_copy: Path) -> None:
    data = (model_copy / "model.onnx").read_bytes()
    (model_copy / "model.onnx").write_bytes(data[: len(data) // 3])
    _rehash(model_copy)
    with pytest.raises(ModelLoadError, match="unloadable model.onnx"):
        _start(model_copy)


def test_labels_logits_mismatch_refuses_to_start(model_copy: Path) -> None:
    labels = json.loads((model_copy / "labels.json").read_text())
    (model_copy / "labels.json").write_text(json.dumps(labels[:-1] if labels[-1] != "oos" else labels[1:]))
    _rehash(model_copy)
    with pytest.raises(ModelLoadError, match="151 .*labels.json has 150 labels"):
        _start(model_copy)


def test_unreadable_tokenizer_refuses_to_start(model_copy: Path) -> None:
    (model_copy / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    _rehash(model_copy)
    with pytest.raises(ModelLoadError, match="unreadable tokenizer.json"):
        _start(model_copy)


def _set_card(directory: Path, **fields: object) -> None:
    card = json.loads((directory / "card.json").read_text())
    card.update(fields)
    (directory / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"oos_rule": "entropy"},
            "card.json: oos_rule: .*unknown OOS rule 'entropy'; expected one of max_prob, energy",
        ),
        ({"oos_rule": "max_prob", "oos_threshold": 1.5}, r"oos_threshold must be in \[0.0, 1.0\) for max_prob"),
        ({"oos_rule": "energy", "oos_threshold": "high"}, "oos_threshold: Input should be a valid number"),
        ({"oos_rule": "energy", "oos_threshold": float("inf")}, "oos_threshold must be finite"),
    ],
)
def test_bad_oos_rule_refuses_to_start(model_copy: Path, fields: dict[str, object], message: str) -> None:
    _set_card(model_copy, **fields)
    with pytest.raises(ModelLoadError, match=message):
        _start(model_copy)


@pytest.mark.parametrize("value", ["SkipLayerNormFusion", ["Skip LayerNorm"], [3]])
def test_bad_disabled_optimizers_refuse_to_start(model_copy: Path, value: object) -> None:
    _set_card(model_copy, ort_disabled_optimizers=value)
    with pytest.raises(ModelLoadError, match="invalid .*card.json: ort_disabled_optimizers"):
        _start(model_copy)


def test_card_without_disabled_optimizers_still_serves(model_copy: Path) -> None:
    """Cards written before the field existed mean 'disable nothing'."""
    card = json.loads((model_copy / "card.json").read_text())
    card.pop("ort_disabled_optimizers", None)
    (model_copy / "card.json").write_text(json.dumps(card))
    assert load_artifact(model_copy).card.ort_disabled_optimizers == []
    assert OnnxClassifier(load_artifact(model_copy), 1, 1).predict("book a flight to paris").intent == "book_flight"


def test_energy_rule_thresholds_log_sum_exp_of_the_logits(model_copy: Path) -> None:
    text = "Hey, I'd like to rent a vehicle from Nov 1st to Nov 15th in Paris"
    _set_card(model_copy, cascade=None)  # the transformer alone: the first stage would answer this text
    probe = OnnxClassifier(load_artifact(model_copy), 1, 1)
    ids = probe.tokenizer.encode(text).ids
    logits = probe.transformer.run(ids).astype(np.float64)
    energy = float(np.log(np.exp(logits).sum()))
    for threshold, intent in ((energy - 0.01, "car_rental"), (energy + 0.01, "oos")):
        _set_card(model_copy, oos_rule="energy", oos_threshold=threshold)
        assert OnnxClassifier(load_artifact(model_copy), 1, 1).predict(text).intent == intent


def test_missing_directory_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model directory not found"):
        _start(tmp_path / "absent")


def test_copy_is_independent(model_copy: Path) -> None:
    shutil.rmtree(model_copy)
    assert (MODEL_DIR / "model.onnx").is_file()
