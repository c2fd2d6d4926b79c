"""An exported stage's ONNX model run the way the service runs it (app.runtime): Rust tokenizer, one
query per call. For stage directories that have no card yet; the served artifact goes through
app.runtime.OnnxClassifier itself."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from app.runtime import LogitsSession, open_tokenizer

# ORT graph rewrites left out when a session loads a model. SkipLayerNormalization's CPU kernel (ORT 1.32)
# takes about 1.8 us per token against 0.3 us for the Add + LayerNormalization it replaces: about a fifth of
# a query for this model. The export leaves that fusion out and the card tells the service to do the same.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
# Stage tokenizers carry their own truncation (export writes it); this is only a fallback.
FALLBACK_WINDOW = 512


class OnnxStage:
    def __init__(self, model_path: Path, tokenizer_path: Path, threads: int = 1, features: str | None = None) -> None:
        self.model = LogitsSession(model_path, threads, 1, DISABLED_OPTIMIZERS, features=features)
        self.tokenizer = open_tokenizer(tokenizer_path, FALLBACK_WINDOW)

    def logits_one(self, text: str) -> np.ndarray:
        return self.model.run(self.tokenizer.encode(text).ids)

    def logits(self, texts: list[str]) -> np.ndarray:
        """Batch-1 calls, as the service makes them, so results never depend on batch composition."""
        return np.stack([self.logits_one(t) for t in texts])


def latencies_ms(fn: object, texts: list[str], warmup: int = 50) -> np.ndarray:
    """Per-call wall time of fn(text), after `warmup` untimed calls."""
    assert callable(fn)
    for t in texts[:warmup]:
        fn(t)
    times = np.empty(len(texts))
    for i, t in enumerate(texts):
        start = time.perf_counter()
        fn(t)
        times[i] = (time.perf_counter() - start) * 1000
    return times
