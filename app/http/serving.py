"""The model a worker serves, held in one place: a `Slot` whose `Served` (the model, the body of /model and the
labels of the model_info metric) is replaced whole on reload. Everything that needs the model reads the slot
once per request, so a request is answered by one model from start to end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from app import cpu
from app.config import Settings
from app.engine.artifact import load_artifact
from app.engine.engine import Engine, Predictor

# Builds the model a worker serves and the card /model shows, from settings whose model_dir names the
# directory; tests pass a fake.
ModelFactory = Callable[[Settings], tuple[Predictor, dict[str, Any]]]


def load_engine(settings: Settings) -> tuple[Predictor, dict[str, Any]]:
    """The engine of settings.model_dir, and /model's body: its card, labels, and the CPU it serves on with the
    weights it runs."""
    artifact = load_artifact(settings.model_dir, settings.verify_sha256)
    # The lifespan and a reload return the free heap after the whole load (app.heap), not after each graph.
    engine = Engine.from_artifact(artifact, settings.ort_intra_threads, settings.ort_inter_threads, give_back=False)
    card = artifact.card.model_dump(mode="json", exclude_none=True)
    serving = {"cpu": cpu.current().describe(), "weights": engine.weights}
    return engine, {**card, "labels": artifact.labels, "serving": serving}


@dataclass(frozen=True)
class Served:
    model: Predictor
    card_json: bytes
    info: tuple[str, str, str]  # the model_info metric's labels: version, name, OOS rule
    model_dir: Path | None = None  # where it was loaded from (a follower compares it with INTENT_MODEL_DIR)

    @classmethod
    def of(cls, model: Predictor, card: dict[str, Any], model_dir: Path | None = None) -> Served:
        rule = str(card.get("spec", {}).get("rule", {}).get("kind", ""))
        return cls(model, orjson.dumps(card), (model.version, str(card.get("name", "")), rule), model_dir)

    @property
    def version(self) -> str:
        return self.model.version


class Slot:
    """Which model this worker serves. Empty until the lifespan installs the first one."""

    def __init__(self) -> None:
        self.served: Served | None = None

    def install(self, served: Served) -> Served | None:
        previous, self.served = self.served, served
        return previous
