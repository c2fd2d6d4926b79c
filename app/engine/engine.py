"""The engine: one object, built from a serving spec, that runs texts through tokenize -> stages -> OOS rule.

`run` is the served decision for a batch of texts, with per-stage timings, and `predict` for the one text the
service asks about; both decide each text in `_answer`, which `/admin/reload`, the factory's evaluation and every
benchmark reach through them. Each stage runs only on a text the stages before it left undecided, and the rule
only on a text that reaches the last stage, so a text does only the work that can change its answer. `outputs`
gives one stage's raw outputs on every text: what the factory fits and tunes rules and thresholds on; it decides
nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

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
    return Outputs.of(*model.rows([e.ids for e in encodings]))


def first_stage_answers(out: Outputs, threshold: float, oos_index: int) -> np.ndarray:
    """The rows a static stage answers: confident (top probability at or above the threshold) and in scope."""
    answered: np.ndarray = (out.top >= threshold) & (out.pred != oos_index)
    return answered


class Answer(NamedTuple):
    """One text's answer: its label index, its confidence, the softmax row of the stage that answered, and the
    index of that stage."""

    pred: int
    confidence: float
    probs: np.ndarray
    stage: int


def _timed(timings: dict[str, float], step: str, seconds: float) -> None:
    timings[step] = timings.get(step, 0.0) + seconds


class Engine:
    def __init__(
        self,
        spec: ServingSpec,
        directory: Path,
        labels: list[str],
        version: str,
        intra: int = 1,
        inter: int = 1,
        give_back: bool = True,
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
            self.models.append(OnnxModel(directory / stage.file, names, intra, inter, disabled, give_back))
        self.stage_names = [s.name for s in spec.stages]
        # Which weights run: what /model and the benchmark rows report beside the CPU (app.engine.signed_weights).
        self.weights = WEIGHTS_SIGNED if any(m.signed_at_load for m in self.models) else WEIGHTS_STORED
        self.rule: Rule = load_rule(spec.rule, directory)
        self._check_outputs()

    @classmethod
    def from_artifact(cls, artifact: Artifact, intra: int = 1, inter: int = 1, give_back: bool = True) -> Engine:
        """`give_back`: as OnnxModel's; the service passes False and returns the free heap itself."""
        card = artifact.card
        return cls(card.spec, artifact.directory, artifact.labels, card.version, intra, inter, give_back)

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

    def _answer(self, ids: list[int], timings: dict[str, float]) -> Answer:
        """The served decision for one text's token ids: each stage in turn, until one answers, and the rule on
        the last stage's outputs. Each text is its own batch (app.engine.onnx), so a batch runs one text at a
        time too. At that size each array operation costs more than its arithmetic (microseconds, with the
        caches cold after a graph has run), so nothing is indexed, copied or assembled that one row does not
        need. Adds each step's seconds to `timings` (each stage by name, and `rule`)."""
        oos = self.oos_index
        last = len(self.models) - 1
        for index, (stage, model) in enumerate(zip(self.spec.stages, self.models, strict=True)):
            began = time.perf_counter()
            out = Outputs.of(*model.row(ids))
            if index < last:
                assert isinstance(stage, StaticStage)
                answered = bool(first_stage_answers(out, stage.threshold, oos)[0])
                _timed(timings, stage.name, time.perf_counter() - began)
                if answered:
                    return Answer(int(out.pred[0]), float(out.top[0]), out.probs[0], index)
                continue
            ruled = time.perf_counter()
            pred, confidence = self.rule.decide(out, oos)
            _timed(timings, stage.name, ruled - began)
            _timed(timings, "rule", time.perf_counter() - ruled)
            return Answer(int(pred[0]), float(confidence[0]), out.probs[0], index)
        raise AssertionError("the spec ends in a transformer stage, which always answers")

    def run(self, texts: Sequence[str]) -> Decisions:
        """The served decision for every text."""
        started = time.perf_counter()
        encodings = self.encode(texts)
        timings = {"tokenize": time.perf_counter() - started}
        answers = [self._answer(e.ids, timings) for e in encodings]
        width = len(self.labels)
        return Decisions(
            pred=np.array([a.pred for a in answers], dtype=np.int64),
            confidence=np.array([a.confidence for a in answers], dtype=np.float32),
            probs=np.stack([a.probs for a in answers]) if answers else np.empty((0, width), dtype=np.float32),
            stage=np.array([a.stage for a in answers], dtype=np.int8),
            truncated=np.array([bool(e.overflowing) for e in encodings], dtype=bool),
            timings=timings,
        )

    def predict(self, text: str, top_k: int = 0) -> Prediction:
        """One text, as the service answers it."""
        started = time.perf_counter()
        encoding = self.tokenizer.encode(text)
        tokenized = time.perf_counter()
        a = self._answer(encoding.ids, {})
        inference = time.perf_counter() - tokenized
        ranked: list[tuple[str, float]] = []
        if top_k:
            # The most likely intents: `oos` is a decision, not an intent, so an out-of-scope answer still lists
            # what the query came nearest to, and an in-scope one lists intents only (its closed-set ranking).
            # k + 1 of the ranking hold the k best intents whether or not `oos` is among them.
            best = np.argsort(-a.probs, kind="stable")[: top_k + 1]
            order = [i for i in best if i != self.oos_index][:top_k]
            ranked = [(self.labels[i], float(a.probs[i])) for i in order]
        return Prediction(
            intent=self.labels[a.pred],
            confidence=a.confidence,
            top_k=ranked,
            tokenize_s=tokenized - started,
            inference_s=inference,
            truncated=bool(encoding.overflowing),
            stage=self.stage_names[a.stage],
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
