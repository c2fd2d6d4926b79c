"""A classifier with the real one's interface, for edge cases the real model cannot stage."""

from __future__ import annotations

import time
from typing import Any

from app.config import Settings
from app.engine.engine import Prediction

LABELS = ["book_flight", "balance", "oos"]


class FakeClassifier:
    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.labels = LABELS
        self.version = "fake-1"
        self.delay_s = delay_s
        self.fail = fail
        self.calls = 0
        self.warmed: list[str] = []  # texts run (or tried) only to warm the model, not counted in `calls`
        self.closed = False

    def predict(self, text: str, top_k: int = 0) -> Prediction:
        self.calls += 1
        if self.fail:
            raise RuntimeError("classifier broke")
        if self.delay_s:
            time.sleep(self.delay_s)
        intent = "balance" if "balance" in text else "book_flight" if "flight" in text else "oos"
        ranked = [(x, 0.9 if x == intent else 0.05) for x in LABELS if x != "oos"]
        ranked = sorted(ranked, key=lambda kv: -kv[1])[:top_k]  # intents only, as the engine ranks them
        return Prediction(
            intent=intent, confidence=0.9, top_k=ranked, tokenize_s=1e-5, inference_s=2e-4, model_version=self.version
        )

    def warm(self, text: str) -> None:
        self.warmed.append(text)
        if self.fail:
            raise RuntimeError("classifier broke")

    def close(self) -> None:
        self.closed = True


def fake_factory(clf: FakeClassifier) -> Any:
    def factory(settings: Settings) -> tuple[FakeClassifier, dict[str, Any]]:
        card = {"version": clf.version, "labels": LABELS, "spec": {"rule": {"kind": "max_prob", "threshold": 0.0}}}
        return clf, card

    return factory
