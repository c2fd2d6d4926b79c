"""The cascade rule: a cheap first stage answers a query when it is confident and its answer is an intent;
every other query goes on to the transformer, whose OOS rule then decides.

Out-of-scope is never answered by the first stage: it sees only a bag of tokens, and an out-of-scope query
sent down an intent's flow is the costly error, so those always get the transformer's judgement.
Vectorised like `app.oos`, so the factory tunes the threshold with the code that serves.
"""

from __future__ import annotations

import numpy as np

from app.oos import Decision, softmax


def first_stage(logits: np.ndarray, oos_index: int, threshold: float) -> tuple[np.ndarray, Decision]:
    """Which rows the first stage answers (top probability >= threshold and not `oos`), and its decision."""
    probs = softmax(logits)
    pred = probs.argmax(axis=-1)
    confidence = np.take_along_axis(probs, pred[..., None], axis=-1)[..., 0]
    answered = (confidence >= threshold) & (pred != oos_index)
    return answered, Decision(pred=pred, confidence=confidence, probs=probs)


def combine(answered: np.ndarray, first: Decision, second: Decision) -> Decision:
    """Row by row, the first stage's decision where it answered, else the second's."""
    keep = answered[..., None]
    return Decision(
        pred=np.where(answered, first.pred, second.pred),
        confidence=np.where(answered, first.confidence, second.confidence),
        probs=np.where(keep, first.probs, second.probs),
    )
