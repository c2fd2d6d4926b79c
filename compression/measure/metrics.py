"""Validation metrics, and tuning of the out-of-scope threshold over the engine's rules (app.engine.rules)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from app.engine.rules import RULES, Outputs, rule_class

# Share of in-scope and out-of-scope queries in CLINC150's held-out test split (4,500 / 1,000).
TEST_IN_SCOPE_SHARE = 0.818
TEST_OOS_SHARE = 0.182


@dataclass(frozen=True)
class Scores:
    accuracy: float
    in_scope_accuracy: float
    oos_recall: float
    test_weighted_accuracy: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def score(pred: np.ndarray, gold: np.ndarray, oos_index: int) -> Scores:
    in_scope = gold != oos_index
    correct = pred == gold
    ins = float(correct[in_scope].mean()) if in_scope.any() else float("nan")
    oos = float(correct[~in_scope].mean()) if (~in_scope).any() else float("nan")
    return Scores(
        accuracy=float(correct.mean()),
        in_scope_accuracy=ins,
        oos_recall=oos,
        test_weighted_accuracy=TEST_IN_SCOPE_SHARE * ins + TEST_OOS_SHARE * oos,
        n=len(gold),
    )


# The operating point: catch at least this share of out-of-scope queries on validation, and, where the
# model can, keep at least this in-scope accuracy; within that, the best test-weighted accuracy.
OOS_RECALL_TARGET = 0.85
IN_SCOPE_FLOOR = 0.95
# The served model's accuracy bar (issue #5): the two floors above, and this test-weighted accuracy.
TEST_WEIGHTED_BAR = 0.935
# Issue #15's part of it: OOS recall on CLINC's 350 out-of-scope queries that no stage trains on (the report pool).
CLINC_OOS_RECALL_BAR = 0.88


def bar_shortfalls(row: dict[str, Any], clinc_oos_recall: float | None = None) -> list[str]:
    """What a benchmark row misses of the served model's accuracy bar; empty when it meets all of it.
    `clinc_oos_recall`, the served path's recall on the 350 where the model has that pool, is checked too."""
    bar = [
        ("in-scope accuracy", row.get("in_scope_accuracy"), IN_SCOPE_FLOOR),
        ("OOS recall", row.get("oos_recall"), OOS_RECALL_TARGET),
        ("test-weighted accuracy", row.get("test_weighted_accuracy"), TEST_WEIGHTED_BAR),
    ]
    if clinc_oos_recall is not None:
        bar.append(("OOS recall on the 350 CLINC out-of-scope queries", clinc_oos_recall, CLINC_OOS_RECALL_BAR))
    missed = []
    for name, value, floor in bar:
        if value is None:
            missed.append(f"{name} not measured")
        elif value < floor - 1e-9:
            missed.append(f"{name} {value:.4f} < {floor}")
    return missed


CARD_FIGURES = {
    "in_scope_accuracy": "in-scope accuracy",
    "oos_recall": "OOS recall",
    "test_weighted_accuracy": "test-weighted accuracy",
}


def card_disagreements(row: dict[str, Any], card_validation: dict[str, Any]) -> list[str]:
    """Where a benchmark row's validation figures differ from those the card recorded when the model was built
    (rounded to 4 places, as the card stores them): the model answers differently on this machine. Figures the
    card lacks are not compared."""
    differ = []
    for key, name in CARD_FIGURES.items():
        here, recorded = row.get(key), card_validation.get(key)
        if here is not None and recorded is not None and round(float(here), 4) != round(float(recorded), 4):
            differ.append(f"{name} {here:.4f} (card {recorded:.4f})")
    return differ


def _grid(scores: np.ndarray, rule: str) -> list[float]:
    """Thresholds on the rule's grid, over the scores' range and inside the rule's valid range."""
    r = rule_class(rule)
    low = max(r.low, np.floor(scores.min() / r.grid_step) * r.grid_step)
    high = min(r.high - r.grid_step / 2, np.ceil(scores.max() / r.grid_step) * r.grid_step)
    return [round(float(t), 6) for t in np.arange(low, high + r.grid_step / 2, r.grid_step)]


def _meets(s: Scores, min_oos_recall: float, min_in_scope: float) -> tuple[bool, bool]:
    recall = s.oos_recall >= min_oos_recall - 1e-9
    return recall and s.in_scope_accuracy >= min_in_scope - 1e-9, recall


def tune_threshold(
    scores: np.ndarray,
    pred: np.ndarray,
    gold: np.ndarray,
    oos_index: int,
    rule: str = "max_prob",
    min_oos_recall: float = OOS_RECALL_TARGET,
    min_in_scope: float = IN_SCOPE_FLOOR,
) -> tuple[float, Scores]:
    """The threshold (grid of 0.01) with the best test-weighted accuracy among those that reach both the
    OOS recall target and the in-scope floor; failing that, among those that reach the recall target;
    failing that, the best overall. Ties go to the lowest threshold."""
    scored = [(t, score(np.where(scores < t, oos_index, pred), gold, oos_index)) for t in _grid(scores, rule)]
    met = [(t, s, _meets(s, min_oos_recall, min_in_scope)) for t, s in scored]
    recall_ok = [(t, s) for t, s, (_, recall) in met if recall]
    both_ok = [(t, s) for t, s, (both, _) in met if both]
    pool = both_ok or recall_ok or scored
    best_t, best = pool[0]
    for t, s in pool[1:]:
        if s.test_weighted_accuracy > best.test_weighted_accuracy + 1e-9:
            best_t, best = t, s
    return best_t, best


def tune_rule(
    logits: np.ndarray,
    gold: np.ndarray,
    oos_index: int,
    min_oos_recall: float = OOS_RECALL_TARGET,
    min_in_scope: float = IN_SCOPE_FLOOR,
) -> dict[str, tuple[float, Scores]]:
    """Each registered logits rule's tuned threshold and scores, in registry order: the stages' own reports.
    Feature-space rules need statistics that only the oos stage fits; it scores every rule."""
    out = Outputs.of(logits)
    return {
        name: tune_threshold(
            rule(rule.Spec(threshold=rule.default_threshold())).score(out),
            out.pred,
            gold,
            oos_index,
            name,
            min_oos_recall,
            min_in_scope,
        )
        for name, rule in RULES.items()
        if not rule.needs_features
    }


def best_rule(
    tuned: dict[str, tuple[float, Scores]],
    min_oos_recall: float = OOS_RECALL_TARGET,
    min_in_scope: float = IN_SCOPE_FLOOR,
) -> str:
    """The rule whose operating point meets more of the targets (both, then recall), then the better
    test-weighted accuracy; ties keep the earlier rule."""

    def key(rule: str) -> tuple[bool, bool, float]:
        s = tuned[rule][1]
        return (*_meets(s, min_oos_recall, min_in_scope), round(s.test_weighted_accuracy, 9))

    names = list(tuned)
    best = names[0]
    for rule in names[1:]:
        if key(rule) > key(best):
            best = rule
    return best


def threshold_for_in_scope(
    scores: np.ndarray, pred: np.ndarray, gold: np.ndarray, oos_index: int, rule: str, target: float
) -> float:
    """The strictest threshold on the rule's grid that keeps in-scope accuracy >= target: the OOS rule then
    catches all it can at that cost, and only in-scope queries choose it. A query is answered right when
    its argmax is its intent and its score reaches the threshold, so accuracy only falls as it rises. Where
    argmax alone is under the target (an undertrained model), the threshold under every score: the rule
    then never fires on validation."""
    r = rule_class(rule)
    in_scope = gold != oos_index
    right = np.sort(scores[in_scope & (pred == gold)])[::-1]
    need = max(1, math.ceil(target * int(in_scope.sum()) - 1e-9))
    below = float(right[need - 1]) if need <= len(right) else float(scores.min()) - r.grid_step
    t = math.floor(below / r.grid_step) * r.grid_step
    return round(min(max(t, r.low), r.high - r.grid_step), 6)


def threshold_for_rejection(
    scores: np.ndarray, pred: np.ndarray, gold: np.ndarray, oos_index: int, rule: str, rate: float
) -> float:
    """The threshold on the rule's grid under which the in-scope validation queries the rule refuses, with those
    the classifier already answers `oos` (pred), are at most `rate` of them, as near to it as the grid allows: a
    rejection rate a team chooses, for data whose in-scope accuracy no fixed target suits. Out-of-scope queries
    play no part. Where the classifier alone refuses more than the rate, the rule refuses nothing more."""
    r = rule_class(rule)
    in_scope = gold != oos_index
    if not in_scope.any():
        raise ValueError("no in-scope validation query to set the rejection rate on")
    refused = in_scope & (pred == oos_index)
    ranked = np.sort(scores[in_scope & ~refused])
    k = max(0, math.floor(rate * int(in_scope.sum()) + 1e-9) - int(refused.sum()))  # how many more may fall under
    if not len(ranked):
        return r.low if math.isfinite(r.low) else float(scores.min()) - r.grid_step
    at = float(ranked[k]) if k < len(ranked) else float(ranked[-1]) + r.grid_step
    t = math.floor(at / r.grid_step) * r.grid_step
    return round(min(max(t, r.low), r.high - r.grid_step), 6)


def threshold_for_policy(
    scores: np.ndarray, pred: np.ndarray, gold: np.ndarray, oos_index: int, rule: str, policy: Mapping[str, float]
) -> float:
    """The threshold a threshold policy (the oos stage's Config.threshold_policy, as the card records it) names:
    `in_scope_rejection` (threshold_for_rejection) or `in_scope_accuracy` (threshold_for_in_scope)."""
    if "in_scope_rejection" in policy:
        return threshold_for_rejection(scores, pred, gold, oos_index, rule, policy["in_scope_rejection"])
    return threshold_for_in_scope(scores, pred, gold, oos_index, rule, policy["in_scope_accuracy"])


def selection_score(report: Mapping[str, Any]) -> float:
    """What stages choose candidates by (the search's trials, the quantisation's candidates), from a
    validation_report: test-weighted accuracy at the tuned OOS threshold; where validation has no out-of-scope
    query (a team's data without any), which leaves that undefined, argmax in-scope accuracy."""
    weighted = float(report["thresholded"]["test_weighted_accuracy"])
    return weighted if math.isfinite(weighted) else float(report["argmax"]["in_scope_accuracy"])
