"""Baseline 1: FastAPI + a transformers `pipeline` (PyTorch fp32) over the fine-tuned teacher.

This is the seed's starting point: a sync route (so FastAPI runs it on its thread pool), the
pipeline's own tokenizer and post-processing, one torch thread per worker.
Run: uvicorn loadtest.baselines.transformers_server:app --workers 2
"""

from __future__ import annotations

import os

import torch
from transformers import pipeline

from loadtest.baselines.pipeline_app import pipeline_app

torch.set_num_threads(int(os.environ.get("BASELINE_THREADS", "1")))
MODEL = os.environ.get("BASELINE_MODEL", "artifacts/teacher")

classifier = pipeline("text-classification", model=MODEL, tokenizer=MODEL, device=-1)
labels = list(classifier.model.config.id2label.values())  # type: ignore[union-attr]
app = pipeline_app("baseline: transformers pipeline", classifier, labels)
