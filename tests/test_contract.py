"""The artifact contract on numbers chosen by hand: the OOS rules and the cascade rule as the service applies
them one query at a time and as the factory evaluates them over a matrix, variant choice by CPU flags, and
the card's sha256 covering every served file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import cpu
from app.artifact import load_artifact
from app.card import ModelCard
from app.config import Settings
from app.errors import ModelLoadError
from app.main import create_app
from app.oos import RULES, decide
from app.runtime import OnnxClassifier
from compression.metrics import score, tune_threshold
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
def test_each_rule_gives_the_service_and_the_factory_the_same_answers(tmp_path: Path, rule: str, threshold: float):
    # Feature-space rules have theirs in test_oos_rules.py.
    assert {r for r in RULES if not RULES[r].needs_features} == {"max_prob", "energy"}, "a new rule needs a case"
    clf = OnnxClassifier(load_artifact(tiny_artifact.make(tmp_path, LABELS, TRANSFORMER, None, rule, threshold)))
    texts = [f"q{i}" for i in range(len(TRANSFORMER))]
    served = [clf.predict(t) for t in texts]
    factory, _ = clf.decisions(clf.stage_logits(texts))
    assert [p.intent for p in served] == [LABELS[i] for i in factory.pred]
    assert [p.confidence for p in served] == factory.confidence.tolist()
    # The factory's threshold tuning scores with the same registry function over the whole matrix.
    scores = RULES[rule].score(TRANSFORMER)
    assert [RULES[rule].score(row[None])[0] for row in TRANSFORMER] == scores.tolist()
    gold = factory.pred
    t, s = tune_threshold(scores, TRANSFORMER.argmax(-1), gold, OOS, rule, min_oos_recall=1.0, min_in_scope=1.0)
    assert s.accuracy == 1.0
    assert decide(TRANSFORMER, OOS, rule, t).pred.tolist() == gold.tolist()


def test_rules_by_hand() -> None:
    # energy of [4, 1, 0] is log(e^4 + e + 1) = 4.0659; max_prob is e^4 / (e^4 + e + 1) = 0.9362.
    assert RULES["energy"].score(TRANSFORMER[1:2])[0] == pytest.approx(4.0659, abs=1e-4)
    assert RULES["max_prob"].score(TRANSFORMER[1:2])[0] == pytest.approx(0.9362, abs=1e-4)
    d = decide(TRANSFORMER[[1, 5]], OOS, "energy", 1.5)
    # Row 5: energy log(e^.5 + e^.25 + 1) = 1.3693 < 1.5, so oos, with confidence 1 - p(top) = 1 - 0.4192.
    assert d.pred.tolist() == [0, OOS]
    assert RULES["energy"].score(TRANSFORMER[5:6])[0] == pytest.approx(1.3693, abs=1e-4)
    assert d.confidence[1] == pytest.approx(1 - 0.4192, abs=1e-4)


# First stage: q1 confident 'a' (0.9), q2 unsure (0.6), q3 confident but 'oos', q4 confident 'b' (0.85),
# q5 exactly at the threshold. Rows hold log-probabilities, so the softmax gives the numbers back.
FIRST = np.array(
    [_log([0.4, 0.3, 0.3]), _log([0.9, 0.05, 0.05]), _log([0.6, 0.3, 0.1]),
     _log([0.05, 0.05, 0.9]), _log([0.1, 0.85, 0.05]), _log([0.8, 0.1, 0.1])],
    dtype=np.float16,
).astype(np.float32)  # fmt: skip


def test_cascade_rule_by_hand(tmp_path: Path) -> None:
    artifact = load_artifact(tiny_artifact.make(tmp_path, LABELS, TRANSFORMER, FIRST, "energy", 2.0, 0.8))
    clf = OnnxClassifier(artifact, cpu_flags=frozenset())
    got = [(p.intent, p.stage) for p in (clf.predict(f"q{i}") for i in range(1, 6))]
    assert got == [
        ("a", "first"),  # 0.9 >= 0.8
        ("b", "transformer"),  # 0.6 < 0.8: the transformer's [1, 1.25, 0.5] -> b (energy 2.0 is not under 2.0)
        ("oos", "transformer"),  # the first stage never answers oos; the transformer's argmax is oos
        ("b", "first"),  # 0.85 >= 0.8, although the transformer would say 'a'
        ("a", "first"),  # exactly 0.8 (to fp16 precision, above it) answers
    ]
    assert clf.predict("q1").confidence == pytest.approx(0.9, abs=1e-3)
    texts = [f"q{i}" for i in range(1, 6)]
    decision, answered = clf.decisions(clf.stage_logits(texts))
    assert answered.tolist() == [True, False, False, True, True]
    assert [LABELS[i] for i in decision.pred] == [g for g, _ in got]
    assert decision.confidence.tolist() == [clf.predict(t).confidence for t in texts]


def test_a_text_gets_the_same_answer_alone_as_in_a_batch(tmp_path: Path) -> None:
    directory = tiny_artifact.make(tmp_path, LABELS, TRANSFORMER, FIRST, "energy", 2.0, 0.8)
    texts = ["q1", "q2", "q3", "q4", "q5", "q2 q1", "q4 q4 q3"]
    with TestClient(create_app(Settings(model_dir=directory, warmup_queries=1))) as client:
        alone = [client.post("/predict", json={"text": t, "top_k": 2}).json() for t in texts]
        batch = client.post("/predict/batch", json={"texts": texts, "top_k": 2}).json()["predictions"]
        metrics = client.get("/metrics").text
    assert [{k: v for k, v in a.items() if k != "model_version"} for a in alone] == batch
    with TestClient(create_app(Settings(model_dir=directory, warmup_queries=0))) as client:
        timing = [client.post("/predict", json={"text": t}).headers["server-timing"] for t in ("q1", "q2")]
    assert timing[0].startswith("tokenize;dur=")
    assert timing[0].endswith('desc="first"')
    assert ", inference;dur=" in timing[1]
    assert timing[1].endswith('desc="transformer"')
    stages = [OnnxClassifier(load_artifact(directory), cpu_flags=frozenset()).predict(t).stage for t in texts]
    assert stages[:5] == ["first", "transformer", "transformer", "first", "first"]
    # Each text was asked twice, alone and in the batch; warm-up queries are not counted.
    assert f'intent_answered_by_total{{stage="first"}} {2.0 * stages.count("first")}' in metrics
    assert f'intent_answered_by_total{{stage="transformer"}} {2.0 * stages.count("transformer")}' in metrics


VARIANTS = [
    {"name": "int8-dot", "requires_any": ["avx512_vnni", "avx_vnni", "amx_int8"], "cascade_threshold": 0.95},
    {"name": "generic", "requires_any": [], "cascade_threshold": 0.5},
]


@pytest.mark.parametrize(
    ("flags", "variant", "threshold"),
    [
        ({"avx2", "fma"}, "generic", 0.5),
        ({"avx2", "avx512f", "avx512_vnni"}, "int8-dot", 0.95),
        ({"avx2", "avx_vnni"}, "int8-dot", 0.95),
        ({"amx_tile", "amx_int8"}, "int8-dot", 0.95),
    ],
)
def test_variant_is_chosen_from_cpu_flags(tmp_path: Path, flags: set[str], variant: str, threshold: float) -> None:
    directory = tiny_artifact.make(tmp_path, LABELS, TRANSFORMER, FIRST, "energy", 2.0, 0.8, VARIANTS)
    clf = OnnxClassifier(load_artifact(directory), cpu_flags=frozenset(flags))
    assert (clf.variant_name, clf.cascade_threshold) == (variant, threshold)
    # q2's first stage says 'a' at 0.6: it answers only under the generic variant's 0.5.
    assert clf.predict("q2").stage == ("first" if variant == "generic" else "transformer")


def test_service_shows_and_exports_the_variant_it_chose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tiny_artifact.make(tmp_path, LABELS, TRANSFORMER, FIRST, "energy", 2.0, 0.8, VARIANTS)
    fake = cpu.CpuInfo("Fake EPYC", "AuthenticAMD", 23, 1, frozenset({"avx2", "fma"}))
    monkeypatch.setattr(cpu, "current", lambda: fake)
    with TestClient(create_app(Settings(model_dir=directory, warmup_queries=1))) as client:
        serving = client.get("/model").json()["serving"]
        metrics = client.get("/metrics").text
    assert serving["variant"] == "generic"
    assert serving["cascade_threshold"] == 0.5
    assert serving["cpu"] == fake.describe()
    assert 'variant="generic"' in metrics


def test_card_sha256_covers_every_served_file(tmp_path: Path) -> None:
    directory = tiny_artifact.make(tmp_path, LABELS, TRANSFORMER, FIRST, "energy", 2.0, 0.8)
    card = load_artifact(directory).card
    assert set(card.served_files) == {"model.onnx", "tokenizer.json", "labels.json", "static.onnx"}
    assert set(card.files) == set(card.served_files)
    with (directory / "static.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelLoadError, match=r"sha256 mismatch for .*static\.onnx"):
        load_artifact(directory)
    raw = json.loads((directory / "card.json").read_text())
    del raw["files"]["static.onnx"]
    (directory / "card.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="files lists no sha256 for static.onnx"):
        load_artifact(directory, verify=False)


def test_committed_card_loads_through_the_schema_and_every_served_file_matches() -> None:
    directory = ROOT / "models" / "clinc150"
    card = ModelCard.model_validate_json((directory / "card.json").read_bytes())
    artifact = load_artifact(directory)  # verifies the sha256 of every served file
    assert set(card.served_files) <= set(card.files)
    assert sorted(p.name for p in directory.iterdir() if p.name != "card.json") == sorted(card.files)
    assert artifact.card == card


def test_scores_by_hand_for_the_cascade_over_a_matrix() -> None:
    from compression.static import cascade_scores, choose_threshold

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
    from compression.static import choose_threshold

    # One in-scope query and ten out-of-scope ones, all of which the transformer gets right. The first stage
    # is sure of row 0 ('a', 0.9), says 'a' at 0.615 for row 1 (out of scope), and `oos` for the rest.
    gold = np.array([0] + [OOS] * 10)
    second = gold.copy()
    first = np.log(np.array([[0.9, 0.05, 0.05], [0.615, 0.2, 0.185]] + [[0.1, 0.1, 0.8]] * 9))
    # Answering row 1 loses a tenth of OOS recall: without tolerance, the threshold must rise above 0.615.
    assert choose_threshold(first, second, gold, OOS) == 0.62
    assert choose_threshold(first, second, gold, OOS, oos_tolerance=0.05) == 0.62
    assert choose_threshold(first, second, gold, OOS, oos_tolerance=0.1) == 0.3
