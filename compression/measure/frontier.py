"""`python -m compression.measure.frontier DIR [DIR ...]`: served artifacts side by side, cost against quality.

Each artifact runs through the engine, as served, over CLINC150 validation and the 350 real out-of-scope queries of
oos_train + oos_val (which no stage trains on, and on which nothing is tuned): multiply-adds per query (every stage
and the rule's own arithmetic, each weighed by the share of queries that reach it), validation in-scope and
test-weighted accuracy, and OOS recall on the 350 with its 95% interval. Speed is not measured here: the
multiply-adds travel between machines, and `make bench` times the served model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from compression.data import DEFAULT_DATA, DEFAULT_WIKI, load_clinc
from compression.measure.benchmark import served_macs, tested_share
from compression.measure.metrics import score
from compression.measure.pools import wilson


def point(directory: Path, data: Any) -> dict[str, Any]:
    from app.engine.engine import Engine

    engine = Engine.open(directory)
    val = data.split("val")
    decisions = engine.run(val.texts)
    gold = np.array(val.label_ids(engine.labels))
    s = score(decisions.pred, gold, engine.oos_index)
    last = len(engine.stage_names) - 1
    reached = [t for t, k in zip(val.texts, decisions.stage, strict=True) if k == last]
    tested = tested_share(engine, reached)
    macs = served_macs(directory, engine, val.texts, decisions.stage, tested)
    pool = data.split("oos_train") + data.split("oos_val")
    caught = int((engine.run(pool.texts).pred == engine.oos_index).sum())
    low, high = wilson(caught, len(pool))
    return {
        "model": str(directory),
        "version": engine.version,
        "macs_per_query": macs["macs_per_query"],
        "in_scope_accuracy": round(s.in_scope_accuracy, 4),
        "test_weighted_accuracy": round(s.test_weighted_accuracy, 4),
        "oos_val_recall": round(s.oos_recall, 4),
        "clinc_oos_recall": round(caught / len(pool), 4),
        "clinc_oos_recall_95": [round(low, 4), round(high, 4)],
        "clinc_oos_n": len(pool),
        "answered_by": {n: round(float((decisions.stage == i).mean()), 4) for i, n in enumerate(engine.stage_names)},
        "neighbour_test_share": round(tested, 4),
    }


def markdown(points: list[dict[str, Any]]) -> str:
    head = (
        "| served artifact | M multiply-adds / query | validation in-scope | test-weighted | OOS recall, 350 [95%] "
        "| answered by the first stage |\n|---|---|---|---|---|---|"
    )
    rows = [
        f"| {p['model']} ({p['version']}) | {p['macs_per_query'] / 1e6:.1f} | {p['in_scope_accuracy']:.4f} "
        f"| {p['test_weighted_accuracy']:.4f} | {p['clinc_oos_recall']:.3f} [{p['clinc_oos_recall_95'][0]:.3f}, "
        f"{p['clinc_oos_recall_95'][1]:.3f}] | {1 - list(p['answered_by'].values())[-1]:.3f} |"
        for p in points
    ]
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compression.measure.frontier", description=__doc__)
    p.add_argument("models", nargs="+", type=Path, help="served artifact directories")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--wiki", type=Path, default=DEFAULT_WIKI, help="unused; accepted for symmetry with the factory")
    p.add_argument("--json", type=Path, help="also write the points here")
    a = p.parse_args(argv)
    data = load_clinc(a.data)
    points = [point(d, data) for d in a.models]
    print(markdown(points))
    if a.json:
        a.json.write_text(json.dumps(points, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
