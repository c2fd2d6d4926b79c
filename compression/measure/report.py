"""What a team needs to trust a build, from the served path's decisions on validation: each intent's precision,
recall and support, the pairs most often confused, and the OOS operating point (the share of in-scope queries
rejected, and of out-of-scope ones caught where validation has any). The artifact stage puts it in the card's
metrics (`validation_report`), so `GET /model` shows it."""

from __future__ import annotations

from typing import Any

import numpy as np

CONFUSED_PAIRS = 10


def validation_report(pred: np.ndarray, gold: np.ndarray, labels: list[str], oos_index: int) -> dict[str, Any]:
    """Per-intent figures (the OOS label among them), the most confused (gold, predicted) pairs, and the
    operating point. Precision is None for an intent never predicted; recall for one with no example."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    if pred.shape != gold.shape or pred.ndim != 1:
        raise ValueError(f"pred and gold must be the same 1-d shape, got {pred.shape} and {gold.shape}")
    n = len(labels)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (gold, pred), 1)
    intents = {}
    for i, name in enumerate(labels):
        hit, predicted, support = int(confusion[i, i]), int(confusion[:, i].sum()), int(confusion[i].sum())
        intents[name] = {
            "precision": round(hit / predicted, 4) if predicted else None,
            "recall": round(hit / support, 4) if support else None,
            "support": support,
        }
    off = confusion.copy()
    np.fill_diagonal(off, 0)
    order = np.argsort(-off, axis=None, kind="stable")[:CONFUSED_PAIRS]
    pairs = [
        {"intent": labels[g], "predicted": labels[p], "count": int(off[g, p])}
        for g, p in (np.unravel_index(k, off.shape) for k in order)
        if off[g, p] > 0
    ]
    in_scope = gold != oos_index
    operating: dict[str, Any] = {
        "in_scope_n": int(in_scope.sum()),
        "in_scope_rejected": round(float((pred[in_scope] == oos_index).mean()), 4) if in_scope.any() else None,
        "oos_n": int((~in_scope).sum()),
        "oos_recall": round(float((pred[~in_scope] == oos_index).mean()), 4) if (~in_scope).any() else None,
    }
    return {"intents": intents, "most_confused": pairs, "oos_operating_point": operating}
