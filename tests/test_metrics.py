from __future__ import annotations

import numpy as np
import pytest

from compression.metrics import apply_threshold, score, tune_threshold

OOS = 2


def test_score_by_hand() -> None:
    gold = np.array([0, 1, 2, 2])
    pred = np.array([0, 2, 2, 0])
    s = score(pred, gold, OOS)
    assert s.accuracy == 0.5
    assert s.in_scope_accuracy == 0.5
    assert s.oos_recall == 0.5
    assert s.test_weighted_accuracy == pytest.approx(0.818 * 0.5 + 0.182 * 0.5)


def test_threshold_sends_low_confidence_to_oos() -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]])
    assert apply_threshold(probs, OOS, 0.5).tolist() == [0, OOS]
    assert apply_threshold(probs, OOS, 0.0).tolist() == [0, 0]


def test_tuned_threshold_reaches_the_oos_recall_target_when_it_can() -> None:
    # Two confident in-scope rows, two unsure out-of-scope rows, one unsure in-scope row.
    probs = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.5, 0.3, 0.2], [0.45, 0.35, 0.2], [0.55, 0.25, 0.2]])
    gold = np.array([0, 1, OOS, OOS, 0])
    t, s = tune_threshold(probs, gold, OOS, min_oos_recall=1.0)
    assert s.oos_recall == 1.0
    assert 0.5 < t <= 0.55
    _, s0 = tune_threshold(probs, gold, OOS, min_oos_recall=0.0)
    assert s0.test_weighted_accuracy >= s.test_weighted_accuracy
