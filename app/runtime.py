"""The served path, opened from an artifact: the Rust tokenizer, one ONNX Runtime session per model file,
and the card's cascade and OOS rules. The service calls `predict` one text at a time; the factory calls
`decisions` over a whole split, which runs the same sessions and the same vectorised rules, so what the
factory measures is what the service answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from app.artifact import Artifact
from app.card import MODEL_FILE, TOKENIZER_FILE, Variant
from app.cascade import combine, first_stage
from app.classifier import Prediction
from app.errors import ModelLoadError
from app.oos import Decision, FeatureStats, decide, get_rule

log = logging.getLogger(__name__)


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


def open_session(path: Path, intra: int = 1, inter: int = 1, disabled: Sequence[str] = ()) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            str(path), session_options(intra, inter), providers=["CPUExecutionProvider"], disabled_optimizers=disabled
        )
    except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors for a bad model file
        raise ModelLoadError(f"unloadable {path.name}: {str(exc).splitlines()[0][:200]}") from None


def open_tokenizer(path: Path, default_window: int) -> Tokenizer:
    """No padding (each text is its own batch of one) and truncation at the model's window."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the Rust library raises plain Exception on any parse error
        raise ModelLoadError(f"unreadable {path.name}: {str(exc).splitlines()[0][:200]}") from None
    tokenizer.no_padding()
    if not tokenizer.truncation:
        tokenizer.enable_truncation(max_length=default_window)
    return tokenizer


class LogitsSession:
    """One ONNX classifier: token ids of one text -> its logits row (and its features row, where asked)."""

    def __init__(
        self, path: Path, intra: int, inter: int, disabled: Sequence[str], features: str | None = None
    ) -> None:
        self.session = open_session(path, intra, inter, disabled)
        inputs = {i.name for i in self.session.get_inputs()}
        if "input_ids" not in inputs or not inputs <= {"input_ids", "attention_mask", "token_type_ids"}:
            raise ModelLoadError(f"{path.name} inputs are {sorted(inputs)}, expected input_ids and attention_mask")
        self.name = path.name
        self._mask = "attention_mask" in inputs
        self._types = "token_type_ids" in inputs
        outputs = [o.name for o in self.session.get_outputs()]
        self._output = outputs[:1]
        if features is not None:
            if features not in outputs:
                raise ModelLoadError(f"{path.name} has no output {features!r} (its outputs: {outputs})")
            self._output.append(features)

    def feed(self, ids: list[int]) -> dict[str, np.ndarray]:
        input_ids = np.array([ids], dtype=np.int64)
        feed = {"input_ids": input_ids}
        if self._mask:
            feed["attention_mask"] = np.ones_like(input_ids)
        if self._types:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        return feed

    def run(self, ids: list[int]) -> np.ndarray:
        return self.run_with_features(ids)[0]

    def run_with_features(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """The logits row, and the features row where the session was opened with a features output."""
        out = self.session.run(self._output, self.feed(ids))
        return out[0][0], (out[1][0] if len(out) > 1 else None)


@dataclass(frozen=True)
class StageLogits:
    """Logits of every text from each stage: what the factory tunes and scores the served rules on."""

    transformer: np.ndarray
    first: np.ndarray | None = None
    features: np.ndarray | None = None  # the transformer's, where the OOS rule reads them


class OnnxClassifier:
    def __init__(
        self,
        artifact: Artifact,
        intra_threads: int = 1,
        inter_threads: int = 1,
        cpu_flags: frozenset[str] | None = None,
    ) -> None:
        card = artifact.card
        self.card = card
        self.labels = artifact.labels
        self.version = artifact.version
        self.oos_index = artifact.oos_index
        self.rule, self.threshold = card.oos_rule, card.oos_threshold
        self.tokenizer = open_tokenizer(artifact.path(TOKENIZER_FILE), card.max_length)
        disabled = card.ort_disabled_optimizers
        self.stats: FeatureStats | None = None
        features = None
        if get_rule(self.rule).needs_features and card.oos_stats is not None:
            features = card.features_output
            try:
                self.stats = FeatureStats.load(artifact.path(card.oos_stats))
            except ValueError as exc:
                raise ModelLoadError(str(exc)) from None
        self.transformer = LogitsSession(
            artifact.path(MODEL_FILE), intra_threads, inter_threads, disabled, features=features
        )
        self.first: LogitsSession | None = None
        self.variant: Variant | None = None
        self.cascade_threshold = 1.0
        if card.cascade is not None:
            self.first = LogitsSession(artifact.path(card.cascade.model), intra_threads, inter_threads, disabled)
            self.cascade_threshold = card.cascade.threshold
            if cpu_flags is None:
                from app.cpu import current

                cpu_flags = current().flags
            self.variant = card.variant_for(cpu_flags)
            if self.variant is not None and self.variant.cascade_threshold is not None:
                self.cascade_threshold = self.variant.cascade_threshold
        # A probe with no words, only the tokenizer's own special tokens: checks the logits' width.
        probe = self.tokenizer.encode("").ids or [0]
        for stage in (self.transformer, self.first):
            if stage is not None and (width := stage.run(probe).shape[-1]) != len(self.labels):
                raise ModelLoadError(
                    f"{stage.name} outputs {width} logits but labels.json has {len(self.labels)} labels"
                )
        if self.stats is not None:
            feature_row = self.transformer.run_with_features(probe)[1]
            if feature_row is None or feature_row.shape != (self.stats.dim,):
                shape = None if feature_row is None else feature_row.shape
                raise ModelLoadError(f"{card.oos_stats} is for {self.stats.dim} features, the model gives {shape}")

    @property
    def variant_name(self) -> str:
        return self.variant.name if self.variant is not None else "default"

    def predict(self, text: str, top_k: int = 0) -> Prediction:
        t0 = time.perf_counter()
        encoding = self.tokenizer.encode(text)
        t1 = time.perf_counter()
        stage = "transformer"
        decision: Decision | None = None
        if self.first is not None:
            answered, first = first_stage(self.first.run(encoding.ids)[None], self.oos_index, self.cascade_threshold)
            if answered[0]:
                decision, stage = first, "first"
        if decision is None:
            logits, features = self.transformer.run_with_features(encoding.ids)
            decision = decide(
                logits[None],
                self.oos_index,
                self.rule,
                self.threshold,
                None if features is None else features[None],
                self.stats,
            )
        t2 = time.perf_counter()
        probs = decision.probs[0]
        ranked: list[tuple[str, float]] = []
        if top_k:
            ranked = [(self.labels[i], float(probs[i])) for i in np.argsort(-probs)[:top_k]]
        return Prediction(
            intent=self.labels[int(decision.pred[0])],
            confidence=float(decision.confidence[0]),
            top_k=ranked,
            tokenize_s=t1 - t0,
            inference_s=t2 - t1,
            truncated=bool(encoding.overflowing),
            stage=stage,
            model_version=self.version,
        )

    def stage_logits(self, texts: Sequence[str]) -> StageLogits:
        """Every stage's logits for every text, each text its own batch of one, as the service runs them."""
        ids = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        rows = [self.transformer.run_with_features(x) for x in ids]
        transformer = np.stack([logits for logits, _ in rows])
        features = np.stack([f for _, f in rows if f is not None]) if self.stats is not None else None
        first = np.stack([self.first.run(x) for x in ids]) if self.first is not None else None
        return StageLogits(transformer=transformer, first=first, features=features)

    def decisions(self, logits: StageLogits, cascade_threshold: float | None = None) -> tuple[Decision, np.ndarray]:
        """The served answers for precomputed stage logits, and which rows the first stage answered."""
        second = decide(logits.transformer, self.oos_index, self.rule, self.threshold, logits.features, self.stats)
        if logits.first is None:
            return second, np.zeros(len(logits.transformer), dtype=bool)
        tau = self.cascade_threshold if cascade_threshold is None else cascade_threshold
        answered, first = first_stage(logits.first, self.oos_index, tau)
        return combine(answered, first, second), answered

    def close(self) -> None:
        del self.transformer, self.first
