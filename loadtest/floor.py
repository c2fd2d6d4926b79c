"""The floor of a load test: the service exactly as it is served (`create_app`, its HTTP protocol, uvloop, the
workers, the queue and the metrics) around a model that answers at once. No model served by this code can read
faster than this on the same machine and placement, so `make compare` runs it beside ours: the difference between
the two rows is what the model costs at each load, and the floor itself is what the machine and the load
generator cost. Open-loop latencies at low rates differ several-fold between VMs (docs/one-small-model.md).

`python -m loadtest.floor` serves it with the service's own settings (INTENT_HOST, INTENT_PORT, INTENT_WORKERS,
...); only the model differs. The labels come from the served model's card and labels file, read and checked by the
artifact loader the service uses, so /model and every answer look like the real service's to the load generator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from app import cpu
from app.__main__ import address_problem, run_workers, settings_or_error
from app.config import Settings
from app.engine.artifact import read_card, read_labels
from app.engine.engine import Prediction
from app.engine.errors import ModelLoadError
from app.http.logs import configure_logging
from app.http.main import create_app

APP_FACTORY = "loadtest.floor:create_floor_app"
VERSION = "floor"


class InstantModel:
    """A Predictor that does no work: every text gets the model's OOS label (a real label, never a wrong type) at
    confidence 1."""

    def __init__(self, labels: list[str], oos_label: str) -> None:
        if oos_label not in labels:
            raise ValueError(f"the labels have no {oos_label!r}")
        self.labels = labels
        self.oos_label = oos_label
        self.version = VERSION

    def predict(self, text: str, top_k: int = 0) -> Prediction:
        # Ranked only when asked: a walk over every label on each call was 5% of the floor's CPU (py-spy).
        ranked = [(label, 0.0) for label in self.labels if label != self.oos_label][:top_k] if top_k else []
        return Prediction(intent=self.oos_label, confidence=1.0, top_k=ranked, stage="none", model_version=VERSION)

    def warm(self, text: str) -> None:
        """Nothing to warm."""

    def close(self) -> None:
        """Nothing to release."""


def instant_model(settings: Settings) -> tuple[InstantModel, dict[str, Any]]:
    """The model factory `create_app` takes: the served model's labels, checked against its card as the service
    checks them (no graph is loaded, no file hashed), and a card that names what runs."""
    directory = Path(settings.model_dir)
    spec = read_card(directory).spec.labels
    labels = read_labels(directory / spec.file, spec.count, spec.oos_label)
    model = InstantModel(labels, spec.oos_label)
    card = {"name": "floor: no model", "version": VERSION, "labels": labels, "spec": {}}
    return model, {**card, "serving": {"cpu": cpu.current().describe(), "weights": "none"}}


def create_floor_app() -> FastAPI:
    """Entry point for uvicorn's workers."""
    return create_app(Settings(), instant_model)


def main(argv: list[str] | None = None) -> int:
    # No options: the settings are the service's environment. A parser still, so that --help (or a stray argument)
    # does not start a server on INTENT_PORT.
    argparse.ArgumentParser(
        prog="python -m loadtest.floor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    settings = settings_or_error()
    if isinstance(settings, str):
        print(f"error: {settings}", file=sys.stderr)
        return 2
    if (problem := address_problem(settings.host, settings.port)) is not None:
        print(f"error: {problem}", file=sys.stderr)  # as `python -m app`: before `ready`, not errno 98 after it
        return 2
    try:  # before any worker starts, as `python -m app` checks its model: one line, not a worker's traceback
        instant_model(settings)
    except ModelLoadError as exc:
        print(f"error: no labels for the floor in {settings.model_dir}: {exc}", file=sys.stderr)
        return 1
    configure_logging(settings.log_level)
    return run_workers(settings, APP_FACTORY)


if __name__ == "__main__":
    sys.exit(main())
