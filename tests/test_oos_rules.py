"""The feature-space OOS rule and the OOS pools on numbers chosen by hand: Mahalanobis scores, the fitted
statistics, the service and the factory agreeing on a real (tiny) artifact, the threshold chosen from
in-scope queries alone, the Wilson interval, and pools that refuse queries the model trained on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from app.artifact import load_artifact, sha256_file
from app.errors import ModelLoadError
from app.oos import RULES, FeatureStats, decide
from app.runtime import OnnxClassifier
from compression.data import WIKI_POOL_SIZE, load_clinc, load_wiki, load_wiki_pool
from compression.errors import FactoryError
from compression.features import fit_stats
from compression.metrics import threshold_for_in_scope
from compression.oos_pools import evaluation_pools, pool_scores, report_pool, tuning_split, wilson
from compression.oos_rule import Config, choose_rule
from tests import tiny_artifact
from tests.conftest import WIKI

LABELS = ["a", "b", "oos"]
OOS = 2
# Class means a = (4, 0) and b = (0, 4); with the identity as whitening, distances are plain squared ones.
MEANS = np.array([[4.0, 0.0], [0.0, 4.0]], dtype=np.float32)
IDENTITY = FeatureStats(whiten=np.eye(2, dtype=np.float32), centers=MEANS)
# Query qN's features (values exact in fp16); the logits are features @ HEAD = [f0, f1, 0].
FEATURES = np.array([[0, 0], [4, 0], [0, 4], [2, 2], [8, 0], [3, 0.5]], dtype=np.float32)
HEAD = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
# Nearest squared distance / 2 dims, negated: q0 16/2, q1 0, q2 0, q3 8/2, q4 16/2, q5 (1 + 0.25)/2.
BY_HAND = [-8.0, 0.0, 0.0, -4.0, -8.0, -0.625]


def test_mahalanobis_scores_by_hand() -> None:
    logits = FEATURES @ HEAD
    assert RULES["mahalanobis"].score(logits, FEATURES, IDENTITY).tolist() == BY_HAND
    # A whitening L = diag(1, 0.5) is the precision diag(1, 0.25): q5 is (3 - 4)^2 + 0.25 * 0.5^2 = 1.0625 from a.
    whiten = np.diag([1.0, 0.5]).astype(np.float32)
    scaled = FeatureStats(whiten=whiten, centers=MEANS @ whiten)
    assert scaled.sq_distances(FEATURES[5:6])[0].tolist() == pytest.approx([1.0625, 9 + 0.25 * 3.5**2])
    # q4 has large logits (energy 8.0007: confidently in scope) but lies far from every class mean.
    assert decide(logits, OOS, "energy", 2.0).pred[4] == 0
    assert decide(logits, OOS, "mahalanobis", -1.0, FEATURES, IDENTITY).pred.tolist() == [OOS, 0, 1, OOS, OOS, 0]
    with pytest.raises(ValueError, match="needs the model's features"):
        RULES["mahalanobis"].score(logits)


# energy_knn: two stored neighbours (unit rows), and its standardisation [energy mean, std, similarity mean,
# std, weight]: score = (E - 1) / 2 + 2 (S - 0.5) / 0.25.
NEIGHBOURS = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
COMBINE = np.array([1.0, 2.0, 0.5, 0.25, 2.0], dtype=np.float32)
KNN = FeatureStats(whiten=np.eye(2, dtype=np.float32), centers=MEANS, neighbours=NEIGHBOURS, combine=COMBINE)


def test_energy_knn_scores_by_hand() -> None:
    logits = np.array([[0, 0, 0], [2, 0, 0], [0, 0, 0]], dtype=np.float32)
    features = np.array([[4, 0], [0, 5], [-3, -4]], dtype=np.float32)
    # Unit features (1, 0), (0, 1), (-0.6, -0.8): nearest similarities 1, 0.8 and -0.6.
    assert KNN.nearest_similarity(features) == pytest.approx([1.0, 0.8, -0.6], abs=1e-6)
    # Energies ln 3, ln(e^2 + 2), ln 3.
    e0, e1 = math.log(3), math.log(math.e**2 + 2)
    by_hand = [(e0 - 1) / 2 + 2 * 0.5 / 0.25, (e1 - 1) / 2 + 2 * 0.3 / 0.25, (e0 - 1) / 2 - 2 * 1.1 / 0.25]
    assert RULES["energy_knn"].score(logits, features, KNN) == pytest.approx(by_hand, abs=1e-5)
    assert by_hand == pytest.approx([4.049306, 3.019772, -8.750694], abs=1e-6)
    # Row 2 is as confident as row 0 by its logits (same energy), but far from every training query.
    assert decide(logits, OOS, "energy", 1.0).pred.tolist() == [0, 0, 0]
    assert decide(logits, OOS, "energy_knn", 0.0, features, KNN).pred.tolist() == [0, 0, OOS]
    # Its cost is one dot product per stored neighbour; Mahalanobis's the whitening and the class centres.
    assert (RULES["energy_knn"].macs(KNN), RULES["mahalanobis"].macs(KNN), RULES["energy"].macs(KNN)) == (4, 8, 0)
    with pytest.raises(ValueError, match="energy_knn rule needs"):
        RULES["energy_knn"].score(logits, features, IDENTITY)


def test_energy_knn_statistics_are_checked_on_load(tmp_path: Path) -> None:
    path = tmp_path / "oos_stats.npz"
    KNN.save(path)
    loaded = FeatureStats.load(path)
    assert loaded.neighbours is not None
    assert loaded.combine is not None
    assert loaded.neighbours.dtype == np.float32  # stored in half precision, read back as float32
    assert np.abs(loaded.neighbours - NEIGHBOURS).max() < 1e-3
    assert loaded.combine.tolist() == COMBINE.tolist()
    bad = {
        "neighbours are": dict(neighbours=np.ones((2, 3), dtype=np.float32), combine=COMBINE),
        "combine must be 5 values": dict(neighbours=NEIGHBOURS, combine=COMBINE[:4]),
        "positive standard deviations": dict(neighbours=NEIGHBOURS, combine=np.array([0, 0, 0, 1, 1], np.float32)),
        "non-finite": dict(neighbours=NEIGHBOURS, combine=np.array([np.nan, 1, 0, 1, 1], np.float32)),
    }
    for message, arrays in bad.items():
        np.savez(path, whiten=np.eye(2, dtype=np.float32), centers=MEANS, **arrays)
        with pytest.raises(ValueError, match=message):
            FeatureStats.load(path)


def test_the_service_and_the_factory_agree_on_energy_knn(tmp_path: Path) -> None:
    """FEATURES through the tiny artifact: the stored (half-precision) neighbours decide in both."""
    directory = tiny_artifact.make(tmp_path, LABELS, FEATURES, None, "energy_knn", 0.0, stats=KNN, head=HEAD)
    clf = OnnxClassifier(load_artifact(directory))
    texts = [f"q{i}" for i in range(len(FEATURES))]
    served = [clf.predict(t) for t in texts]
    logits = clf.stage_logits(texts)
    factory, _ = clf.decisions(logits)
    assert [LABELS[i] for i in factory.pred] == [p.intent for p in served]
    # q0 has no direction (zero features, similarity 0) and low energy: -0.45 - 4 is under 0.
    assert served[0].intent == "oos"
    # q4 (8, 0) is on neighbour (1, 0) with energy 8.0007: 3.5 + 4 = 7.5, answered.
    assert served[4].intent == "a"


def test_fitted_statistics_whiten_by_the_inverse_of_the_shared_covariance() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    features = rng.normal(size=(120, 3)) * [1.0, 2.0, 0.5] + np.array([[0, 0, 0], [5, 0, 0], [0, 5, 0]])[labels]
    stats = fit_stats(features, labels, ridge=0.0)
    means = np.stack([features[labels == c].mean(0) for c in range(3)])
    centred = features - means[labels]
    precision = np.linalg.inv(centred.T @ centred / (120 - 3))
    x = rng.normal(size=(5, 3))
    by_hand = np.array([[(row - m) @ precision @ (row - m) for m in means] for row in x])
    assert stats.sq_distances(x) == pytest.approx(by_hand, rel=1e-4, abs=1e-4)
    with pytest.raises(FactoryError, match="two classes"):
        fit_stats(features[:40], labels[:40])


def test_the_service_and_the_factory_agree_on_the_feature_rule(tmp_path: Path) -> None:
    directory = tiny_artifact.make(tmp_path, LABELS, FEATURES, None, "mahalanobis", -1.0, stats=IDENTITY, head=HEAD)
    clf = OnnxClassifier(load_artifact(directory))
    texts = [f"q{i}" for i in range(len(FEATURES))]
    served = [clf.predict(t) for t in texts]
    assert [p.intent for p in served] == ["oos", "a", "b", "oos", "oos", "a"]
    logits = clf.stage_logits(texts)
    assert logits.features is not None
    assert logits.features.tolist() == FEATURES.tolist()
    factory, _ = clf.decisions(logits)
    assert [LABELS[i] for i in factory.pred] == [p.intent for p in served]
    assert factory.confidence.tolist() == [p.confidence for p in served]


def test_a_feature_rule_needs_its_statistics_intact(tmp_path: Path) -> None:
    directory = tiny_artifact.make(tmp_path, LABELS, FEATURES, None, "mahalanobis", -1.0, stats=IDENTITY, head=HEAD)
    card = json.loads((directory / "card.json").read_text())
    without = {k: v for k, v in card.items() if k != "oos_stats"}
    (directory / "card.json").write_text(json.dumps(without))
    with pytest.raises(ModelLoadError, match="needs features_output and oos_stats"):
        load_artifact(directory)
    (directory / "card.json").write_text(json.dumps(card))
    stats = directory / "oos_stats.npz"
    stats.write_bytes(stats.read_bytes()[:-9] + b"tampered!")
    with pytest.raises(ModelLoadError, match="sha256 mismatch for .*oos_stats.npz"):
        load_artifact(directory)
    # Matching sha256, but not an npz of the right arrays: one clear line, not a crash.
    card["files"]["oos_stats.npz"]["sha256"] = sha256_file(stats)
    (directory / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="unreadable oos_stats.npz"):
        OnnxClassifier(load_artifact(directory))
    # Statistics of another width than the model's features.
    FeatureStats(np.eye(3, dtype=np.float32), np.zeros((2, 3), dtype=np.float32)).save(stats)
    card["files"]["oos_stats.npz"]["sha256"] = sha256_file(stats)
    (directory / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="is for 3 features, the model gives"):
        OnnxClassifier(load_artifact(directory))


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
