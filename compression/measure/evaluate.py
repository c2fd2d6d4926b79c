"""Evaluation helpers shared by the stages: the training split, validation logits of a PyTorch model, and the
validation report (argmax, and the service's OOS rules tuned on validation)."""

from __future__ import annotations

from typing import Any

import numpy as np

from compression.data import OOS, Dataset, Split, load_wiki
from compression.measure.metrics import best_rule, score, tune_rule


def training_split(data: Dataset, wiki_path: str, wiki_oos: int, seed: int, subset: int = 0) -> Split:
    """Train (with oos_train only under --train-oos), optionally sampled, plus Wikipedia sentences as extra
    out-of-scope examples."""
    train = data.split("train")
    if subset:
        train = train.subset(subset, seed)
    return train + load_wiki(wiki_path, wiki_oos, seed)


def training_data(split: Split, data: Dataset, transfer: Split | None = None) -> dict[str, int]:
    """What a stage trained on, for its run record: how many labelled examples (and, for a distillation, how many
    transfer sentences in all, copies and soft-only ones included), and how many of them are CLINC's real
    out-of-scope queries (0 unless --train-oos), since the OOS pools are only unseen if none are."""
    real_oos = set(data.optional("oos_train").texts) | set(data.optional("oos_val").texts)
    seen = transfer.texts if transfer is not None else split.texts
    out = {"examples": len(split), "clinc_oos_queries": sum(t in real_oos for t in seen)}
    if transfer is not None:
        out["transfer_examples"] = len(transfer)
    return out


def evaluate(model: Any, tokenizer: Any, data: Dataset, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation logits and gold label ids."""
    from compression.training import Encoded, predict_logits

    val = data.split("val")
    logits = predict_logits(model, Encoded(tokenizer, val, data.labels, max_length))
    return logits, np.array(val.label_ids(data.labels))


def validation_report(logits: np.ndarray, gold: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Argmax scores, and the OOS rule and threshold with the best test-weighted accuracy at OOS recall >= 0.85."""
    oos = labels.index(OOS)
    tuned = tune_rule(logits, gold, oos)
    rule = best_rule(tuned)
    threshold, scores = tuned[rule]
    return {
        "argmax": score(logits.argmax(axis=-1), gold, oos).as_dict(),
        "oos_rule": rule,
        "oos_threshold": threshold,
        "thresholded": scores.as_dict(),
        "rules": {r: {"oos_threshold": t, "thresholded": s.as_dict()} for r, (t, s) in tuned.items()},
    }
