"""Baseline 1: FastAPI + a transformers `pipeline` (PyTorch fp32) over the fine-tuned teacher.

This is the seed's starting point: a sync route (so FastAPI runs it on its thread pool), the
pipeline's own tokenizer and post-processing, one torch thread per worker.
Run: uvicorn loadtest.baselines.transformers_server:app --workers 2
"""

from __future__ import annotations

import os

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline

torch.set_num_threads(int(os.environ.get("BASELINE_THREADS", "1")))
MODEL = os.environ.get("BASELINE_MODEL", "artifacts/teacher")

app = FastAPI(title="baseline: transformers pipeline")
classifier = pipeline("text-classification", model=MODEL, tokenizer=MODEL, device=-1)
LABELS = list(classifier.model.config.id2label.values())  # type: ignore[union-attr]


class Query(BaseModel):
    text: str


@app.post("/predict")
def predict(query: Query) -> dict[str, object]:
    best = classifier(query.text)[0]
    return {"intent": best["label"], "confidence": best["score"]}


@app.get("/ready")
def ready() -> dict[str, str]:
    return {"status": "ready"}


@app.get("/model")
def model() -> dict[str, object]:
    return {"labels": LABELS}
