"""Baseline 2: FastAPI + Optimum's ORTModelForSequenceClassification in a pipeline, same teacher.

What Hugging Face suggests for speed: the model exported to ONNX (fp32) and run by ONNX Runtime
through a transformers pipeline. Needs its own environment (optimum-onnx pins transformers < 4.58);
`make compare` builds it as .venv-optimum.
Run: uvicorn loadtest.baselines.optimum_server:app --workers 2
"""

from __future__ import annotations

import os

from fastapi import FastAPI
from optimum.onnxruntime import ORTModelForSequenceClassification
from pydantic import BaseModel
from transformers import AutoTokenizer, pipeline

MODEL = os.environ.get("BASELINE_MODEL", "artifacts/teacher")
THREADS = int(os.environ.get("BASELINE_THREADS", "1"))


def _session_options() -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return opts


app = FastAPI(title="baseline: optimum ORT pipeline")
_model = ORTModelForSequenceClassification.from_pretrained(MODEL, export=True, session_options=_session_options())
classifier = pipeline("text-classification", model=_model, tokenizer=AutoTokenizer.from_pretrained(MODEL))
LABELS = [_model.config.id2label[i] for i in range(_model.config.num_labels)]


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
