"""Validation metrics, and the out-of-scope confidence threshold that the service applies."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

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


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probs: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return probs


def apply_threshold(probs: np.ndarray, oos_index: int, threshold: float) -> np.ndarray:
    """Argmax, except that a top probability under the threshold means out-of-scope."""
    pred = probs.argmax(axis=-1)
    return np.where(probs.max(axis=-1) < threshold, oos_index, pred)


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


# The operating point: catch at least this share of out-of-scope queries on validation.
OOS_RECALL_TARGET = 0.85


def tune_threshold(
    probs: np.ndarray, gold: np.ndarray, oos_index: int, min_oos_recall: float = OOS_RECALL_TARGET
) -> tuple[float, Scores]:
    """The threshold (grid of 0.01) with the best test-weighted accuracy among those that reach the OOS
    recall target; if none does, the best overall. Ties go to the lowest threshold."""
    grid = [0.0, *(round(float(t), 2) for t in np.arange(0.01, 1.0, 0.01))]
    scored = [(t, score(apply_threshold(probs, oos_index, t), gold, oos_index)) for t in grid]
    feasible = [(t, s) for t, s in scored if s.oos_recall >= min_oos_recall - 1e-9]
    pool = feasible or scored
    best_t, best = pool[0]
    for t, s in pool[1:]:
        if s.test_weighted_accuracy > best.test_weighted_accuracy + 1e-9:
            best_t, best = t, s
    return best_t, best
