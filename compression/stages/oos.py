"""Stage: the served out-of-scope rule, fitted on in-scope data and chosen on pools no model trained on
(compression.measure.pools).

The classifier (the quantize stage's int8 transformer, or with --oos-classifier head the quick recipe's head) gets
features as a second output (by default the pretrained sentence encoder's embedding, from the embedder stage; or
its own). Every rule of the engine's registry (app.engine.rules.RULES) is fitted on the in-scope training queries
(`Rule.fit`), out-of-scope examples playing no part, and given the threshold that rejects at most
--oos-reject-rate of the in-scope validation queries (or, with --oos-in-scope-target, the strictest that keeps
in-scope validation accuracy at that target). The rule that catches the most of the held-out
Wikipedia sentences is served (a feature-space rule only by a margin, see choose_rule); the figures on the real
CLINC pool, which chose nothing, are the estimate that is reported.

Output: model.onnx with its features output, the rule's files, and rule.json, the rule's spec, which the static
and artifact stages read.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.engine.rules import RULES, EnergyKnn, FitData, Outputs, Rule, RuleSpecBase, load_rule
from compression.data import OOS, OOS_TUNE, Dataset
from compression.errors import FactoryError
from compression.graphs import (
    FEATURE_SOURCES,
    FEATURES_OUTPUT,
    add_encoder_output,
    add_features_output,
    gate_encoder_output,
    has_output,
)
from compression.measure.metrics import IN_SCOPE_FLOOR, threshold_for_policy
from compression.measure.pools import (
    TUNING_POOL,
    evaluation_pools,
    pool_scores,
    report_pool,
    tuning_recall,
)
from compression.onnx_stage import OnnxStage
from compression.records import write_run

if TYPE_CHECKING:
    from compression.pipeline import Context

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"
RULE_FILE = "rule.json"
# Stages whose output is a classifier the rule can sit on: the full recipe's int8 student, the quick recipe's head.
CLASSIFIERS = ("quantize", "head")


@dataclass
class Config:
    # What a team without out-of-scope examples can choose: how many of its own queries it will see refused. 2.5%
    # is about the share the committed CLINC150 model refuses on validation (0.0247 at in-scope accuracy 0.952).
    oos_reject_rate: float = field(
        default=0.025,
        metadata={
            "help": "each rule's threshold rejects at most this share of in-scope validation queries, on the path "
            "that is served (the static stage sets it on the cascade)"
        },
    )
    oos_in_scope_target: float | None = field(
        default=None,
        metadata={
            "help": "instead of --oos-reject-rate: the strictest threshold that keeps in-scope validation accuracy "
            f"at this (CLINC150's bar is {IN_SCOPE_FLOOR}; 0: off, for a recipe that sets it, such as served)"
        },
    )
    oos_classifier: str = field(
        default="quantize",
        metadata={"help": f"the classifier the rule is fitted on: {' or '.join(CLASSIFIERS)}'s output"},
    )
    oos_ridge: float = field(
        default=1e-3, metadata={"help": "mahalanobis: ridge of the shared covariance, share of its trace"}
    )
    oos_rule: str = field(
        default="auto",
        metadata={
            "help": "the served rule, one of the registry's (app.engine.rules.RULES), or auto: the one that "
            "catches the most of the held-out Wikipedia sentences, a feature-space rule only by a margin"
        },
    )
    oos_feature_margin: float = field(
        default=0.25,
        metadata={
            "help": "share of the best logits rule's misses on the tuning pool that a feature-space rule must "
            "catch to be served"
        },
    )
    oos_features: str = field(
        default="embedder",
        metadata={"help": f"features of the feature-space rules: {', '.join(FEATURE_SOURCES)} (compression.graphs)"},
    )
    oos_knn_gate: float = field(
        default=0.0,
        metadata={
            "help": "energy_knn tests the neighbours (and a joined sentence encoder runs) only where the "
            "standardised energy is under this; elsewhere the logits answer. inf: on every query"
        },
    )
    oos_knn_weight: float = field(
        default=1.0,
        metadata={"help": "weight of the standardised neighbour similarity against the energy's in energy_knn"},
    )
    oos_prototypes: int = field(
        default=0,
        metadata={"help": "energy_knn's reference vectors: k-means prototypes per intent (0: every training query)"},
    )

    def __post_init__(self) -> None:
        if self.oos_rule != "auto" and self.oos_rule not in RULES:
            raise FactoryError(f"--oos-rule must be auto or one of {', '.join(RULES)}, got {self.oos_rule!r}")
        if self.oos_features not in FEATURE_SOURCES:
            raise FactoryError(f"--oos-features must be one of {', '.join(FEATURE_SOURCES)}, got {self.oos_features!r}")
        if self.oos_in_scope_target is not None and not 0 <= self.oos_in_scope_target <= 1:
            raise FactoryError(f"--oos-in-scope-target must be 0 (off) or in (0, 1], got {self.oos_in_scope_target}")
        if not 0 <= self.oos_reject_rate < 1:
            raise FactoryError(f"--oos-reject-rate must be in [0, 1), got {self.oos_reject_rate}")
        if self.oos_classifier not in CLASSIFIERS:
            raise FactoryError(f"--oos-classifier must be one of {', '.join(CLASSIFIERS)}, got {self.oos_classifier!r}")
        if not 0 <= self.oos_feature_margin < 1:
            raise FactoryError(f"--oos-feature-margin must be in [0, 1), got {self.oos_feature_margin}")
        if math.isnan(self.oos_knn_gate):
            raise FactoryError("--oos-knn-gate must be a number, or inf to test the neighbours of every query")
        if not (self.oos_knn_weight >= 0 and np.isfinite(self.oos_knn_weight)):
            raise FactoryError(f"--oos-knn-weight must be a finite weight >= 0, got {self.oos_knn_weight}")
        if self.oos_prototypes < 0:
            raise FactoryError(f"--oos-prototypes must be >= 0, got {self.oos_prototypes}")

    def threshold_policy(self) -> dict[str, float]:
        """How each rule's threshold is set, as the card records it."""
        # 0 turns off a recipe's target: a team's data has its own accuracy, which CLINC150's 0.952 may not suit.
        if self.oos_in_scope_target:
            return {"in_scope_accuracy": self.oos_in_scope_target}
        return {"in_scope_rejection": self.oos_reject_rate}

    def fit_options(self) -> dict[str, Any]:
        return {"ridge": self.oos_ridge, "weight": self.oos_knn_weight, "prototypes_per_intent": self.oos_prototypes}


def write_rule(directory: Path, rule: Rule) -> None:
    """The rule's files and its spec (rule.json), for the stages that read this one's output."""
    rule.save(directory)
    (directory / RULE_FILE).write_text(rule.spec.model_dump_json(indent=2) + "\n")


def read_rule(directory: Path) -> Rule:
    """The rule the oos stage wrote to `directory`, with its files."""
    from pydantic import TypeAdapter, ValidationError

    from app.engine.rules import RuleSpec

    path = directory / RULE_FILE
    if not path.is_file():
        raise FactoryError(f"missing {path} (run the oos stage first)")
    try:
        spec: RuleSpecBase = TypeAdapter[RuleSpecBase](RuleSpec).validate_json(path.read_bytes())
    except ValidationError as exc:
        raise FactoryError(f"invalid {path}: {exc.errors()[0]['msg']}") from None
    return load_rule(spec, directory)


def choose_rule(recall: dict[str, float], cfg: Config) -> str:
    """The rule that catches the most of the tuning pool (ties keep the registry's order); a feature-space
    rule ships another file and costs more arithmetic, so it must catch the margin's share of what the best
    logits rule misses (a share, not points: the held-out Wikipedia sentences are nearly all caught)."""
    order = list(RULES)

    def best(names: list[str]) -> str:
        return max(names, key=lambda r: (recall[r], -order.index(r)))

    plain = best([r for r in order if not RULES[r].needs_features])
    featured = [r for r in order if RULES[r].needs_features]
    needed = recall[plain] + cfg.oos_feature_margin * (1 - recall[plain])
    if featured and recall[best(featured)] >= needed - 1e-9:
        return best(featured)
    return plain


def same_vocabulary(a: Path, b: Path) -> bool:
    """Whether two tokenizer.json files split text into the same ids (their models and normalisers agree)."""
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    keys = ("model", "normalizer", "pre_tokenizer")
    return all(ja.get(k) == jb.get(k) for k in keys)


def _with_features(quantize_dir: Path, embedder_dir: Path | None, out: Path, source: str) -> None:
    """out/model.onnx: the quantised classifier with its features output from `source`."""
    if source == "student":
        if not has_output(quantize_dir / MODEL_FILE):
            raise FactoryError(
                f"{quantize_dir / MODEL_FILE} has no {FEATURES_OUTPUT} output: distil with --geometry-weight > 0, "
                "or pass --oos-features embedder or mean"
            )
        shutil.copy(quantize_dir / MODEL_FILE, out / MODEL_FILE)
        return
    if source != "embedder":
        add_features_output(quantize_dir / MODEL_FILE, out / MODEL_FILE, source)
        return
    if embedder_dir is None or not (embedder_dir / MODEL_FILE).is_file():
        raise FactoryError(f"missing {embedder_dir} model (run the embedder stage first, or pass --oos-features mean)")
    if not same_vocabulary(quantize_dir / "tokenizer.json", embedder_dir / "tokenizer.json"):
        raise FactoryError("the embedder's tokenizer is not the classifier's: one tokenizer serves both")
    add_encoder_output(quantize_dir / MODEL_FILE, embedder_dir / MODEL_FILE, out / MODEL_FILE)


def score_rule(
    rule: Rule, outputs: dict[str, Outputs], gold: dict[str, np.ndarray], oos: int, policy: dict[str, float]
) -> tuple[Rule, dict[str, Any]]:
    """The rule at its threshold, chosen from in-scope validation queries alone by `policy` (Config.threshold_policy),
    and its figures on every pool."""
    val, val_gold = outputs["validation"], gold["validation"]
    threshold = threshold_for_policy(rule.score(val), val.pred, val_gold, oos, rule.kind, policy)
    rule = rule.with_threshold(threshold)
    pools = {pool: pool_scores(rule.decide(out, oos)[0], gold[pool], oos) for pool, out in outputs.items()}
    return rule, {"oos_threshold": threshold, "pools": pools}


def _gate(
    rule: EnergyKnn, out: Path, cfg: Config, outputs: dict[str, Outputs], pools: dict[str, Any], oos: int
) -> tuple[EnergyKnn, dict[str, Any]]:
    """energy_knn with its gate at --oos-knn-gate standard deviations of the energy: rows above the floor are in
    scope without the neighbour test. Where the features come from a joined sentence encoder, the graph runs that
    encoder only under the same floor (compression.graphs.gate_encoder_output). Reports how many rows each pool
    skips and how many decisions the gate changed."""
    floor = rule.spec.energy.mean + cfg.oos_knn_gate * rule.spec.energy.std
    gated = rule.with_gate(floor)
    gated_outputs = outputs
    if cfg.oos_features == "embedder":
        sentinel = rule.references[0]  # a stored reference: a perfect match where the encoder is skipped
        path = out / "model.gated.onnx"
        gate_encoder_output(out / MODEL_FILE, path, floor, sentinel)
        path.replace(out / MODEL_FILE)
        stage = OnnxStage(out / MODEL_FILE, out / "tokenizer.json", features=FEATURES_OUTPUT)
        gated_outputs = {name: stage.outputs(split.texts) for name, split in pools.items()}
    report = {
        "z": cfg.oos_knn_gate,
        "energy_floor": floor,
        "skipped": {pool: round(float((o.energy >= floor).mean()), 4) for pool, o in outputs.items()},
        "decisions_changed": {
            pool: int((gated.decide(gated_outputs[pool], oos)[0] != rule.decide(o, oos)[0]).sum())
            for pool, o in outputs.items()
        },
    }
    return gated, report


def run(
    quantize_dir: Path, data: Dataset, wiki: str, out: Path, cfg: Config, embedder_dir: Path | None = None
) -> dict[str, Any]:
    for name in (MODEL_FILE, "tokenizer.json", "labels.json"):
        if not (quantize_dir / name).is_file():
            raise FactoryError(f"missing {quantize_dir / name} (run the {quantize_dir.name} stage first)")
    pools = evaluation_pools(data, wiki)
    reported = report_pool(pools)
    out.mkdir(parents=True, exist_ok=True)
    _with_features(quantize_dir, embedder_dir, out, cfg.oos_features)
    for name in ("tokenizer.json", "labels.json"):
        shutil.copy(quantize_dir / name, out / name)
    labels = json.loads((out / "labels.json").read_text())
    oos = labels.index(OOS)
    stage = OnnxStage(out / MODEL_FILE, out / "tokenizer.json", features=FEATURES_OUTPUT)

    train = data.split("train")
    gold_train = np.array(train.label_ids(labels))
    in_scope = gold_train != oos
    outputs = {name: stage.outputs(split.texts) for name, split in pools.items()}
    gold = {name: np.array(split.label_ids(labels)) for name, split in pools.items()}
    fit_data = FitData(
        train=stage.outputs(train.texts).rows(in_scope),
        train_labels=gold_train[in_scope],
        validation=outputs["validation"].rows(gold["validation"] != oos),
    )
    assert fit_data.train.features is not None
    dim = fit_data.train.features.shape[1]
    log.info("oos: %d-dim features of %d in-scope training queries", dim, len(fit_data.train))
    scored = {
        kind: score_rule(cls.fit(fit_data, cfg.fit_options()), outputs, gold, oos, cfg.threshold_policy())
        for kind, cls in RULES.items()
    }
    figures = {kind: report for kind, (_, report) in scored.items()}
    by_tuning_pool = choose_rule({kind: tuning_recall(v["pools"]) for kind, v in figures.items()}, cfg)
    chosen = by_tuning_pool if cfg.oos_rule == "auto" else cfg.oos_rule
    rule = scored[chosen][0]
    gate: dict[str, Any] | None = None
    if isinstance(rule, EnergyKnn) and math.isfinite(cfg.oos_knn_gate):
        rule, gate = _gate(rule, out, cfg, outputs, pools, oos)
    write_rule(out, rule)
    report = {
        "oos_rule": chosen,
        "oos_threshold": rule.threshold,
        "threshold_policy": cfg.threshold_policy(),
        "thresholded": figures[chosen]["pools"]["validation"],
        "features": {
            "output": FEATURES_OUTPUT,
            "source": cfg.oos_features,
            "dim": dim,
            "fitted_on": len(fit_data.train),
        },
        "rules": figures,
        "chosen_by": "the tuning pool" if cfg.oos_rule == "auto" else "--oos-rule",
        "tuning_pool_would_choose": by_tuning_pool,
        "report_pool": reported,
        "tuning_pool": TUNING_POOL,
        "tuning_pools": [name for name in (TUNING_POOL, OOS_TUNE) if name in pools],
        "gate": gate,
    }
    write_run(out, "oos", asdict(cfg), report)
    if gate is not None:
        log.info(
            "oos: gate at energy %.3f: skipped %s, decisions changed %s",
            gate["energy_floor"],
            gate["skipped"],
            gate["decisions_changed"],
        )
    for kind, v in figures.items():
        pool = v["pools"]
        log.info(
            "oos: %-12s threshold %8.2f  %s recall %.3f %s  %s recall %.3f  validation in-scope %.4f",
            kind,
            v["oos_threshold"],
            reported,
            pool[reported]["oos_recall"],
            pool[reported]["oos_recall_95"],
            TUNING_POOL,
            pool[TUNING_POOL]["oos_recall"],
            pool["validation"]["in_scope_accuracy"],
        )
    log.info("oos: serving %s", chosen)
    return report


def run_stage(ctx: Context, cfg: Config) -> None:
    run(ctx.dir(cfg.oos_classifier), ctx.dataset, str(ctx.wiki), ctx.dir("oos"), cfg, ctx.dir("embedder"))
