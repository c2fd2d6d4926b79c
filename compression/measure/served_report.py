"""`python -m compression.measure.served_report MODEL_DIR`: the validation report of a model directory that is
already built (the committed one was built before the factory wrote one): the served path's decisions through
the engine on the data's validation split, into the card's `metrics.validation_report` and `report.md` beside it.
Nothing that decides an answer changes: the files, the spec and the version stay as they are."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from compression.errors import FactoryError
from compression.measure.report import REPORT_FILE, validation_report, write_page


def refresh(model_dir: Path, data_path: Path) -> dict[str, Any]:
    from app.engine.artifact import load_artifact
    from app.engine.engine import Engine
    from compression.data import load_clinc
    from compression.stages.artifact import write_card

    artifact = load_artifact(model_dir)
    engine = Engine.from_artifact(artifact)
    try:
        val = load_clinc(data_path).split("val")
        decisions = engine.run(val.texts)
        gold = np.array(val.label_ids(artifact.labels))
        if (gold < 0).any():
            raise FactoryError(f"{data_path}: validation has intents the model at {model_dir} does not know")
        report = validation_report(decisions.pred, gold, artifact.labels, engine.oos_index)
    finally:
        engine.close()
    card = artifact.card.model_copy(update={"metrics": {**artifact.card.metrics, "validation_report": report}})
    write_card(model_dir, card)
    write_page(model_dir, card.name, card.version, card.metrics)
    return report


def main(argv: list[str] | None = None) -> int:
    from compression.data import DEFAULT_DATA

    parser = argparse.ArgumentParser(prog="python -m compression.measure.served_report", description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CLINC150's JSON: its validation split")
    args = parser.parse_args(argv)
    try:
        report = refresh(args.model_dir, args.data)
    except FactoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    point = report["oos_operating_point"]
    print(f"{args.model_dir / REPORT_FILE}: in-scope rejected {point['in_scope_rejected']}, OOS {point['oos_recall']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
