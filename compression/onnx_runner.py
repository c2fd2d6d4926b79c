"""Run an exported ONNX classifier the way the service does: Rust tokenizer, one query per call."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

# ORT graph rewrites left out when a session loads a model. SkipLayerNormalization's CPU kernel (ORT 1.32)
# takes about 1.8 us per token against 0.3 us for the Add + LayerNormalization it replaces: about a fifth of
# a query for this model. The export leaves that fusion out and the card tells the service to do the same.
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(
        str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(DISABLED_OPTIMIZERS)
    )


class OnnxClassifier:
    def __init__(self, model_path: Path, tokenizer_path: Path, threads: int = 1) -> None:
        self.session = session(model_path, threads)
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.input_names = {i.name for i in self.session.get_inputs()}

    def feed(self, ids: list[list[int]]) -> dict[str, np.ndarray]:
        width = max(len(x) for x in ids)
        input_ids = np.zeros((len(ids), width), dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        return feed

    def logits_one(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(text).ids
        out: np.ndarray = self.session.run(["logits"], self.feed([ids]))[0][0]
        return out

    def logits(self, texts: list[str]) -> np.ndarray:
        """Batch-1 calls, as the service makes them, so results never depend on batch composition."""
        return np.stack([self.logits_one(t) for t in texts])

    def latencies_ms(self, texts: list[str], warmup: int = 50) -> np.ndarray:
        for t in texts[:warmup]:
            self.logits_one(t)
        times = np.empty(len(texts))
        for i, t in enumerate(texts):
            start = time.perf_counter()
            self.logits_one(t)
            times[i] = (time.perf_counter() - start) * 1000
        return times
