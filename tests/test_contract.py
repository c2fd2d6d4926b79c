"""The engine on numbers chosen by hand: the OOS rules and the cascade as `Engine.run` applies them, one text
alone or many in a batch, the strict card (an unknown field anywhere in the spec is refused), and the card's
sha256 covering every file the spec names."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.engine.artifact import load_artifact
from app.engine.engine import Engine
from app.engine.errors import ModelLoadError
from app.engine.rules import RULES, Outputs
from app.engine.spec import Card
from app.http.main import create_app
from compression.measure.metrics import score, threshold_for_in_scope, tune_threshold
from tests import tiny_artifact

LABELS = ["a", "b", "oos"]
OOS = 2
ROOT = Path(__file__).resolve().parent.parent


def _log(p: list[float]) -> list[float]:
    return np.log(np.array(p)).tolist()


# Row i answers the one-word query "q{i}". Values are exact in fp16, as the tiny models store them.
TRANSFORMER = np.array(
    [[0.0, 0.0, 0.0], [4.0, 1.0, 0.0], [1.0, 1.25, 0.5], [2.0, 0.0, 3.0], [8.0, 0.0, 0.0], [0.5, 0.25, 0.0]],
    dtype=np.float32,
)


@pytest.mark.parametrize(("rule", "threshold"), [("max_prob", 0.5), ("energy", 2.0)])
def test_each_rule_answers_a_text_alone_as_in_a_batch(tmp_path: Path, rule: str, threshold: float) -> None:
    # Feature-space rules have theirs in test_oos_rules.py.
    assert {r for r in RULES if not RULES[r].needs_features} == {"max_prob", "energy"}, "a new rule needs a case"
    spec = {"kind": rule, "threshold": threshold}
    engine = Engine.open(tiny_artifact.make(tmp_path, LABELS, TRANSFORMER, None, spec))
    texts = [f"q{i}" for i in range(len(TRANSFORMER))]
    alone = [engine.predict(t) for t in texts]
    batch = engine.run(texts)
    assert [p.intent for p in alone] == [LABELS[i] for i in batch.pred]
    assert [p.confidence for p in alone] == batch.confidence.tolist()
    # The factory tunes thresholds with the same rule class, over the whole matrix.
    scorer = engine.rule
    scores = scorer.score(Outputs.of(TRANSFORMER))
    assert [scorer.score(Outputs.of(row[None]))[0] for row in TRANSFORMER] == scores.tolist()
    gold = batch.pred
    t, s = tune_threshold(scores, TRANSFORMER.argmax(-1), gold, OOS, rule, min_oos_recall=1.0, min_in_scope=1.0)
    assert s.accuracy == 1.0
    assert scorer.with_threshold(t).decide(Outputs.of(TRANSFORMER), OOS)[0].tolist() == gold.tolist()


def energy(threshold: float) -> Any:
    return RULES["energy"](RULES["energy"].Spec(threshold=threshold))


def test_rules_by_hand() -> None:
    # energy of [4, 1, 0] is log(e^4 + e + 1) = 4.0659; max_prob is e^4 / (e^4 + e + 1) = 0.9362.
    out = Outputs.of(TRANSFORMER[1:2])
    assert energy(0.0).score(out)[0] == pytest.approx(4.0659, abs=1e-4)
    assert RULES["max_prob"](RULES["max_prob"].Spec(threshold=0.5)).score(out)[0] == pytest.approx(0.9362, abs=1e-4)
    pred, confidence = energy(1.5).decide(Outputs.of(TRANSFORMER[[1, 5]]), OOS)
    # Row 5: energy log(e^.5 + e^.25 + 1) = 1.3693 < 1.5, so oos, with confidence 1 - p(top) = 1 - 0.4192.
    assert pred.tolist() == [0, OOS]
    assert energy(0.0).score(Outputs.of(TRANSFORMER[5:6]))[0] == pytest.approx(1.3693, abs=1e-4)
    assert confidence[1] == pytest.approx(1 - 0.4192, abs=1e-4)


# First stage: q1 confident 'a' (0.9), q2 unsure (0.6), q3 confident but 'oos', q4 confident 'b' (0.85),
# q5 exactly at the threshold. Rows hold log-probabilities, so the softmax gives the numbers back.
FIRST = np.array(
    [_log([0.4, 0.3, 0.3]), _log([0.9, 0.05, 0.05]), _log([0.6, 0.3, 0.1]),
     _log([0.05, 0.05, 0.9]), _log([0.1, 0.85, 0.05]), _log([0.8, 0.1, 0.1])],
    dtype=np.float16,
).astype(np.float32)  # fmt: skip


def test_cascade_rule_by_hand(tmp_path: Path) -> None:
    rule = {"kind": "energy", "threshold": 2.0}
    engine = Engine.open(tiny_artifact.make(tmp_path, LABELS, TRANSFORMER, FIRST, rule, 0.8))
    got = [(p.intent, p.stage) for p in (engine.predict(f"q{i}") for i in range(1, 6))]
    assert got == [
        ("a", "first"),  # 0.9 >= 0.8
        ("b", "transformer"),  # 0.6 < 0.8: the transformer's [1, 1.25, 0.5] -> b (energy 2.0 is not under 2.0)
        ("oos", "transformer"),  # the first stage never answers oos; the transformer's argmax is oos
        ("b", "first"),  # 0.85 >= 0.8, although the transformer would say 'a'
        ("a", "first"),  # exactly 0.8 (to fp16 precision, above it) answers
    ]
    assert engine.predict("q1").confidence == pytest.approx(0.9, abs=1e-3)
    texts = [f"q{i}" for i in range(1, 6)]
    decisions = engine.run(texts)
    assert decisions.stage.tolist() == [0, 1, 1, 0, 0]
    assert [LABELS[i] for i in decisions.pred] == [g for g, _ in got]
    assert decisions.confidence.tolist() == [engine.predict(t).confidence for t in texts]
    # Every step is timed: the tokenizer, each stage that ran, and the rule.
    assert set(decisions.timings) == {"tokenize", "first", "transformer", "rule"}
    # A batch the first stage answers whole never reaches the transformer or the rule.
    assert set(engine.run(["q1", "q4"]).timings) == {"tokenize", "first"}


def test_a_text_gets_the_same_answer_alone_as_in_a_batch(tmp_path: Path) -> None:
    directory = tiny_artifact.make(tmp_path, LABELS, TRANSFORMER, FIRST, {"kind": "energy", "threshold": 2.0}, 0.8)
    texts = ["q1", "q2", "q3", "q4", "q5", "q2 q1", "q4 q4 q3"]
    with TestClient(create_app(Settings(model_dir=directory, warmup_queries=1))) as client:
        alone = [client.post("/predict", json={"text": t, "top_k": 2}).json() for t in texts]
        batch = client.post("/predict/batch", json={"texts": texts, "top_k": 2}).json()["predictions"]
        metrics = client.get("/metrics").text
    assert [{k: v for k, v in a.items() if k != "model_version"} for a in alone] == batch
    with TestClient(create_app(Settings(model_dir=directory, warmup_queries=0))) as client:
        timing = [client.post("/predict", json={"text": t}).headers["server-timing"] for t in ("q1", "q2")]
    # tokenize, then inference with the stage that answered, then the service's whole time
    assert [t.split(", ")[0].split(";")[0] for t in timing] == ["tokenize", "tokenize"]
    assert [t.split(", ")[1].split(";", 2)[::2] for t in timing] == [
        ["inference", 'desc="first"'],
        ["inference", 'desc="transformer"'],
    ]
    assert [t.split(", ")[2].startswith("service;dur=") for t in timing] == [True, True]
    stages = [Engine.open(directory).predict(t).stage for t in texts]
    assert stages[:5] == ["first", "transformer", "transformer", "first", "first"]
    # Each text was asked twice, alone and in the batch; warm-up queries are not counted.
    assert f'intent_answered_by_total{{stage="first"}} {2.0 * stages.count("first")}' in metrics
    assert f'intent_answered_by_total{{stage="transformer"}} {2.0 * stages.count("transformer")}' in metrics


def test_card_sha256_covers_every_file_the_spec_names(tmp_path: Path) -> None:
    directory = tiny_artifact.make(tmp_path, LABELS, TRANSFORMER, FIRST, {"kind": "energy", "threshold": 2.0}, 0.8)
    card = load_artifact(directory).card
    assert set(card.spec.files) == {"model.onnx", "tokenizer.json", "labels.json", "static.onnx"}
    assert set(card.files) == set(card.spec.files)
    with (directory / "static.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelLoadError, match=r"sha256 mismatch for .*static\.onnx"):
        load_artifact(directory)
    raw = json.loads((directory / "card.json").read_text())
    del raw["files"]["static.onnx"]
    (directory / "card.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="files lists no sha256 for static.onnx"):
        load_artifact(directory, verify=False)


def test_a_card_that_misstates_a_files_size_is_refused(tmp_path: Path) -> None:
    """The right file (its sha256 matches) under a card whose `bytes` for it is wrong: the card is not to be
    trusted, and a card that says "sha256 and size" checks both."""
    directory = tiny_artifact.make(tmp_path, LABELS, TRANSFORMER, FIRST, {"kind": "energy", "threshold": 2.0}, 0.8)
    raw = json.loads((directory / "card.json").read_text())
    size = raw["files"]["model.onnx"]["bytes"]
    raw["files"]["model.onnx"]["bytes"] = 1
    (directory / "card.json").write_text(json.dumps(raw))
    with pytest.raises(
        ModelLoadError, match=rf"size mismatch for .*model\.onnx: the card says 1 bytes, the file has {size}$"
    ):
        load_artifact(directory)
    assert load_artifact(directory, verify=False).card.files["model.onnx"].bytes == 1  # as INTENT_VERIFY_SHA256=false


# Where an unknown field can hide: every block of the card, and every nested model of the spec.
UNKNOWN_FIELD_AT = [
    ((), ""),
    (("spec",), "spec"),
    (("spec", "tokenizer"), "spec.tokenizer"),
    (("spec", "labels"), "spec.labels"),
    (("spec", "stages", 0), "spec.stages.0.static"),
    (("spec", "stages", 1), "spec.stages.1.transformer"),
    (("spec", "rule"), "spec.rule.energy"),
    (("provenance",), "provenance"),
    (("files", "model.onnx"), "files.model.onnx"),
]


@pytest.mark.parametrize(("path", "where"), UNKNOWN_FIELD_AT)
def test_an_unknown_field_anywhere_is_refused(tmp_path: Path, path: tuple[Any, ...], where: str) -> None:
    directory = tiny_artifact.make(tmp_path, LABELS, TRANSFORMER, FIRST, {"kind": "energy", "threshold": 2.0}, 0.8)
    raw = json.loads((directory / "card.json").read_text())
    node = raw
    for key in path:
        node = node[key]
    node["surprise"] = 1
    (directory / "card.json").write_text(json.dumps(raw))
    at = f"{re.escape(where)}\\." if where else ""
    with pytest.raises(ModelLoadError, match=rf"invalid .*card\.json: {at}surprise: Extra inputs"):
        load_artifact(directory)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rule": {"kind": "nope", "threshold": 0.0}}, "does not match any of the expected tags"),
        ({"rule": {"kind": "max_prob", "threshold": 1.5}}, "less than 1"),
        ({"rule": {"kind": "energy"}}, "spec.rule.energy.threshold: Field required"),
        ({"rule": {"kind": "energy", "threshold": float("nan")}}, "must be finite"),
        ({"stages": []}, "at least 1 item"),
        ({"stages": [{"kind": "static", "file": "static.onnx", "threshold": 0.5}]}, "static stages followed by one"),
        ({"labels": {"count": 1}}, "greater than or equal to 2"),
        ({"tokenizer": {"file": "../tokenizer.json", "max_length": 8}}, "should match pattern"),
    ],
)
def test_a_spec_that_does_not_validate_is_refused(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    directory = tiny_artifact.make(tmp_path, LABELS, TRANSFORMER, FIRST, {"kind": "energy", "threshold": 2.0}, 0.8)
    raw = json.loads((directory / "card.json").read_text())
    raw["spec"].update(change)
    (directory / "card.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=message):
        load_artifact(directory)


def test_the_committed_card_validates_and_every_file_matches() -> None:
    directory = ROOT / "models" / "clinc150"
    card = Card.model_validate_json((directory / "card.json").read_bytes())
    artifact = load_artifact(directory)  # verifies the sha256 of every file the spec names
    # Beside the card: the files its spec names, and the report page (read by people, never served).
    beside = sorted(p.name for p in directory.iterdir() if p.name not in ("card.json", "report.md"))
    assert beside == sorted(card.spec.files)
    assert (directory / "report.md").is_file()
    assert sorted(card.files) == sorted(card.spec.files)
    assert artifact.card == card


def test_scores_by_hand_for_the_cascade_over_a_matrix() -> None:
    from compression.stages.static import cascade_scores, choose_threshold

    gold = np.array([0, 1, 2, 2])
    second = np.array([0, 1, 2, 0])  # the transformer misses the last oos
    first = np.log(np.array([[0.95, 0.03, 0.02], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]]))
    # At 0.94 only row 0 is answered by the first stage: the transformer's scores stay.
    s, share = cascade_scores(first, second, gold, OOS, 0.94)
    assert (share, s.accuracy) == (0.25, 0.75)
    # At 0.5 rows 0, 1 and 3 are: row 3 stays wrong (the first stage says 'a' too).
    s, share = cascade_scores(first, second, gold, OOS, 0.5)
    assert (share, s.accuracy) == (0.75, 0.75)
    assert choose_threshold(first, second, gold, OOS) == 0.3  # the lowest on the grid keeps every score
    assert score(second, gold, OOS).accuracy == 0.75


def test_the_cascade_threshold_tolerates_only_the_share_of_oos_it_is_given() -> None:
    from compression.stages.static import choose_threshold

    # One in-scope query and ten out-of-scope ones, all of which the transformer gets right. The first stage
    # is sure of row 0 ('a', 0.9), says 'a' at 0.615 for row 1 (out of scope), and `oos` for the rest.
    gold = np.array([0] + [OOS] * 10)
    second = gold.copy()
    first = np.log(np.array([[0.9, 0.05, 0.05], [0.615, 0.2, 0.185]] + [[0.1, 0.1, 0.8]] * 9))
    # Answering row 1 loses a tenth of OOS recall: without tolerance, the threshold must rise above 0.615.
    assert choose_threshold(first, second, gold, OOS) == 0.62
    assert choose_threshold(first, second, gold, OOS, oos_tolerance=0.05) == 0.62
    assert choose_threshold(first, second, gold, OOS, oos_tolerance=0.1) == 0.3


def test_the_rule_threshold_set_on_the_cascade_by_hand() -> None:
    """Rows the first stage answers are never rejected, so the strictest threshold that keeps in-scope accuracy
    at the target is counted on the cascade. Four in-scope rows (a, a, b, b) and one out-of-scope row; the first
    stage answers rows 0 and 1 (0.9 for 'a'). At a target of 3 of 4, the cascade has 2 right already and needs
    one more from the transformer: the best-scored right row, energy log(e^3 + 2) = 3.0949, so 3.09. The
    transformer alone would need its own third-best right row, log(e^2 + 2) = 2.2395, so 2.23."""
    from compression.stages.static import rule_on_cascade

    gold = np.array([0, 0, 1, 1, OOS])
    second = np.array([[5, 0, 0], [1, 0, 0], [0, 3, 0], [0, 2, 0], [0, 1, 0]], dtype=np.float32)
    first = np.log(np.array([[0.9, 0.05, 0.05]] * 2 + [[0.4, 0.3, 0.3]] * 3, dtype=np.float32))
    out = Outputs.of(second)
    on_cascade = rule_on_cascade(energy(0.0), first, out, gold, OOS, tau=0.8, policy={"in_scope_accuracy": 0.75})
    assert on_cascade.threshold == pytest.approx(3.09)
    alone = threshold_for_in_scope(energy(0.0).score(out), out.pred, gold, OOS, "energy", 0.75)
    assert alone == pytest.approx(2.23)
    # Served: rows 0 and 1 by the first stage; of the transformer's rows, 2 answered, 3 and 4 rejected.
    assert on_cascade.decide(out.rows(np.array([2, 3, 4])), OOS)[0].tolist() == [1, OOS, OOS]


def test_the_rejection_rate_is_kept_on_the_cascade_by_hand() -> None:
    """The default policy, a share of in-scope validation queries refused, counted on what is served. The same
    five rows: at 1 in 4, the rule may refuse one of the transformer's two in-scope rows, the worse-scored (row 3,
    energy 2.2395), so the threshold is the other's, 3.09. Where the transformer's argmax is itself `oos` on an
    in-scope row it reaches, that is the one refusal allowed, and the rule may refuse none: 2.23."""
    from compression.stages.static import rule_on_cascade

    gold = np.array([0, 0, 1, 1, OOS])
    second = np.array([[5, 0, 0], [1, 0, 0], [0, 3, 0], [0, 2, 0], [0, 1, 0]], dtype=np.float32)
    out = Outputs.of(second)
    first = np.log(np.array([[0.9, 0.05, 0.05]] * 2 + [[0.4, 0.3, 0.3]] * 3, dtype=np.float32))
    rule = rule_on_cascade(energy(0.0), first, out, gold, OOS, tau=0.8, policy={"in_scope_rejection": 0.25})
    assert rule.threshold == pytest.approx(3.09)
    assert rule.decide(out.rows(np.array([2, 3])), OOS)[0].tolist() == [1, OOS]  # 1 of the 4 in-scope rows
    refuses = second.copy()
    refuses[2] = [0, 3, 4]  # row 2's argmax is oos: energy log(e^4 + e^3 + 1) = 4.3266
    out = Outputs.of(refuses)
    rule = rule_on_cascade(energy(0.0), first, out, gold, OOS, tau=0.8, policy={"in_scope_rejection": 0.25})
    assert rule.threshold == pytest.approx(2.23)
    assert rule.decide(out.rows(np.array([2, 3])), OOS)[0].tolist() == [OOS, 1]
