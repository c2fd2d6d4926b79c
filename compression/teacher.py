"""Stage 1: fine-tune a pretrained encoder on CLINC150 (151 classes) as the teacher."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compression import checkpoint
from compression.data import OOS, Clinc, Split, load_wiki
from compression.metrics import best_rule, score, tune_rule
from compression.provenance import write_run
from compression.training import Encoded, TrainConfig, Trainer, predict_logits, seed_everything

log = logging.getLogger(__name__)


@dataclass
class TeacherConfig:
    pretrained: str | None = None
    wiki_path: str = "../shared/data/clinc150/wiki_sents.txt"
    wiki_oos: int = 2000
    train_subset: int = 0  # 0 means the whole training split


def training_split(data: Clinc, wiki_path: str, wiki_oos: int, seed: int, subset: int = 0) -> Split:
    """Train + oos_train, optionally sampled, plus Wikipedia sentences as extra out-of-scope examples."""
    train = data.split("train")
    if subset:
        train = train.subset(subset, seed)
    return train + load_wiki(wiki_path, wiki_oos, seed)


def evaluate(model: Any, tokenizer: Any, data: Clinc, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation logits and gold label ids."""
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


def run(data: Clinc, out: Path, cfg: TeacherConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    seed_everything(train_cfg.seed)
    model, tokenizer = checkpoint.load_pretrained(cfg.pretrained, data.labels)
    split = training_split(data, cfg.wiki_path, cfg.wiki_oos, train_cfg.seed, cfg.train_subset)
    log.info("teacher: %d training examples, %d labels", len(split), len(data.labels))
    encoded = Encoded(tokenizer, split, data.labels, train_cfg.max_length)
    history = Trainer(model, train_cfg).train(encoded)
    logits, gold = evaluate(model, tokenizer, data, train_cfg.max_length)
    report = validation_report(logits, gold, data.labels)
    checkpoint.save(out, model, tokenizer, data.labels)
    write_run(out, "teacher", {"teacher": vars(cfg), "train": train_cfg.as_dict()}, report, history=history)
    log.info("teacher validation: %s", report)
    return report
