"""The HTTP face both baselines share: a transformers-style text-classification pipeline behind the routes the load
test calls (`POST /predict`, `GET /ready`, `GET /model`), with the seed's sync route, which FastAPI runs on its
thread pool. Each baseline builds its pipeline; this makes the app."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel


class Query(BaseModel):
    text: str


def pipeline_app(title: str, classifier: Callable[[str], Any], labels: list[str]) -> FastAPI:
    """`classifier(text)[0]` is the best label and its score, as a transformers pipeline answers."""
    app = FastAPI(title=title)

    @app.post("/predict")
    def predict(query: Query) -> dict[str, object]:
        best = classifier(query.text)[0]
        return {"intent": best["label"], "confidence": best["score"]}

    @app.get("/ready")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/model")
    def model() -> dict[str, object]:
        return {"labels": labels}

    return app
