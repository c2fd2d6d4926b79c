"""Text -> intent: Rust tokenizer, one ONNX Runtime session, softmax, and the card's OOS rule."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from app.artifact import Artifact
from app.errors import ModelLoadError


@dataclass(frozen=True)
class Prediction:
    intent: str
    confidence: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    tokenize_s: float = 0.0
    inference_s: float = 0.0
    truncated: bool = False


class Classifier(Protocol):
    """What the routes need; tests substitute a fake with the same shape."""

    labels: list[str]
    version: str

    def predict(self, text: str, top_k: int = 0) -> Prediction: ...

    def close(self) -> None: ...


def session_options(intra: int, inter: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = inter
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the cores that other workers need; with one intra thread it changes nothing.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


class OnnxClassifier:
    def __init__(self, artifact: Artifact, intra_threads: int = 1, inter_threads: int = 1) -> None:
        directory = artifact.directory
        try:
            self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:  # noqa: BLE001 - the Rust library raises plain Exception on any parse error
            raise ModelLoadError(f"unreadable tokenizer.json: {str(exc).splitlines()[0][:200]}") from None
        self.tokenizer.no_padding()
        truncation = self.tokenizer.truncation
        self.window = int(truncation["max_length"]) if truncation else int(artifact.card.get("max_length", 512))
        if not truncation:
            self.tokenizer.enable_truncation(max_length=self.window)
        try:
            self.session = ort.InferenceSession(
                str(directory / "model.onnx"),
                session_options(intra_threads, inter_threads),
                providers=["CPUExecutionProvider"],
                disabled_optimizers=artifact.ort_disabled_optimizers,
            )
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors for a bad model file
            raise ModelLoadError(f"unloadable model.onnx: {str(exc).splitlines()[0][:200]}") from None
        inputs = {i.name for i in self.session.get_inputs()}
        if not {"input_ids", "attention_mask"} <= inputs:
            raise ModelLoadError(f"model.onnx inputs are {sorted(inputs)}, expected input_ids and attention_mask")
        self.token_types = "token_type_ids" in inputs
        self.labels = artifact.labels
        self.version = artifact.version
        self.oos_index = self.labels.index(artifact.oos_label)
        self.threshold = artifact.oos_threshold
        self.energy_rule = artifact.oos_rule == "energy"
        self._output = [self.session.get_outputs()[0].name]
        width = self.session.run(self._output, self._feed([101, 102]))[0].shape[-1]
        if width != len(self.labels):
            raise ModelLoadError(f"model outputs {width} logits but labels.json has {len(self.labels)} labels")

    def _feed(self, ids: list[int]) -> dict[str, np.ndarray]:
        input_ids = np.array([ids], dtype=np.int64)
        feed = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}
        if self.token_types:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        return feed

    def predict(self, text: str, top_k: int = 0) -> Prediction:
        t0 = time.perf_counter()
        encoding = self.tokenizer.encode(text)
        t1 = time.perf_counter()
        logits = self.session.run(self._output, self._feed(encoding.ids))[0][0]
        t2 = time.perf_counter()
        top = logits.max()
        exp = np.exp(logits - top)
        total = exp.sum()
        probs = exp / total
        best = int(probs.argmax())
        confidence = float(probs[best])
        # energy = log(sum(exp(logits))): the card's rule may threshold it instead of the top probability.
        in_scope_score = float(top + np.log(total)) if self.energy_rule else confidence
        if in_scope_score < self.threshold:
            # The OOS rule fired: the model's doubt about its best in-scope guess is the confidence in 'oos'.
            best, confidence = self.oos_index, max(float(probs[self.oos_index]), 1.0 - confidence)
        ranked: list[tuple[str, float]] = []
        if top_k:
            order = np.argsort(-probs)[:top_k]
            ranked = [(self.labels[i], float(probs[i])) for i in order]
        return Prediction(
            intent=self.labels[best],
            confidence=confidence,
            top_k=ranked,
            tokenize_s=t1 - t0,
            inference_s=t2 - t1,
            truncated=bool(encoding.overflowing),
        )

    def close(self) -> None:
        del self.session
