"""Stage: the served out-of-scope rule, chosen on pools no model trained on (compression.oos_pools).

The quantised transformer gets features as a second output (by default the pretrained sentence encoder's
embedding, from the embedder stage; or its own pooled features), their statistics are fitted on the in-scope
training split, and every rule of the service's registry (app.oos.RULES) is given the strictest threshold
that keeps in-scope validation accuracy at the target. The rule that catches
the most of the held-out Wikipedia sentences is served (a feature-space rule only by a margin, see
choose_rule); the figures on the real CLINC pool, which chose nothing, are the estimate the README reports.
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

from app.oos import RULES, FeatureStats, decide
from compression.data import OOS, Clinc
from compression.errors import FactoryError
from compression.features import (
    FEATURE_SOURCES,
    FEATURES_OUTPUT,
    RIDGE,
    add_encoder_output,
    add_features_output,
    fit_stats,
    gate_encoder_output,
)
from compression.metrics import IN_SCOPE_FLOOR, threshold_for_in_scope
from compression.onnx_runner import OnnxStage
from compression.oos_pools import TUNING_POOL, evaluation_pools, pool_scores, report_pool
from compression.provenance import read_run, write_run

if TYPE_CHECKING:
    from compression.pipeline import Context

log = logging.getLogger(__name__)
STATS_FILE = "oos_stats.npz"
MODEL_FILE = "model.onnx"


@dataclass
class Config:
    oos_in_scope_target: float = field(
        default=round(IN_SCOPE_FLOOR + 0.002, 4),
        metadata={"help": "in-scope validation accuracy each rule's threshold keeps (the floor, plus 6 queries)"},
    )
    oos_ridge: float = field(default=RIDGE, metadata={"help": "ridge of the shared covariance, share of its trace"})
    oos_feature_margin: float = field(
        default=0.25,
        metadata={
            "help": "share of the best logits rule's misses on the tuning pool that a feature-space rule must "
            "catch to be served"
        },
    )
    oos_features: str = field(
        default="embedder",
        metadata={"help": f"features of the feature-space rules: {', '.join(FEATURE_SOURCES)} (compression.features)"},
    )
    oos_knn_gate: float = field(
        default=0.0,
        metadata={
            "help": "energy_knn runs the sentence encoder only where the standardised energy is under this "
            "(elsewhere the logits answer); inf runs it on every query"
        },
    )
    oos_knn_weight: float = field(
        default=1.0,
        metadata={"help": "weight of the standardised neighbour similarity against the energy's in energy_knn"},
    )

    def __post_init__(self) -> None:
        if self.oos_features not in FEATURE_SOURCES:
            raise FactoryError(f"--oos-features must be one of {', '.join(FEATURE_SOURCES)}, got {self.oos_features!r}")
        if not 0 < self.oos_in_scope_target <= 1:
            raise FactoryError(f"--oos-in-scope-target must be in (0, 1], got {self.oos_in_scope_target}")
        if not 0 <= self.oos_feature_margin < 1:
            raise FactoryError(f"--oos-feature-margin must be in [0, 1), got {self.oos_feature_margin}")
        if math.isnan(self.oos_knn_gate):
            raise FactoryError("--oos-knn-gate must be a number, or inf to run the encoder on every query")
        if not (self.oos_knn_weight >= 0 and np.isfinite(self.oos_knn_weight)):
            raise FactoryError(f"--oos-knn-weight must be a finite weight >= 0, got {self.oos_knn_weight}")


@dataclass(frozen=True)
class ServedRule:
    """The transformer's OOS rule as a stage directory or an artifact holds it, ready to apply."""

    rule: str
    threshold: float
    stats: FeatureStats | None = None

    @property
    def features(self) -> str | None:
        return FEATURES_OUTPUT if self.stats is not None else None

    def decide(self, logits: np.ndarray, features: np.ndarray | None, oos: int) -> np.ndarray:
        return decide(logits, oos, self.rule, self.threshold, features, self.stats).pred


def served_rule(directory: Path) -> ServedRule:
    """The rule of an artifact (its card) or of this stage's output (its run record); a directory with
    neither rule (an older quantize stage) gives that stage's logits rule."""
    if (directory / "card.json").is_file():
        from app.artifact import read_card

        card = read_card(directory)
        stats = FeatureStats.load(directory / card.oos_stats) if card.oos_stats else None
        return ServedRule(card.oos_rule, card.oos_threshold, stats)
    metrics = read_run(directory).get("metrics", {})
    stats_path = directory / STATS_FILE
    stats = FeatureStats.load(stats_path) if stats_path.is_file() else None
    return ServedRule(metrics.get("oos_rule", "max_prob"), float(metrics.get("oos_threshold", 0.0)), stats)


def outputs_of(stage: OnnxStage, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of every text, and features where the stage was opened with them; batch-1 calls, as served."""
    rows = [stage.model.run_with_features(e.ids) for e in stage.tokenizer.encode_batch(texts)]
    features = [f for _, f in rows if f is not None]
    return np.stack([logits for logits, _ in rows]), (np.stack(features) if features else None)


def features_of(stage: OnnxStage, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    logits, features = outputs_of(stage, texts)
    if features is None:
        raise FactoryError("the model gives no features")
    return logits, features


def choose_rule(tuning_recall: dict[str, float], cfg: Config) -> str:
    """The rule that catches the most of the tuning pool (ties keep the registry's order); a feature-space
    rule ships another file and costs more arithmetic, so it must catch the margin's share of what the best
    logits rule misses (a share, not points: the held-out Wikipedia sentences are nearly all caught)."""
    order = list(RULES)

    def best(names: list[str]) -> str:
        return max(names, key=lambda r: (tuning_recall[r], -order.index(r)))

    plain = best([r for r in order if not RULES[r].needs_features])
    featured = [r for r in order if RULES[r].needs_features]
    needed = tuning_recall[plain] + cfg.oos_feature_margin * (1 - tuning_recall[plain])
    if featured and tuning_recall[best(featured)] >= needed - 1e-9:
        return best(featured)
    return plain


def same_vocabulary(a: Path, b: Path) -> bool:
    """Whether two tokenizer.json files split text into the same ids (their models and normalisers agree)."""
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    keys = ("model", "normalizer", "pre_tokenizer")
    return all(ja.get(k) == jb.get(k) for k in keys)


def _with_features(quantize_dir: Path, embedder_dir: Path | None, out: Path, source: str) -> None:
    """out/model.onnx: the quantised classifier with its features output from `source`."""
    if source != "embedder":
        add_features_output(quantize_dir / MODEL_FILE, out / MODEL_FILE, source)
        return
    if embedder_dir is None or not (embedder_dir / MODEL_FILE).is_file():
        raise FactoryError(f"missing {embedder_dir} model (run the embedder stage first, or pass --oos-features mean)")
    if not same_vocabulary(quantize_dir / "tokenizer.json", embedder_dir / "tokenizer.json"):
        raise FactoryError("the embedder's tokenizer is not the classifier's: one tokenizer serves both")
    add_encoder_output(quantize_dir / MODEL_FILE, embedder_dir / MODEL_FILE, out / MODEL_FILE)


def fit_neighbours(stats: FeatureStats, features: np.ndarray) -> FeatureStats:
    """`stats` with the in-scope training queries' unit features as the stored neighbours, rounded to half
    precision as FeatureStats.save stores them, so that what is fitted on them sees what the service reads."""
    unit = features / np.linalg.norm(features, axis=-1, keepdims=True)
    return FeatureStats(stats.whiten, stats.centers, neighbours=unit.astype(np.float16).astype(np.float32))


def fit_combine(stats: FeatureStats, logits: np.ndarray, features: np.ndarray, weight: float) -> np.ndarray:
    """energy_knn's standardisation, from in-scope validation queries: mean and std of the energy and of the
    nearest-neighbour similarity, then the similarity's weight."""
    energy = RULES["energy"].score(logits)
    similarity = stats.nearest_similarity(features)
    return np.array([energy.mean(), energy.std(), similarity.mean(), similarity.std(), weight], dtype=np.float32)


Outputs = dict[str, tuple[np.ndarray, np.ndarray]]


def gate_sentinel(stats: FeatureStats) -> np.ndarray:
    """What a gated graph outputs as features where it skips the encoder: the first stored neighbour, so that
    energy_knn sees a perfect match there."""
    if stats.neighbours is None:
        raise FactoryError("a gate needs the stored neighbours")
    row: np.ndarray = stats.neighbours[0]
    return row


def score_rule(
    name: str, outputs: Outputs, gold: dict[str, np.ndarray], stats: FeatureStats, oos: int, cfg: Config
) -> dict[str, Any]:
    """A rule's threshold, from in-scope validation queries alone, and its figures on every pool."""
    val_logits, val_features = outputs["validation"]
    scores = RULES[name].score(val_logits, val_features, stats)
    threshold = threshold_for_in_scope(
        scores, val_logits.argmax(-1), gold["validation"], oos, name, cfg.oos_in_scope_target
    )
    served = ServedRule(name, threshold, stats)
    return {
        "oos_threshold": threshold,
        "pools": {
            pool: pool_scores(served.decide(logits, features, oos), gold[pool], oos)
            for pool, (logits, features) in outputs.items()
        },
    }


def served_decisions(
    name: str, scored: dict[str, Any], output: tuple[np.ndarray, np.ndarray], stats: FeatureStats, oos: int
) -> np.ndarray:
    return ServedRule(name, scored["oos_threshold"], stats).decide(output[0], output[1], oos)


def _gate(out: Path, stats: FeatureStats, cfg: Config, pools: dict[str, Any], outputs: Outputs) -> dict[str, Any]:
    """Replace out/model.onnx by its gated graph (compression.features.gate_encoder_output): the encoder runs
    where the standardised energy is under --oos-knn-gate. Returns the gate's report and the pools' outputs
    through the gated graph."""
    if stats.combine is None:
        raise FactoryError("the gate needs energy_knn's statistics")
    floor = float(stats.combine[0] + cfg.oos_knn_gate * stats.combine[1])
    sentinel = gate_sentinel(stats)
    gated = out / "model.gated.onnx"
    gate_encoder_output(out / MODEL_FILE, gated, floor, sentinel)
    gated.replace(out / MODEL_FILE)
    stage = OnnxStage(out / MODEL_FILE, out / "tokenizer.json", features=FEATURES_OUTPUT)
    gated_outputs = {name: features_of(stage, split.texts) for name, split in pools.items()}
    skipped = {
        pool: round(float(np.all(features == sentinel, axis=-1).mean()), 4)
        for pool, (_, features) in gated_outputs.items()
    }
    return {"z": cfg.oos_knn_gate, "energy_floor": floor, "skipped": skipped, "outputs": gated_outputs}


def run(
    quantize_dir: Path, data: Clinc, wiki: str, out: Path, cfg: Config, embedder_dir: Path | None = None
) -> dict[str, Any]:
    for name in (MODEL_FILE, "tokenizer.json", "labels.json"):
        if not (quantize_dir / name).is_file():
            raise FactoryError(f"missing {quantize_dir / name} (run the quantize stage first)")
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
    _, train_features = features_of(stage, train.texts)
    gold_train = np.array(train.label_ids(labels))
    in_scope = gold_train != oos
    stats = fit_stats(train_features[in_scope], gold_train[in_scope], cfg.oos_ridge)
    stats = fit_neighbours(stats, train_features[in_scope])
    dim = stats.dim
    log.info("oos: %d-dim features, statistics of %d classes from %d queries", dim, len(stats.centers), in_scope.sum())

    outputs = {name: features_of(stage, split.texts) for name, split in pools.items()}
    gold = {name: np.array(split.label_ids(labels)) for name, split in pools.items()}
    val_logits, val_features = outputs["validation"]
    val_in = gold["validation"] != oos
    combine = fit_combine(stats, val_logits[val_in], val_features[val_in], cfg.oos_knn_weight)
    FeatureStats(stats.whiten, stats.centers, stats.neighbours, combine).save(out / STATS_FILE)
    stats = FeatureStats.load(out / STATS_FILE)  # the stored arrays, exactly as the service reads them
    rules = {name: score_rule(name, outputs, gold, stats, oos, cfg) for name in RULES}
    chosen = choose_rule({name: v["pools"][TUNING_POOL]["oos_recall"] for name, v in rules.items()}, cfg)
    gate: dict[str, Any] | None = None
    if chosen == "energy_knn" and math.isfinite(cfg.oos_knn_gate):
        gate = _gate(out, stats, cfg, pools, outputs)
        gated_outputs = gate.pop("outputs")
        ungated = rules[chosen]
        rules[chosen] = score_rule(chosen, gated_outputs, gold, stats, oos, cfg)
        gate["decisions_changed"] = {
            pool: int(
                (
                    served_decisions(chosen, rules[chosen], gated_outputs[pool], stats, oos)
                    != served_decisions(chosen, ungated, outputs[pool], stats, oos)
                ).sum()
            )
            for pool in outputs
        }
    report = {
        "oos_rule": chosen,
        "oos_threshold": rules[chosen]["oos_threshold"],
        "oos_in_scope_target": cfg.oos_in_scope_target,
        "thresholded": rules[chosen]["pools"]["validation"],
        "features": {
            "output": FEATURES_OUTPUT,
            "source": cfg.oos_features,
            "dim": dim,
            "fitted_on": int(in_scope.sum()),
        },
        "rules": rules,
        "report_pool": reported,
        "tuning_pool": TUNING_POOL,
        "gate": gate,
    }
    write_run(out, "oos", asdict(cfg), report)
    if gate is not None:
        log.info(
            "oos: encoder gated at energy %.3f: skipped %s, decisions changed %s",
            gate["energy_floor"],
            gate["skipped"],
            gate["decisions_changed"],
        )
    for name in RULES:
        figures = rules[name]["pools"]
        log.info(
            "oos: %-12s threshold %8.2f  %s recall %.3f %s  %s recall %.3f  validation in-scope %.4f",
            name,
            rules[name]["oos_threshold"],
            reported,
            figures[reported]["oos_recall"],
            figures[reported]["oos_recall_95"],
            TUNING_POOL,
            figures[TUNING_POOL]["oos_recall"],
            figures["validation"]["in_scope_accuracy"],
        )
    log.info("oos: serving %s", chosen)
    return report


def run_stage(ctx: Context, cfg: Config) -> None:
    run(ctx.dir("quantize"), ctx.clinc, str(ctx.wiki), ctx.dir("oos"), cfg, ctx.dir("embedder"))
