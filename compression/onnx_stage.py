"""A stage directory's ONNX graph run with the engine's own pieces (app.engine.onnx, app.engine.tokenize): one
text per call, the same session settings. For stage outputs that have no card yet; what decides a served answer
is app.engine.engine.Engine, which the factory builds for every served decision it measures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.engine.onnx import OnnxModel
from app.engine.rules import Outputs
from app.engine.tokenize import open_tokenizer

# ORT graph rewrites left out when a session loads a model. SkipLayerNormalization's CPU kernel (ORT 1.32)
# takes about 1.8 us per token against 0.3 us for the Add + LayerNormalization it replaces: about a fifth of
# a query for this model. The export leaves that fusion out and the spec tells the engine to do the same.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)
# Stage tokenizers carry their own truncation (export writes it); this is only a fallback.
FALLBACK_WINDOW = 512


class OnnxStage:
    def __init__(
        self, model_path: Path, tokenizer_path: Path, threads: int = 1, features: str | None = None, output: str = ""
    ) -> None:
        """`output`: the first output's name (default: the graph's own first output); `features`: a second one."""
        names = [output or None] + ([features] if features else [])
        self.model = OnnxModel(model_path, names, threads, 1, DISABLED_OPTIMIZERS)
        self.tokenizer = open_tokenizer(tokenizer_path, FALLBACK_WINDOW)

    def logits_one(self, text: str) -> np.ndarray:
        return self.model.run(self.tokenizer.encode(text).ids)[0]

    def logits(self, texts: list[str]) -> np.ndarray:
        """Batch-1 calls, as the engine makes them, so results never depend on batch composition."""
        return self.model.rows([e.ids for e in self.tokenizer.encode_batch(texts)])[0]

    def outputs(self, texts: list[str]) -> Outputs:
        """Logits, and features where the stage was opened with them, with what the rules read."""
        rows = self.model.rows([e.ids for e in self.tokenizer.encode_batch(texts)])
        return Outputs.of(rows[0], rows[1] if len(rows) > 1 else None)
