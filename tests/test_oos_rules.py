"""The feature-space OOS rules and the OOS pools on numbers chosen by hand: Mahalanobis and energy_knn scores,
their fit, the gate that skips the neighbour scan, the engine on a real (tiny) artifact with a feature rule, the
threshold chosen from in-scope queries alone, the Wilson interval, and pools that refuse queries the model
trained on."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.engine.artifact import load_artifact, sha256_file
from app.engine.engine import Engine
from app.engine.errors import ModelLoadError
from app.engine.rules import (
    EnergyKnn,
    EnergyKnnSpec,
    FitData,
    Gate,
    Mahalanobis,
    MahalanobisSpec,
    Outputs,
    Standardise,
    spherical_kmeans,
    write_npz,
)
from compression.data import WIKI_POOL_SIZE, load_clinc, load_wiki, load_wiki_pool
from compression.errors import FactoryError
from compression.measure.metrics import threshold_for_in_scope, threshold_for_rejection
from compression.measure.pools import (
    evaluation_pools,
    pool_scores,
    report_pool,
    tuning_recall,
    tuning_split,
    wilson,
)
from compression.stages.oos import Config, choose_rule
from tests import tiny_artifact
from tests.conftest import WIKI

LABELS = ["a", "b", "oos"]
OOS = 2
# Class means a = (4, 0) and b = (0, 4); with the identity as whitening, distances are plain squared ones.
MEANS = np.array([[4.0, 0.0], [0.0, 4.0]], dtype=np.float32)
MAHALANOBIS = {"kind": "mahalanobis", "threshold": -1.0, "stats_file": "stats.npz"}
IDENTITY = Mahalanobis(MahalanobisSpec(**MAHALANOBIS), np.eye(2, dtype=np.float32), MEANS)
# Query qN's features (values exact in fp16); the logits are features @ HEAD = [f0, f1, 0].
FEATURES = np.array([[0, 0], [4, 0], [0, 4], [2, 2], [8, 0], [3, 0.5]], dtype=np.float32)
HEAD = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
# Nearest squared distance / 2 dims, negated: q0 16/2, q1 0, q2 0, q3 8/2, q4 16/2, q5 (1 + 0.25)/2.
BY_HAND = [-8.0, 0.0, 0.0, -4.0, -8.0, -0.625]


def outputs(features: np.ndarray) -> Outputs:
    return Outputs.of(features @ HEAD, features)


def test_mahalanobis_scores_by_hand() -> None:
    assert IDENTITY.score(outputs(FEATURES)).tolist() == BY_HAND
    # A whitening L = diag(1, 0.5) is the precision diag(1, 0.25): q5 is (3 - 4)^2 + 0.25 * 0.5^2 = 1.0625 from a.
    whiten = np.diag([1.0, 0.5]).astype(np.float32)
    scaled = Mahalanobis(IDENTITY.spec, whiten, MEANS @ whiten)
    assert scaled.sq_distances(FEATURES[5:6])[0].tolist() == pytest.approx([1.0625, 9 + 0.25 * 3.5**2])
    # q4 has large logits (energy 8.0007: confidently in scope) but lies far from every class mean.
    assert IDENTITY.decide(outputs(FEATURES), OOS)[0].tolist() == [OOS, 0, 1, OOS, OOS, 0]


# energy_knn: two reference vectors (unit rows), and score = (E - 1) / 2 + 2 (S - 0.5) / 0.25.
REFERENCES = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
KNN_SPEC = {
    "kind": "energy_knn",
    "threshold": 0.0,
    "energy": {"mean": 1.0, "std": 2.0},
    "similarity": {"mean": 0.5, "std": 0.25},
    "weight": 2.0,
    "references_file": "references.npz",
}
KNN = EnergyKnn(EnergyKnnSpec(**KNN_SPEC), REFERENCES)
KNN_LOGITS = np.array([[0, 0, 0], [2, 0, 0], [0, 0, 0]], dtype=np.float32)
KNN_FEATURES = np.array([[4, 0], [0, 5], [-3, -4]], dtype=np.float32)


def test_energy_knn_scores_by_hand() -> None:
    out = Outputs.of(KNN_LOGITS, KNN_FEATURES)
    # Unit features (1, 0), (0, 1), (-0.6, -0.8): nearest similarities 1, 0.8 and -0.6.
    assert KNN.nearest_similarity(KNN_FEATURES) == pytest.approx([1.0, 0.8, -0.6], abs=1e-6)
    # Energies ln 3, ln(e^2 + 2), ln 3.
    e0, e1 = math.log(3), math.log(math.e**2 + 2)
    by_hand = [(e0 - 1) / 2 + 2 * 0.5 / 0.25, (e1 - 1) / 2 + 2 * 0.3 / 0.25, (e0 - 1) / 2 - 2 * 1.1 / 0.25]
    assert KNN.score(out) == pytest.approx(by_hand, abs=1e-5)
    assert by_hand == pytest.approx([4.049306, 3.019772, -8.750694], abs=1e-6)
    # Row 2 is as confident as row 0 by its logits (same energy), but far from every reference.
    assert KNN.decide(out, OOS)[0].tolist() == [0, 0, OOS]
    # Its cost is one dot product per reference; Mahalanobis's the whitening and the class centres.
    assert (KNN.macs(), IDENTITY.macs()) == (4, 8)


def test_the_gate_skips_the_scan_for_rows_above_the_energy_floor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row 2 (energy ln 3 = 1.0986) is far from every reference; a floor at 1.0 lets the logits answer it alone,
    and the scan runs only on the rows under the floor."""
    out = Outputs.of(KNN_LOGITS, KNN_FEATURES)
    scanned: list[np.ndarray] = []
    real = EnergyKnn.nearest_similarity

    def spy(self: EnergyKnn, features: np.ndarray) -> np.ndarray:
        scanned.append(features.copy())
        return real(self, features)

    monkeypatch.setattr(EnergyKnn, "nearest_similarity", spy)
    gated = KNN.with_gate(1.0)
    assert gated.spec.gate == Gate(energy_floor=1.0)
    assert gated.decide(out, OOS)[0].tolist() == [0, 0, 0]
    assert scanned == []  # every row's energy (1.0986, 2.1269, 1.0986) reaches the floor
    assert KNN.with_gate(2.0).decide(out, OOS)[0].tolist() == [0, 0, OOS]
    assert [s.tolist() for s in scanned] == [KNN_FEATURES[[0, 2]].tolist()]  # row 1 (2.1269) skipped the scan


def test_the_gate_decides_a_row_alone_as_in_any_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine asks about one text at a time, where every row is under the floor or none is: both take a
    shorter path than a mixed batch, and must give its answers and confidences bit for bit."""
    out = Outputs.of(KNN_LOGITS, KNN_FEATURES)
    scanned: list[int] = []
    real = EnergyKnn.nearest_similarity

    def spy(self: EnergyKnn, features: np.ndarray) -> np.ndarray:
        scanned.append(len(features))
        return real(self, features)

    monkeypatch.setattr(EnergyKnn, "nearest_similarity", spy)
    # Floors under, between and over the energies (1.0986, 2.1269, 1.0986): none, rows 0 and 2, all tested.
    for floor, tested, answers in ((1.0, [], [0, 0, 0]), (2.0, [2], [0, 0, OOS]), (3.0, [3], [0, 0, OOS])):
        scanned.clear()
        gated = KNN.with_gate(floor)
        pred, confidence = gated.decide(out, OOS)
        assert (pred.tolist(), scanned) == (answers, tested), floor
        alone = [gated.decide(out.rows(np.array([i])), OOS) for i in range(3)]
        assert np.array_equal(np.concatenate([p for p, _ in alone]), pred), floor
        assert np.array_equal(np.concatenate([c for _, c in alone]), confidence), floor
        assert confidence.dtype == np.float32
    # Row 2 sent to oos: its confidence is the doubt about its best intent, max(p(oos), 1 - p(top)); the others
    # keep their top probability.
    probs = out.probs
    assert confidence[2] == max(probs[2, OOS], np.float32(1.0) - probs[2].max())
    assert confidence[:2].tolist() == probs[:2].max(axis=-1).tolist()


def test_energy_knn_is_fitted_on_in_scope_queries(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 30)
    train = np.where(labels[:, None] == 0, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]) + rng.normal(0, 0.1, (60, 3))
    val = np.array([[1.0, 0.1, 0.0], [0.1, 1.0, 0.0], [0.9, 0.0, 0.2]])
    logits = rng.normal(size=(60, 3)).astype(np.float32)
    data = FitData(Outputs.of(logits, train), labels, Outputs.of(logits[:3], val))
    every = EnergyKnn.fit(data, {})
    assert isinstance(every, EnergyKnn)
    assert every.references.shape == (60, 3)
    norms = np.linalg.norm(every.references, axis=-1)
    assert np.abs(norms - 1).max() < 2e-3  # unit rows, rounded to half precision as they are stored
    assert np.array_equal(every.references, every.references.astype(np.float16).astype(np.float32))
    # The standardisation is the validation queries' own.
    energy = Outputs.of(logits[:3], val).energy
    assert every.spec.energy == Standardise(mean=float(energy.mean()), std=float(energy.std()))
    similarity = every.nearest_similarity(val)
    assert every.spec.similarity.mean == pytest.approx(float(similarity.mean()))
    two = EnergyKnn.fit(data, {"prototypes_per_intent": 2, "weight": 0.5})
    assert isinstance(two, EnergyKnn)
    assert two.references.shape == (4, 3)
    assert two.spec.weight == 0.5
    # Saved and read back as the engine reads it.
    two.with_threshold(-1.0).save(tmp_path)
    back = EnergyKnn.load(two.with_threshold(-1.0).spec, tmp_path)
    assert np.array_equal(back.references, two.references)


def test_spherical_kmeans_finds_the_directions() -> None:
    rng = np.random.default_rng(1)
    directions = np.array([[1.0, 0.0], [0.0, 1.0]])
    points = np.concatenate([d + rng.normal(0, 0.05, (20, 2)) for d in directions])
    points /= np.linalg.norm(points, axis=-1, keepdims=True)
    centres = spherical_kmeans(points, 2)
    assert np.abs(np.linalg.norm(centres, axis=-1) - 1).max() < 1e-6
    assert sorted(np.round(np.abs(centres).argmax(-1)).tolist()) == [0, 1]


def test_mahalanobis_whitens_by_the_inverse_of_the_shared_covariance() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    features = rng.normal(size=(120, 3)) * [1.0, 2.0, 0.5] + np.array([[0, 0, 0], [5, 0, 0], [0, 5, 0]])[labels]
    data = FitData(Outputs.of(np.zeros((120, 3), np.float32), features), labels, Outputs.of(np.zeros((1, 3))))
    rule = Mahalanobis.fit(data, {"ridge": 0.0})
    assert isinstance(rule, Mahalanobis)
    means = np.stack([features[labels == c].mean(0) for c in range(3)])
    centred = features - means[labels]
    precision = np.linalg.inv(centred.T @ centred / (120 - 3))
    x = rng.normal(size=(5, 3))
    by_hand = np.array([[(row - m) @ precision @ (row - m) for m in means] for row in x])
    assert rule.sq_distances(x) == pytest.approx(by_hand, rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError, match="two classes"):
        Mahalanobis.fit(FitData(data.train.rows(labels == 0), labels[labels == 0], data.validation), {})


STATS = {"stats.npz": {"whiten": np.eye(2, dtype=np.float32), "centers": MEANS}}


def test_the_engine_serves_a_feature_rule(tmp_path: Path) -> None:
    directory = tiny_artifact.make(tmp_path, LABELS, FEATURES, None, MAHALANOBIS, head=HEAD, rule_files=STATS)
    engine = Engine.open(directory)
    texts = [f"q{i}" for i in range(len(FEATURES))]
    alone = [engine.predict(t) for t in texts]
    assert [p.intent for p in alone] == ["oos", "a", "b", "oos", "oos", "a"]
    out = engine.outputs(texts)
    assert out.features is not None
    assert out.features.tolist() == FEATURES.tolist()
    batch = engine.run(texts)
    assert [LABELS[i] for i in batch.pred] == [p.intent for p in alone]
    assert batch.confidence.tolist() == [p.confidence for p in alone]


def test_energy_knn_through_the_engine(tmp_path: Path) -> None:
    """FEATURES through the tiny artifact: the stored (half-precision) references decide."""
    files = {"references.npz": {"references": REFERENCES.astype(np.float16)}}
    directory = tiny_artifact.make(tmp_path, LABELS, FEATURES, None, KNN_SPEC, head=HEAD, rule_files=files)
    engine = Engine.open(directory)
    served = [engine.predict(f"q{i}") for i in range(len(FEATURES))]
    # q0 has no direction (zero features, similarity 0) and low energy: -0.45 - 4 is under 0.
    assert served[0].intent == "oos"
    # q4 (8, 0) is on reference (1, 0) with energy 8.0007: 3.5 + 4 = 7.5, answered.
    assert served[4].intent == "a"


def _rewrite(directory: Path, card: dict[str, Any]) -> None:
    (directory / "card.json").write_text(json.dumps(card))


def test_a_feature_rule_needs_its_files_intact(tmp_path: Path) -> None:
    directory = tiny_artifact.make(tmp_path, LABELS, FEATURES, None, MAHALANOBIS, head=HEAD, rule_files=STATS)
    card = json.loads((directory / "card.json").read_text())
    without = json.loads(json.dumps(card))
    del without["spec"]["stages"][0]["features_output"]
    _rewrite(directory, without)
    with pytest.raises(ModelLoadError, match="the mahalanobis rule needs the transformer's features_output"):
        load_artifact(directory)
    _rewrite(directory, card)
    stats = directory / "stats.npz"
    stats.write_bytes(stats.read_bytes()[:-9] + b"tampered!")
    with pytest.raises(ModelLoadError, match=r"sha256 mismatch for .*stats\.npz"):
        load_artifact(directory)
    # Matching sha256, but not an npz of the right arrays: one clear line, not a crash.
    card["files"]["stats.npz"] = {"sha256": sha256_file(stats), "bytes": stats.stat().st_size}
    _rewrite(directory, card)
    with pytest.raises(ModelLoadError, match="unreadable stats.npz"):
        Engine.open(directory)
    # Statistics of another width than the model's features.
    write_npz(stats, {"whiten": np.eye(3, dtype=np.float32), "centers": np.zeros((2, 3), dtype=np.float32)})
    card["files"]["stats.npz"] = {"sha256": sha256_file(stats), "bytes": stats.stat().st_size}
    _rewrite(directory, card)
    with pytest.raises(ModelLoadError, match="is for 3 features, the model gives 2"):
        Engine.open(directory)
    # References with a non-finite value.
    write_npz(stats, {"whiten": np.eye(2, dtype=np.float32), "centers": np.array([[np.nan, 0.0]], np.float32)})
    card["files"]["stats.npz"] = {"sha256": sha256_file(stats), "bytes": stats.stat().st_size}
    _rewrite(directory, card)
    with pytest.raises(ModelLoadError, match="stats.npz: non-finite values"):
        Engine.open(directory)


def test_the_threshold_comes_from_in_scope_queries_alone() -> None:
    # Rows 0-4 in scope (row 3 misclassified), row 5 oos. Right answers score 5, 4, 3, 0.5.
    scores = np.array([5.0, 4.0, 3.0, 9.0, 0.5, -1.0])
    pred = np.array([0, 0, 1, 1, 0, 0])
    gold = np.array([0, 0, 1, 0, 0, OOS])
    # 0.6 of 5 in-scope rows is 3 right answers: the strictest threshold that keeps them is 3.0.
    assert threshold_for_in_scope(scores, pred, gold, OOS, "energy", 0.6) == 3.0
    assert threshold_for_in_scope(scores, pred, gold, OOS, "energy", 0.8) == 0.5
    # The oos row's score never moves it: the same threshold with the oos row scored anything at all.
    assert threshold_for_in_scope(np.r_[scores[:5], 100.0], pred, gold, OOS, "energy", 0.6) == 3.0
    # Out of reach (argmax gets 4 of 5): a threshold under every score, so the rule never fires.
    assert threshold_for_in_scope(scores, pred, gold, OOS, "energy", 1.0) == -1.01
    assert threshold_for_in_scope(np.full(6, 0.5), pred, gold, OOS, "max_prob", 1.0) == 0.49


def test_a_rejection_rate_sets_the_threshold_from_in_scope_scores_alone() -> None:
    # Ten in-scope rows scored 0.5 .. 9.5 (right or wrong alike), and two oos rows scored anything.
    scores = np.r_[np.arange(10) + 0.5, -50.0, 50.0]
    gold = np.r_[np.zeros(10, dtype=int), OOS, OOS]
    pred = np.zeros(12, dtype=int)  # the classifier answers in scope everywhere

    def rate(*args: Any) -> float:
        return threshold_for_rejection(*args)

    # At most 2 of 10 in-scope rows under the threshold: the threshold is the third-lowest score, 2.5.
    t = rate(scores, pred, gold, OOS, "energy", 0.2)
    assert t == 2.5
    assert int((scores[:10] < t).sum()) == 2
    assert rate(scores, pred, gold, OOS, "energy", 0.25) == 2.5  # 2.5 rows: at most 2
    assert rate(scores, pred, gold, OOS, "energy", 0.0) == 0.5  # none rejected
    keep = [0, 1, 10, 11]
    assert rate(scores[keep], pred[keep], gold[keep], OOS, "energy", 0.5) == 1.5
    # The grid (0.01) rounds down, never up: 2.567 would reject a third row, 2.56 does not.
    shifted = np.r_[np.arange(10) + 0.567, -50.0, 50.0]
    assert rate(shifted, pred, gold, OOS, "energy", 0.2) == 2.56
    # A rule's range holds: max_prob's thresholds stay in [0, 1).
    assert rate(np.full(12, 1.0), pred, gold, OOS, "max_prob", 0.1) == 0.99
    # Rows the classifier itself answers `oos` count against the rate: with row 9 (the best-scored) refused so,
    # one more may fall under at 0.2, so the threshold is the second-lowest score; at 0.1, none more.
    refuses = pred.copy()
    refuses[9] = OOS
    assert rate(scores, refuses, gold, OOS, "energy", 0.2) == 1.5
    assert rate(scores, refuses, gold, OOS, "energy", 0.1) == 0.5
    assert rate(scores, refuses, gold, OOS, "energy", 0.0) == 0.5  # more than the rate already: nothing more
    with pytest.raises(ValueError, match="no in-scope validation query"):
        rate(np.array([1.0]), np.array([OOS]), np.array([OOS]), OOS, "energy", 0.1)


def test_wilson_interval_by_hand() -> None:
    # 0 of 10: [0, z^2 / (n + z^2)] = [0, 3.8416 / 13.8416].
    assert wilson(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)
    # 0.88 of 350: centre (0.88 + z^2/700) / (1 + z^2/350) = 0.875874, half-width
    # z / (1 + z^2/350) * sqrt(0.88 * 0.12 / 350 + z^2 / (4 * 350^2)) = 0.034110.
    low, high = wilson(308, 350)
    assert (round(low, 4), round(high, 4)) == (0.8418, 0.91)
    with pytest.raises(ValueError, match="n > 0"):
        wilson(0, 0)
    figures = pool_scores(np.array([OOS, OOS, 0, 1]), np.array([OOS, OOS, OOS, 1]), OOS)
    assert (figures["oos_n"], figures["oos_caught"], figures["oos_recall"]) == (3, 2, 0.6667)
    assert figures["in_scope_accuracy"] == 1.0


def test_the_pools_hold_no_query_any_stage_trains_on(data_path: Path) -> None:
    # Trained on oos_train, the model has no 350-query pool, and OOS recall is reported on oos_val.
    trained_on_oos = evaluation_pools(load_clinc(data_path, train_oos=True), str(WIKI))
    assert set(trained_on_oos) == {"validation", "oos_val", "wiki_heldout"}
    assert report_pool(trained_on_oos) == "oos_val"
    data = load_clinc(data_path, train_oos=False)
    assert "oos" not in data.split("train").intents
    pools = evaluation_pools(data, str(WIKI))
    assert report_pool(pools) == "clinc_oos"
    assert (len(pools["clinc_oos"]), len(pools["validation"]), len(pools["wiki_heldout"])) == (350, 3100, 2000)
    assert not set(pools["clinc_oos"].texts) & set(data.split("train").texts)
    trained = set(load_wiki(WIKI, 20_000, seed=7).texts)  # every sentence a stage could sample
    distinct = {line.strip() for line in WIKI.read_text().splitlines() if line.strip()}
    assert len(trained) + WIKI_POOL_SIZE == len(distinct)
    assert not trained & set(load_wiki_pool(WIKI).texts)
    tune = tuning_split(data, str(WIKI))
    assert len(tune) == 3000 + 2000
    assert not set(tune.texts) & set(pools["clinc_oos"].texts)


def test_a_teams_out_of_scope_half_tunes_with_the_wikipedia_pool_and_the_other_half_is_reported(
    tmp_path: Path, data_path: Path
) -> None:
    """With --oos-data, the rule is chosen on the held-out Wikipedia sentences and the `oos_tune` half pooled, and
    OOS recall is reported on the `oos_val` half, which chose nothing."""
    from compression.labelled import load_labelled

    raw = json.loads(data_path.read_text())
    rows = [r for intent in ("alarm", "balance") for r in [r for r in raw["train"] if r[1] == intent][:20]]
    (tmp_path / "t.csv").write_text("text,intent\n" + "".join(f'"{t}",{i}\n' for t, i in rows))
    outside = [t for t, _ in raw["oos_val"][:10]]
    (tmp_path / "o.csv").write_text("text\n" + "".join(f'"{t}"\n' for t in outside))
    data = load_labelled(tmp_path / "t.csv", oos_path=tmp_path / "o.csv")
    pools = evaluation_pools(data, str(WIKI))
    assert set(pools) == {"validation", "oos_val", "oos_tune", "wiki_heldout"}
    assert report_pool(pools) == "oos_val"
    assert not set(pools["oos_tune"].texts) & set(pools["validation"].texts)
    tune = tuning_split(data, str(WIKI))
    assert set(pools["oos_tune"].texts) <= set(tune.texts)
    assert not set(pools["oos_val"].texts) & set(tune.texts)
    # Pooled: 1,990 of the 2,000 sentences and 1 of the 5 examples caught.
    figures = {"wiki_heldout": {"oos_caught": 1990, "oos_n": 2000}, "oos_tune": {"oos_caught": 1, "oos_n": 5}}
    assert tuning_recall(figures) == pytest.approx(1991 / 2005)
    assert tuning_recall({"wiki_heldout": figures["wiki_heldout"]}) == pytest.approx(0.995)


def test_a_feature_rule_is_served_only_when_it_earns_its_file() -> None:
    cfg = Config(oos_feature_margin=0.25)
    # energy misses 1.0% of the tuning pool: a feature rule must catch a quarter of that, up to 0.9925.
    figures = {"max_prob": 0.98, "energy": 0.99, "mahalanobis": 0.992, "energy_knn": 0.9}
    assert choose_rule(figures, cfg) == "energy"
    assert choose_rule({**figures, "energy_knn": 0.9925}, cfg) == "energy_knn"
    assert choose_rule({**figures, "mahalanobis": 0.996, "energy_knn": 0.996}, cfg) == "mahalanobis"  # ties: order
    assert choose_rule({**figures, "max_prob": 0.99}, cfg) == "max_prob"
    with pytest.raises(FactoryError, match="--oos-features must be one of"):
        Config(oos_features="cls")
    with pytest.raises(FactoryError, match="--oos-feature-margin must be in"):
        Config(oos_feature_margin=1.0)
    with pytest.raises(FactoryError, match="--oos-knn-weight must be"):
        Config(oos_knn_weight=-1.0)
    with pytest.raises(FactoryError, match="--oos-prototypes must be"):
        Config(oos_prototypes=-1)
    with pytest.raises(FactoryError, match="--oos-rule must be auto or one of max_prob, energy, mahalanobis"):
        Config(oos_rule="entropy")
