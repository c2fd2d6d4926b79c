"""What a classifier answers and what the routes need of one; `app.runtime` serves the real model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Prediction:
    intent: str
    confidence: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    tokenize_s: float = 0.0
    inference_s: float = 0.0
    truncated: bool = False
    stage: str = "transformer"  # which model of the served path answered: 'first' or 'transformer'
    # The version of the model that answered: after a reload, in-flight requests finish on the old one.
    model_version: str = ""


class Classifier(Protocol):
    """What the routes need; tests substitute a fake with the same shape."""

    labels: list[str]
    version: str

    def predict(self, text: str, top_k: int = 0) -> Prediction: ...

    def close(self) -> None: ...
