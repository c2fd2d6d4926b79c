"""Out-of-scope rules: one registry, used by the service on one row and by the factory on a whole split.

A rule scores how in-scope a query looks from its logits; below the card's threshold the answer is `oos`.
Every function here is vectorised over leading axes, so that the service and the factory's evaluation run
the same arithmetic, and the factory's tuned threshold is exactly the one the service applies.
Adding a rule is one entry in `RULES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probs: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return probs


def _max_prob(logits: np.ndarray) -> np.ndarray:
    out: np.ndarray = softmax(logits).max(axis=-1)
    return out


def _energy(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=-1)
    out: np.ndarray = top + np.log(np.exp(logits - top[..., None]).sum(axis=-1))
    return out


@dataclass(frozen=True)
class OosRule:
    name: str
    score: Callable[[np.ndarray], np.ndarray]  # logits [..., C] -> in-scope score [...]
    low: float  # the thresholds that make sense for this score: low <= t < high
    high: float
    grid_step: float  # the factory tunes the threshold on this grid
    doc: str

    def check_threshold(self, threshold: float) -> None:
        if not math.isfinite(threshold):
            raise ValueError(f"oos_threshold must be finite, got {threshold}")
        if not self.low <= threshold < self.high:
            raise ValueError(f"oos_threshold must be in [{self.low}, {self.high}) for {self.name}, got {threshold}")


RULES: dict[str, OosRule] = {
    rule.name: rule
    for rule in (
        OosRule("max_prob", _max_prob, 0.0, 1.0, 0.01, "top softmax probability"),
        OosRule(
            "energy",
            _energy,
            -math.inf,
            math.inf,
            0.01,
            "log-sum-exp of the logits, the negative free energy of Liu et al. (2020), 'Energy-based "
            "Out-of-distribution Detection': it keeps the logits' scale, which the softmax normalises away",
        ),
    )
}


def get_rule(name: str) -> OosRule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown OOS rule {name[:40]!r}; expected one of {', '.join(RULES)}") from None


@dataclass(frozen=True)
class Decision:
    """Per row: the answer's label index, its confidence, and the softmax probabilities."""

    pred: np.ndarray
    confidence: np.ndarray
    probs: np.ndarray


def decide(logits: np.ndarray, oos_index: int, rule: str, threshold: float) -> Decision:
    """Argmax, unless the rule's score is under the threshold: then `oos`, with the model's doubt about its
    best in-scope guess, max(p(oos), 1 - p(top)), as the confidence."""
    probs = softmax(logits)
    pred = probs.argmax(axis=-1)
    top = np.take_along_axis(probs, pred[..., None], axis=-1)[..., 0]
    fired = get_rule(rule).score(logits) < threshold
    pred = np.where(fired, oos_index, pred)
    confidence = np.where(fired, np.maximum(probs[..., oos_index], 1.0 - top), top)
    return Decision(pred=pred, confidence=confidence, probs=probs)
