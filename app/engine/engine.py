"""The engine: one object, built from a serving spec, that runs texts through tokenize -> stages -> OOS rule.

`run` is the served decision for a batch of texts, with per-stage timings; the service (`predict`, one text),
`/admin/reload`, the factory's evaluation and every benchmark go through it. Each stage runs only on the rows
the stages before it left undecided, and the rule only on the rows that reach the last stage, so a row does only
the work that can change its answer. `outputs` gives one stage's raw outputs on every text: what the factory
fits and tunes rules and thresholds on; it decides nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tokenizers import Encoding

from app.engine.artifact import Artifact, load_artifact
from app.engine.errors import ModelLoadError
from app.engine.onnx import OnnxModel
from app.engine.rules import Outputs, Rule, load_rule
from app.engine.spec import ServingSpec, StaticStage, TransformerStage
from app.engine.tokenize import open_tokenizer

WEIGHTS_SIGNED = "int8: this CPU multiplies them exactly, so the stored uint8 weights were flipped at load"
WEIGHTS_STORED = "as stored"

# Run before a model serves (start-up and reload), so that its first real query pays no cold-start costs.
WARMUP_TEXTS = (
    "what is my account balance",
    "book a table for two at 7pm",
    "tell me a joke",
    "how do you say hello in french",
)


@dataclass(frozen=True)
class Decisions:
    """Per text: the answer's label index, its confidence, the softmax of the stage that answered, the index of
    that stage, and whether the text was cut to the token window; and the seconds each step took, summed over
    the texts (`tokenize`, each stage by name, `rule`)."""

    pred: np.ndarray
    confidence: np.ndarray
    probs: np.ndarray
    stage: np.ndarray
    truncated: np.ndarray
    timings: dict[str, float]


@dataclass(frozen=True)
class Prediction:
    """One text's answer, as the service returns it."""

    intent: str
    confidence: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    tokenize_s: float = 0.0
    inference_s: float = 0.0  # every stage that ran, and the rule
    truncated: bool = False
    stage: str = "transformer"  # the stage that answered
    model_version: str = ""  # the model that answered: after a reload, in-flight requests finish on the old one


class Predictor(Protocol):
    """What the service needs of a model; tests substitute a fake with the same shape."""

    labels: list[str]
    version: str

    def predict(self, text: str, top_k: int = 0) -> Prediction: ...

    def warm(self, text: str) -> None:
        """Run `text` through every part of the model, whatever it would answer, and drop the result."""

    def close(self) -> None: ...


def stage_outputs(model: OnnxModel, encodings: Sequence[Encoding]) -> Outputs:
    rows = model.rows([e.ids for e in encodings])
    return Outputs.of(rows[0], rows[1] if len(rows) > 1 else None)


def first_stage_answers(out: Outputs, threshold: float, oos_index: int) -> np.ndarray:
    """The rows a static stage answers: confident (top probability at or above the threshold) and in scope."""
    answered: np.ndarray = (out.top >= threshold) & (out.pred != oos_index)
    return answered


def _assemble(
    answers: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]],
    n: int,
    truncated: np.ndarray,
    timings: dict[str, float],
) -> Decisions:
    """The stages' answers put back in the texts' order (one stage answering every row needs no copy)."""
    if len(answers) == 1:
        _, pred, confidence, probs, index = answers[0]
        return Decisions(pred, confidence, probs, np.full(n, index, dtype=np.int8), truncated, timings)
    width = answers[0][3].shape[1]
    pred_all = np.empty(n, dtype=np.int64)
    confidence_all = np.empty(n, dtype=np.float32)
    probs_all = np.empty((n, width), dtype=np.float32)
    stage_all = np.empty(n, dtype=np.int8)
    for rows, pred, confidence, probs, index in answers:
        pred_all[rows], confidence_all[rows], probs_all[rows], stage_all[rows] = pred, confidence, probs, index
    return Decisions(pred_all, confidence_all, probs_all, stage_all, truncated, timings)


class Engine:
    def __init__(
        self, spec: ServingSpec, directory: Path, labels: list[str], version: str, intra: int = 1, inter: int = 1
    ) -> None:
        self.spec = spec
        self.labels = labels
        self.version = version
        self.oos_index = labels.index(spec.labels.oos_label)
        self.tokenizer = open_tokenizer(directory / spec.tokenizer.file, spec.tokenizer.max_length)
        self.models: list[OnnxModel] = []
        for stage in spec.stages:
            if isinstance(stage, TransformerStage):
                names = [stage.logits_output] + ([stage.features_output] if stage.features_output else [])
                disabled = stage.ort_disabled_optimizers
            else:
                names, disabled = ["logits"], []
            self.models.append(OnnxModel(directory / stage.file, names, intra, inter, disabled))
        self.stage_names = [s.name for s in spec.stages]
        # Which weights run: what /model and the benchmark rows report beside the CPU (app.engine.signed_weights).
        self.weights = WEIGHTS_SIGNED if any(m.signed_at_load for m in self.models) else WEIGHTS_STORED
        self.rule: Rule = load_rule(spec.rule, directory)
        self._check_outputs()

    @classmethod
    def from_artifact(cls, artifact: Artifact, intra: int = 1, inter: int = 1) -> Engine:
        card = artifact.card
        return cls(card.spec, artifact.directory, artifact.labels, card.version, intra, inter)

    @classmethod
    def open(cls, directory: Path, verify: bool = True, intra: int = 1, inter: int = 1) -> Engine:
        return cls.from_artifact(load_artifact(directory, verify), intra, inter)

    def _check_outputs(self) -> None:
        """A probe with no words, only the tokenizer's own special tokens (or token 0 where it adds none): every
        stage's logits are as wide as the labels, and the last stage's features suit the rule."""
        probe = self.tokenizer.encode("").ids or [0]
        for model in self.models:
            width = model.run(probe)[0].shape[-1]
            if width != len(self.labels):
                raise ModelLoadError(f"{model.name} outputs {width} logits but there are {len(self.labels)} labels")
        last = self.models[-1].run(probe)
        self.rule.check_features(last[1].shape[-1] if len(last) > 1 else None)

    def encode(self, texts: Sequence[str]) -> list[Encoding]:
        if len(texts) == 1:
            return [self.tokenizer.encode(texts[0])]
        return list(self.tokenizer.encode_batch(list(texts)))

    def run(self, texts: Sequence[str]) -> Decisions:
        """The served decision for every text."""
        started = time.perf_counter()
        encodings = self.encode(texts)
        timings = {"tokenize": time.perf_counter() - started}
        oos = self.oos_index
        remaining = np.arange(len(encodings))
        # Each stage's answers for the rows it decided: (rows, pred, confidence, probs, stage index).
        answers: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]] = []
        for index, (stage, model) in enumerate(zip(self.spec.stages, self.models, strict=True)):
            began = time.perf_counter()
            out = stage_outputs(model, encodings if not answers else [encodings[r] for r in remaining])
            if isinstance(stage, StaticStage):
                answered = first_stage_answers(out, stage.threshold, oos)
                if answered.all():
                    answers.append((remaining, out.pred, out.top, out.probs, index))
                    remaining = remaining[:0]
                elif answered.any():
                    answers.append(
                        (remaining[answered], out.pred[answered], out.top[answered], out.probs[answered], index)
                    )
                    remaining = remaining[~answered]
                timings[stage.name] = time.perf_counter() - began
                if not remaining.size:
                    break
                continue
            ruled = time.perf_counter()
            pred, confidence = self.rule.decide(out, oos)
            answers.append((remaining, pred, confidence, out.probs, index))
            timings[stage.name] = ruled - began
            timings["rule"] = time.perf_counter() - ruled
        truncated = np.array([bool(e.overflowing) for e in encodings], dtype=bool)
        return _assemble(answers, len(encodings), truncated, timings)

    def predict(self, text: str, top_k: int = 0) -> Prediction:
        """One text, as the service answers it."""
        d = self.run([text])
        ranked: list[tuple[str, float]] = []
        if top_k:
            # The most likely intents: `oos` is a decision, not an intent, so an out-of-scope answer still lists
            # what the query came nearest to, and an in-scope one lists intents only (its closed-set ranking).
            row = d.probs[0]
            # k + 1 of the ranking hold the k best intents whether or not `oos` is among them.
            best = np.argsort(-row, kind="stable")[: top_k + 1]
            order = [i for i in best if i != self.oos_index][:top_k]
            ranked = [(self.labels[i], float(row[i])) for i in order]
        tokenize = d.timings["tokenize"]
        return Prediction(
            intent=self.labels[int(d.pred[0])],
            confidence=float(d.confidence[0]),
            top_k=ranked,
            tokenize_s=tokenize,
            inference_s=sum(d.timings.values()) - tokenize,
            truncated=bool(d.truncated[0]),
            stage=self.stage_names[int(d.stage[0])],
            model_version=self.version,
        )

    def outputs(self, texts: Sequence[str], stage: int = -1) -> Outputs:
        """One stage's outputs on every text (no cascade): what the factory fits rules and tunes thresholds on."""
        return stage_outputs(self.models[stage], self.encode(texts))

    def warm(self, text: str) -> None:
        """Every stage on `text`, and the rule's whole score (a gated neighbour scan included), whatever the
        cascade would answer. A warm-up through `predict` touches only what its texts reach: a confident first
        stage answers everyday texts alone, and the transformer's weights and the reference vectors would stay
        cold until the first hard query paid for them."""
        encodings = self.encode([text])
        outputs = [stage_outputs(model, encodings) for model in self.models]
        self.rule.score(outputs[-1])

    def close(self) -> None:
        self.models.clear()


def check(model_dir: str, verify: bool = True) -> str | None:
    """Open `model_dir` as a worker will (spec, files, sha256, tokenizer, labels against every stage's outputs) and
    release it: the error, or None. `python -m app` runs it in a child process before binding the port."""
    try:
        Engine.open(Path(model_dir), verify).close()
    except ModelLoadError as exc:
        return str(exc)
    return None
