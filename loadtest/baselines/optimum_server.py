"""Baseline 2: FastAPI + Optimum's ORTModelForSequenceClassification in a pipeline, same teacher.

What Hugging Face suggests for speed: the model exported to ONNX (fp32) and run by ONNX Runtime
through a transformers pipeline. Needs its own environment (optimum-onnx pins transformers < 4.58);
`make compare` builds it as .venv-optimum.
Run: uvicorn loadtest.baselines.optimum_server:app --workers 2
"""

from __future__ import annotations

import os

from optimum.onnxruntime import ORTModelForSequenceClassification
from transformers import AutoTokenizer, pipeline

from loadtest.baselines.pipeline_app import pipeline_app

MODEL = os.environ.get("BASELINE_MODEL", "artifacts/teacher")
THREADS = int(os.environ.get("BASELINE_THREADS", "1"))


def _session_options() -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return opts


_model = ORTModelForSequenceClassification.from_pretrained(MODEL, export=True, session_options=_session_options())
classifier = pipeline("text-classification", model=_model, tokenizer=AutoTokenizer.from_pretrained(MODEL))
app = pipeline_app(
    "baseline: optimum ORT pipeline", classifier, [_model.config.id2label[i] for i in range(_model.config.num_labels)]
)
