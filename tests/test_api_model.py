"""Behaviour of the service with the real committed model, through the full app and its lifespan."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import cpu
from app.config import Settings
from app.engine.artifact import load_artifact, sha256_file
from app.engine.engine import WEIGHTS_SIGNED, WEIGHTS_STORED, Engine
from app.engine.errors import ModelLoadError
from app.engine.signed_weights import signed_products_exact
from app.http.main import create_app
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


def test_top_k_ranks_intents_and_never_the_oos_decision(client: TestClient) -> None:
    """An out-of-scope answer still lists the intents the query came nearest to; `oos` is the decision, never an
    entry. Recomputed from the engine's probabilities: the k most probable labels other than `oos`."""
    from app.engine.engine import Engine
    from tests.conftest import MODEL_DIR

    text = "what is the boiling point of gold"
    body = client.post("/predict", json={"text": text, "top_k": 5}).json()
    assert body["intent"] == "oos"
    engine = Engine.open(MODEL_DIR)
    try:
        probs = engine.run([text]).probs[0]
        expected = [engine.labels[i] for i in np.argsort(-probs, kind="stable") if engine.labels[i] != "oos"][:5]
    finally:
        engine.close()
    assert [x["intent"] for x in body["top_k"]] == expected
    batch = client.post("/predict/batch", json={"texts": [text, "balance please"], "top_k": 10}).json()
    assert all(x["intent"] != "oos" for p in batch["predictions"] for x in p["top_k"])
    assert [len(p["top_k"]) for p in batch["predictions"]] == [10, 10]


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


def test_batch_equals_single_over_all_validation(client: TestClient, validation) -> None:
    texts, _ = validation
    single = [client.post("/predict", json={"text": t}).json()["intent"] for t in texts]
    batched: list[str] = []
    for start in range(0, len(texts), 64):
        r = client.post("/predict/batch", json={"texts": texts[start : start + 64]})
        assert r.status_code == 200
        batched += [p["intent"] for p in r.json()["predictions"]]
    assert batched == single
    # And both are what the engine decides over the whole split at once.
    engine = Engine.open(MODEL_DIR)
    assert [engine.labels[i] for i in engine.run(texts).pred] == single


def test_model_route_serves_the_card(client: TestClient, card: dict) -> None:
    body = client.get("/model").json()
    assert {k: body[k] for k in card} == card
    assert body["labels"] == json.loads((MODEL_DIR / "labels.json").read_text())
    weights = WEIGHTS_SIGNED if signed_products_exact() else WEIGHTS_STORED
    assert body["serving"] == {"cpu": cpu.current().describe(), "weights": weights}


def test_the_ready_log_line_says_which_weights_run_on_which_cpu(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app"), TestClient(create_app(Settings(model_dir=MODEL_DIR))):
        pass
    (ready,) = [r for r in caplog.records if r.getMessage() == "ready"]
    weights = WEIGHTS_SIGNED if signed_products_exact() else WEIGHTS_STORED
    assert (ready.model_version, ready.cpu, ready.weights) == (  # type: ignore[attr-defined]
        load_artifact(MODEL_DIR).card.version,
        cpu.current().describe(),
        weights,
    )


def _rehash(directory: Path) -> None:
    card = json.loads((directory / "card.json").read_text())
    for name in card["files"]:
        card["files"][name]["sha256"] = sha256_file(directory / name)
        card["files"][name]["bytes"] = (directory / name).stat().st_size
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
    with pytest.raises(ModelLoadError, match="the spec says 151 labels but labels.json has 150"):
        _start(model_copy)


def test_unreadable_tokenizer_refuses_to_start(model_copy: Path) -> None:
    (model_copy / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    _rehash(model_copy)
    with pytest.raises(ModelLoadError, match="unreadable tokenizer.json"):
        _start(model_copy)


def _set_spec(directory: Path, **fields: object) -> None:
    card = json.loads((directory / "card.json").read_text())
    card["spec"].update(fields)
    (directory / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            {"kind": "entropy", "threshold": 0.5},
            "card.json: spec.rule: Input tag 'entropy' found using 'kind' does not match any of the expected tags: "
            "'max_prob', 'energy', 'mahalanobis', 'energy_knn'",
        ),
        ({"kind": "max_prob", "threshold": 1.5}, r"spec.rule.max_prob.threshold: Input should be less than 1"),
        ({"kind": "energy", "threshold": "high"}, "spec.rule.energy.threshold: Input should be a valid number"),
        ({"kind": "energy", "threshold": float("inf")}, "spec.rule.energy.threshold: Value error, must be finite"),
    ],
)
def test_bad_oos_rule_refuses_to_start(model_copy: Path, rule: dict[str, object], message: str) -> None:
    _set_spec(model_copy, rule=rule)
    with pytest.raises(ModelLoadError, match=message):
        _start(model_copy)


def _set_transformer(directory: Path, **fields: object) -> None:
    card = json.loads((directory / "card.json").read_text())
    card["spec"]["stages"][-1].update(fields)
    (directory / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize("value", ["SkipLayerNormFusion", ["Skip LayerNorm"], [3]])
def test_bad_disabled_optimizers_refuse_to_start(model_copy: Path, value: object) -> None:
    _set_transformer(model_copy, ort_disabled_optimizers=value)
    with pytest.raises(ModelLoadError, match=r"invalid .*card.json: spec.stages.1.transformer.ort_disabled_optimizers"):
        _start(model_copy)


def test_an_unknown_spec_field_refuses_to_start(model_copy: Path) -> None:
    _set_spec(model_copy, cascade={"threshold": 0.5})
    with pytest.raises(ModelLoadError, match=r"invalid .*card.json: spec.cascade: Extra inputs are not permitted"):
        _start(model_copy)


def test_energy_rule_thresholds_log_sum_exp_of_the_logits(model_copy: Path) -> None:
    text = "Hey, I'd like to rent a vehicle from Nov 1st to Nov 15th in Paris"
    card = json.loads((model_copy / "card.json").read_text())
    transformer = card["spec"]["stages"][-1]
    # The transformer alone (the first stage would answer this text), with the energy rule.
    _set_spec(model_copy, stages=[transformer], rule={"kind": "energy", "threshold": 0.0})
    logits = Engine.open(model_copy).outputs([text]).logits[0].astype(np.float64)
    energy = float(np.log(np.exp(logits).sum()))
    for threshold, intent in ((energy - 0.01, "car_rental"), (energy + 0.01, "oos")):
        _set_spec(model_copy, rule={"kind": "energy", "threshold": threshold})
        assert Engine.open(model_copy).predict(text).intent == intent


def test_missing_directory_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model directory not found"):
        _start(tmp_path / "absent")


def test_a_file_given_for_the_model_directory_is_named_a_file(tmp_path: Path) -> None:
    (tmp_path / "card.json").write_text("{}")
    with pytest.raises(ModelLoadError) as refused:
        _start(tmp_path / "card.json")
    assert str(refused.value) == f"not a model directory but a file: {tmp_path / 'card.json'}"


def test_copy_is_independent(model_copy: Path) -> None:
    shutil.rmtree(model_copy)
    assert (MODEL_DIR / "model.onnx").is_file()
