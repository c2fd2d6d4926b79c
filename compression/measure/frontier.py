"""`python -m compression.measure.frontier DIR [DIR ...]`: served artifacts side by side, cost against quality.

Each artifact runs through the engine, as served, over CLINC150 validation and the 350 real out-of-scope queries of
oos_train + oos_val (which no stage trains on, and on which nothing is tuned): multiply-adds per query (every stage
and the rule's own arithmetic, each weighed by the share of queries that reach it), validation in-scope and
test-weighted accuracy, and OOS recall on the 350 with its 95% interval. Speed is not measured here: the
multiply-adds travel between machines, and `make bench` times the served model.

`--first-stage-thresholds 0.6,0.7,...` adds, for each artifact with a static first stage, the points it would
serve with that stage's threshold moved: fewer queries reach the transformer as it falls. At each, the rule's
threshold is set again on the cascade by the card's own policy, in-scope validation queries alone choosing it,
as the static stage sets it at build. It shows what a cost bar leaves of the quality; it does not choose. Each
such point also shows that threshold and the first stage's net in-scope harm (compression.stages.static.net_harm):
the first stage costs out-of-scope recall mostly through the rule's threshold loosening to win back its in-scope
mistakes (docs/one-small-model.md, a twelfth session).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from compression.data import DEFAULT_DATA, DEFAULT_WIKI, load_clinc
from compression.measure.benchmark import served_macs, share_under_gate, tested_share
from compression.measure.metrics import score
from compression.measure.pools import wilson
from compression.measure.report import threshold_policy


def _figures(
    directory: Path,
    engine: Any,
    val: Any,
    pred: np.ndarray,
    stage_of: np.ndarray,
    tested: float,
    caught: int,
    pool_size: int,
) -> dict[str, Any]:
    """One frontier point from the served decisions on validation (`pred`, and the stage that gave each) and the
    count of the pool's out-of-scope queries caught; `tested` is the share of the last stage's rows whose
    neighbour test ran."""
    gold = np.array(val.label_ids(engine.labels))
    s = score(pred, gold, engine.oos_index)
    macs = served_macs(directory, engine, val.texts, stage_of, tested)
    low, high = wilson(caught, pool_size)
    return {
        "model": str(directory),
        "version": engine.version,
        "macs_per_query": macs["macs_per_query"],
        "in_scope_accuracy": round(s.in_scope_accuracy, 4),
        "test_weighted_accuracy": round(s.test_weighted_accuracy, 4),
        "oos_val_recall": round(s.oos_recall, 4),
        "clinc_oos_recall": round(caught / pool_size, 4),
        "clinc_oos_recall_95": [round(low, 4), round(high, 4)],
        "clinc_oos_n": pool_size,
        "answered_by": {n: round(float((stage_of == i).mean()), 4) for i, n in enumerate(engine.stage_names)},
        "neighbour_test_share": round(tested, 4),
    }


def _oos_pool(data: Any) -> Any:
    return data.split("oos_train") + data.split("oos_val")


def point(directory: Path, data: Any) -> dict[str, Any]:
    """The artifact as it serves, through the engine."""
    from app.engine.engine import Engine

    engine = Engine.open(directory)
    val, pool = data.split("val"), _oos_pool(data)
    decisions = engine.run(val.texts)
    last = len(engine.stage_names) - 1
    tested = tested_share(engine, [t for t, k in zip(val.texts, decisions.stage, strict=True) if k == last])
    caught = int((engine.run(pool.texts).pred == engine.oos_index).sum())
    out = _figures(directory, engine, val, decisions.pred, decisions.stage, tested, caught, len(pool))
    engine.close()
    return out


def sweep(directory: Path, data: Any, thresholds: list[float]) -> list[dict[str, Any]]:
    """The artifact at each first-stage threshold: as `point` measures it, with the rule's threshold set again on
    the cascade by the card's policy (compression.stages.static.rule_on_cascade). Each stage runs once per pool;
    the thresholds only move which of its answers are used."""
    from app.engine.artifact import load_artifact
    from app.engine.engine import Engine, first_stage_answers
    from app.engine.spec import StaticStage
    from compression.stages.static import net_harm, rule_on_cascade

    artifact = load_artifact(directory)
    engine = Engine.from_artifact(artifact)
    if len(engine.spec.stages) != 2 or not isinstance(engine.spec.stages[0], StaticStage):
        raise SystemExit(f"{directory}: no static first stage before the transformer, so no threshold to move")
    policy = threshold_policy(artifact.card.metrics)
    if policy is None:
        raise SystemExit(f"{directory}: the card records no threshold policy to set the rule by")
    oos = engine.oos_index
    val, pool = data.split("val"), _oos_pool(data)
    gold = np.array(val.label_ids(engine.labels))
    first_val, first_pool = engine.outputs(val.texts, 0), engine.outputs(pool.texts, 0)
    last_val, last_pool = engine.outputs(val.texts, -1), engine.outputs(pool.texts, -1)
    points = []
    for tau in thresholds:
        rule = rule_on_cascade(engine.rule, first_val.logits, last_val, gold, oos, tau, policy)
        answered_val = first_stage_answers(first_val, tau, oos)
        answered_pool = first_stage_answers(first_pool, tau, oos)
        pred = np.where(answered_val, first_val.pred, rule.decide(last_val, oos)[0])
        caught = int((np.where(answered_pool, first_pool.pred, rule.decide(last_pool, oos)[0]) == oos).sum())
        tested = share_under_gate(engine, last_val.energy[~answered_val])
        stage_of = np.where(answered_val, 0, 1)
        figures = _figures(directory, engine, val, pred, stage_of, tested, caught, len(pool))
        figures.update(
            model=f"{directory} at {tau:.2f}",
            first_stage_threshold=tau,
            rule_threshold=rule.threshold,
            first_stage_net_harm=net_harm(first_val.logits, last_val.pred, gold, oos, tau),
        )
        points.append(figures)
    engine.close()
    return points


def thresholds_arg(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"first-stage thresholds are probabilities in (0, 1], got {text!r}")
    return sorted(set(values))


def markdown(points: list[dict[str, Any]]) -> str:
    head = (
        "| served artifact | M multiply-adds / query | validation in-scope | test-weighted | OOS recall, 350 [95%] "
        "| answered by the first stage | rule's threshold on the cascade | first stage's net in-scope harm |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {p['model']} ({p['version']}) | {p['macs_per_query'] / 1e6:.1f} | {p['in_scope_accuracy']:.4f} "
        f"| {p['test_weighted_accuracy']:.4f} | {p['clinc_oos_recall']:.3f} [{p['clinc_oos_recall_95'][0]:.3f}, "
        f"{p['clinc_oos_recall_95'][1]:.3f}] | {1 - list(p['answered_by'].values())[-1]:.3f} "
        f"| {_optional(p, 'rule_threshold', '.2f')} | {_optional(p, 'first_stage_net_harm', 'd')} |"
        for p in points
    ]
    return "\n".join([head, *rows])


def _optional(point: dict[str, Any], key: str, spec: str) -> str:
    """A swept point's figure; blank for an artifact as built, which is measured through the engine alone."""
    return format(point[key], spec) if key in point else ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compression.measure.frontier", description=__doc__)
    p.add_argument("models", nargs="+", type=Path, help="served artifact directories")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--wiki", type=Path, default=DEFAULT_WIKI, help="unused; accepted for symmetry with the factory")
    p.add_argument("--json", type=Path, help="also write the points here")
    p.add_argument(
        "--first-stage-thresholds",
        type=thresholds_arg,
        default=[],
        metavar="T1,T2,...",
        help="also each artifact with its static first stage's threshold at these values",
    )
    a = p.parse_args(argv)
    data = load_clinc(a.data)
    points = []
    for d in a.models:
        points.append(point(d, data))
        if a.first_stage_thresholds:
            points += sweep(d, data, a.first_stage_thresholds)
    print(markdown(points))
    if a.json:
        a.json.write_text(json.dumps(points, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
