"""Out-of-scope rules: one class each, with its parameters as a strict spec, `fit` for the factory and `score`
for the engine. A rule scores how in-scope each row looks; under the spec's threshold the answer is `oos`.

Every method is vectorised over rows and is given only the rows that reach it. What several rules read (the
softmax, the energy, the argmax) is computed once per row, in `Outputs`. Adding a rule is one class and one entry
in `RULES`; the spec's tagged union (`RuleSpec`) is built from that registry.
"""

from __future__ import annotations

import copy
import io
import math
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Self, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.engine.errors import ModelLoadError


def softmax_and_energy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The softmax of each row and its energy (log-sum-exp), from one exponential of the shifted logits."""
    peak = logits.max(axis=-1)
    exp = np.exp(logits - peak[:, None])
    total = exp.sum(axis=-1)
    return exp / total[:, None], peak + np.log(total)


@dataclass(frozen=True)
class Outputs:
    """A stage's outputs for the rows that reached it, with the values every rule and the answer read computed
    once: the softmax, its argmax and top probability, and the energy (log-sum-exp of the logits)."""

    logits: np.ndarray  # [n, C]
    probs: np.ndarray  # [n, C]
    pred: np.ndarray  # [n] argmax
    top: np.ndarray  # [n] probability of the argmax
    energy: np.ndarray  # [n]
    features: np.ndarray | None = None  # [n, D], where the stage has a features output

    @classmethod
    def of(cls, logits: np.ndarray, features: np.ndarray | None = None) -> Outputs:
        probs, energy = softmax_and_energy(logits)
        return cls(logits, probs, probs.argmax(axis=-1), probs.max(axis=-1), energy, features)

    def __len__(self) -> int:
        return len(self.logits)

    def rows(self, index: np.ndarray) -> Outputs:
        """The same outputs for a subset of rows (a boolean mask or indices)."""
        features = None if self.features is None else self.features[index]
        return Outputs(
            self.logits[index], self.probs[index], self.pred[index], self.top[index], self.energy[index], features
        )


class StrictSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,100}$"  # a plain file name in the artifact directory, no paths


class RuleSpecBase(StrictSpec):
    """What every rule's spec has: its tag, and the threshold under which the answer is `oos`."""

    kind: str = ""  # each rule's spec narrows this to its own tag
    threshold: float

    def files(self) -> tuple[str, ...]:
        """The artifact files the rule reads."""
        return ()


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be finite")
    return value


class MaxProbSpec(RuleSpecBase):
    kind: Literal["max_prob"] = "max_prob"
    threshold: float = Field(ge=0.0, lt=1.0, description="top softmax probability under which the answer is oos")


class EnergySpec(RuleSpecBase):
    kind: Literal["energy"] = "energy"
    threshold: float = Field(description="energy (log-sum-exp of the logits) under which the answer is oos")

    _finite = field_validator("threshold")(_finite)


class MahalanobisSpec(RuleSpecBase):
    kind: Literal["mahalanobis"] = "mahalanobis"
    threshold: float = Field(lt=0.0, description="minus the squared distance per dimension, under which: oos")
    stats_file: str = Field(pattern=FILE_NAME, description="npz with `whiten` [D, D] and `centers` [K, D]")

    def files(self) -> tuple[str, ...]:
        return (self.stats_file,)


class Standardise(StrictSpec):
    """(x - mean) / std, both measured on in-scope validation queries."""

    mean: float
    std: float = Field(gt=0.0)

    _finite = field_validator("mean", "std")(_finite)


class Gate(StrictSpec):
    """Rows whose energy reaches `energy_floor` are in scope by their logits alone: the neighbour test, and in a
    graph that gates its sentence encoder on the same floor the encoder too, is skipped for them."""

    energy_floor: float

    _finite = field_validator("energy_floor")(_finite)


class EnergyKnnSpec(RuleSpecBase):
    kind: Literal["energy_knn"] = "energy_knn"
    threshold: float
    energy: Standardise
    similarity: Standardise
    weight: float = Field(ge=0.0, description="weight of the standardised similarity against the energy's")
    references_file: str = Field(pattern=FILE_NAME, description="npz holding the in-scope reference vectors")
    references_array: str = Field("references", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")
    gate: Gate | None = None

    _finite = field_validator("threshold", "weight")(_finite)

    def files(self) -> tuple[str, ...]:
        return (self.references_file,)


def read_npz(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Named arrays of an npz file as float32 (no pickles; other arrays in the file are not read)."""
    try:
        with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
            arrays = {name: np.asarray(npz[name], dtype=np.float32) for name in names}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"unreadable {path.name}: {str(exc)[:200]}") from None
    if not all(np.isfinite(a).all() for a in arrays.values()):
        raise ModelLoadError(f"{path.name}: non-finite values")
    return arrays


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with path.open("wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FitData:
    """What rules are fitted on: a stage's outputs for the in-scope training queries (with their label ids) and
    for the in-scope validation queries, on which scores are standardised. No out-of-scope query is among them."""

    train: Outputs
    train_labels: np.ndarray
    validation: Outputs


class Rule(ABC):
    """One OOS rule: its spec, and the arrays it read from the artifact."""

    Spec: ClassVar[type[RuleSpecBase]]
    kind: ClassVar[str]
    needs_features: ClassVar[bool] = False
    # The thresholds that make sense for the score, low <= t < high (as the spec enforces), and the grid the
    # factory tunes them on.
    low: ClassVar[float] = -math.inf
    high: ClassVar[float] = math.inf
    grid_step: ClassVar[float] = 0.01
    doc: ClassVar[str]

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    @classmethod
    def load(cls, spec: Any, directory: Path) -> Self:
        """The rule of `spec`, with the files it names read from `directory`."""
        return cls(spec)

    @classmethod
    def fit(cls, data: FitData, options: Mapping[str, Any]) -> Rule:
        """Fitted on in-scope queries alone; its threshold is then set by the factory (`with_threshold`)."""
        return cls(cls.Spec(threshold=cls.default_threshold()))

    @classmethod
    def default_threshold(cls) -> float:
        return 0.0

    def with_threshold(self, threshold: float) -> Self:
        """The same rule at another threshold, checked against the rule's own range."""
        clone = copy.copy(self)
        clone.spec = type(self.spec).model_validate({**self.spec.model_dump(), "threshold": threshold})
        return clone

    def save(self, directory: Path) -> list[str]:
        """Write the files the spec names into `directory`; their names."""
        return []

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(self.spec.files())

    @property
    def threshold(self) -> float:
        return float(self.spec.threshold)

    @abstractmethod
    def score(self, out: Outputs) -> np.ndarray:
        """How in-scope each row looks: [n]."""

    def fired(self, out: Outputs) -> np.ndarray:
        """Rows the rule sends to `oos`."""
        result: np.ndarray = self.score(out) < self.threshold
        return result

    def decide(self, out: Outputs, oos_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's answer and confidence: the argmax, unless the rule fires; then `oos`, with the model's doubt
        about its best in-scope guess, max(p(oos), 1 - p(top)), as the confidence."""
        fired = self.fired(out)
        if not fired.any():  # the usual case, and one text at a time each array operation costs microseconds
            return out.pred, out.top
        pred = np.where(fired, oos_index, out.pred)
        confidence = np.where(fired, np.maximum(out.probs[:, oos_index], 1.0 - out.top), out.top)
        return pred, confidence

    def macs(self) -> int:
        """Multiply-adds per query of the rule's own arithmetic beyond the logits (its worst case)."""
        return 0

    def check_features(self, width: int | None) -> None:
        """Raise ModelLoadError when the model's features (None: no features output) do not suit the rule."""
        if self.needs_features and width is None:
            raise ModelLoadError(f"the {self.kind} rule needs the model's features output")


class MaxProb(Rule):
    Spec = MaxProbSpec
    kind = "max_prob"
    low, high = 0.0, 1.0
    doc = "top softmax probability"

    def score(self, out: Outputs) -> np.ndarray:
        return out.top


class Energy(Rule):
    Spec = EnergySpec
    kind = "energy"
    doc = (
        "log-sum-exp of the logits, the negative free energy of Liu et al. (2020), 'Energy-based "
        "Out-of-distribution Detection': it keeps the logits' scale, which the softmax normalises away"
    )

    def score(self, out: Outputs) -> np.ndarray:
        return out.energy


class Mahalanobis(Rule):
    Spec = MahalanobisSpec
    kind = "mahalanobis"
    needs_features = True
    high = 0.0
    doc = (
        "minus the squared Mahalanobis distance of the features to the nearest in-scope class mean, with the "
        "covariance shared by the classes, per feature dimension (Lee et al. 2018; Podolskiy et al. 2021 on "
        "CLINC150)"
    )
    FILE = "mahalanobis.npz"
    RIDGE = 1e-3  # of the shared covariance, as a share of its trace: keeps the inverse well conditioned

    def __init__(self, spec: MahalanobisSpec, whiten: np.ndarray, centers: np.ndarray) -> None:
        super().__init__(spec)
        if whiten.ndim != 2 or whiten.shape[0] != whiten.shape[1] or centers.ndim != 2:
            raise ModelLoadError("mahalanobis: whiten must be [D, D] and centers [K, D]")
        if centers.shape[1] != whiten.shape[0] or centers.shape[0] < 1:
            raise ModelLoadError(f"mahalanobis: centers are {centers.shape}, whiten is {whiten.shape}")
        self.whiten, self.centers = whiten, centers

    @classmethod
    def load(cls, spec: MahalanobisSpec, directory: Path) -> Self:
        arrays = read_npz(directory / spec.stats_file, ("whiten", "centers"))
        return cls(spec, arrays["whiten"], arrays["centers"])

    @classmethod
    def fit(cls, data: FitData, options: Mapping[str, Any]) -> Rule:
        """Class means and the inverse of the covariance they share (pooled within-class covariance plus a ridge),
        whitened: with P = L L^T, |f L - mean L|^2 is the squared Mahalanobis distance."""
        if data.train.features is None:
            raise ValueError("mahalanobis needs features")
        features, labels = data.train.features.astype(np.float64), data.train_labels
        classes = np.unique(labels)
        if len(classes) < 2:
            raise ValueError("mahalanobis needs at least two classes")
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        centred = features - means[np.searchsorted(classes, labels)]
        cov = centred.T @ centred / (len(features) - len(classes))
        ridge = float(options.get("ridge", cls.RIDGE))
        cov += ridge * float(np.trace(cov)) / cov.shape[0] * np.eye(cov.shape[0])
        whiten = np.linalg.cholesky(np.linalg.inv(cov))
        spec = MahalanobisSpec(threshold=cls.default_threshold(), stats_file=cls.FILE)
        return cls(spec, whiten.astype(np.float32), (means @ whiten).astype(np.float32))

    @classmethod
    def default_threshold(cls) -> float:
        return -1.0

    def save(self, directory: Path) -> list[str]:
        write_npz(directory / self.spec.stats_file, {"whiten": self.whiten, "centers": self.centers})
        return [self.spec.stats_file]

    def sq_distances(self, features: np.ndarray) -> np.ndarray:
        """Squared distances to every class, [n, K], by |z|^2 - 2 z.m + |m|^2."""
        z = features.astype(np.float32) @ self.whiten
        out: np.ndarray = (z * z).sum(-1, keepdims=True) - 2 * (z @ self.centers.T) + (self.centers**2).sum(-1)
        clipped: np.ndarray = np.maximum(out, 0.0)  # rounding can take a distance just below zero
        return clipped

    def score(self, out: Outputs) -> np.ndarray:
        assert out.features is not None
        # Per dimension, so that a threshold reads the same whatever the width: about -1 in scope.
        result: np.ndarray = -self.sq_distances(out.features).min(axis=-1) / self.whiten.shape[0]
        return result

    def macs(self) -> int:
        return int(self.whiten.size + self.centers.size)

    def check_features(self, width: int | None) -> None:
        super().check_features(width)
        if width != self.whiten.shape[0]:
            raise ModelLoadError(
                f"{self.spec.stats_file} is for {self.whiten.shape[0]} features, the model gives {width}"
            )


def spherical_kmeans(vectors: np.ndarray, k: int, seed: int = 0, iterations: int = 20) -> np.ndarray:
    """k unit centres of unit `vectors` (cosine k-means), seeded by a fixed random choice of rows."""
    if len(vectors) <= k:
        return vectors.copy()
    rng = np.random.default_rng(seed)
    centres = vectors[rng.choice(len(vectors), k, replace=False)].copy()
    for _ in range(iterations):
        assign = (vectors @ centres.T).argmax(axis=-1)
        for j in range(k):
            members = vectors[assign == j]
            if len(members):
                centre = members.sum(axis=0)
                centres[j] = centre / max(float(np.linalg.norm(centre)), 1e-12)
    return centres


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    out: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return out


class EnergyKnn(Rule):
    Spec = EnergyKnnSpec
    kind = "energy_knn"
    needs_features = True
    doc = (
        "energy plus the cosine similarity of a sentence embedding to the nearest in-scope reference vector, each "
        "standardised on in-scope validation: fine-tuning pulls unseen queries onto some intent, while a "
        "general-purpose sentence space still sees them as far from every in-scope query (kNN as in Sun et al. "
        "2022, 'Out-of-Distribution Detection with Deep Nearest Neighbors')"
    )
    FILE = "references.npz"

    def __init__(self, spec: EnergyKnnSpec, references: np.ndarray) -> None:
        super().__init__(spec)
        if references.ndim != 2 or not references.size:
            raise ModelLoadError(f"{spec.references_file}: references must be a non-empty [N, D] array")
        self.references = references

    @classmethod
    def load(cls, spec: EnergyKnnSpec, directory: Path) -> Self:
        arrays = read_npz(directory / spec.references_file, (spec.references_array,))
        return cls(spec, arrays[spec.references_array])

    @classmethod
    def fit(cls, data: FitData, options: Mapping[str, Any]) -> Rule:
        """Reference vectors from the in-scope training queries' unit features: all of them, or
        `prototypes_per_intent` spherical k-means centres per intent. They are stored in half precision, so they
        are rounded so here, and the standardisation is measured on what the engine will read."""
        if data.train.features is None or data.validation.features is None:
            raise ValueError("energy_knn needs features")
        train = unit(data.train.features)
        per_intent = int(options.get("prototypes_per_intent", 0))
        if per_intent > 0:
            labels = data.train_labels
            train = np.concatenate(
                [spherical_kmeans(train[labels == c], per_intent, seed=int(c)) for c in np.unique(labels)]
            )
        references = train.astype(np.float16).astype(np.float32)
        provisional = EnergyKnnSpec(
            threshold=0.0,
            energy=Standardise(mean=0.0, std=1.0),
            similarity=Standardise(mean=0.0, std=1.0),
            weight=float(options.get("weight", 1.0)),
            references_file=cls.FILE,
        )
        rule = cls(provisional, references)
        energy = data.validation.energy
        similarity = rule.nearest_similarity(data.validation.features)
        spec = provisional.model_copy(
            update={
                "energy": Standardise(mean=float(energy.mean()), std=float(energy.std())),
                "similarity": Standardise(mean=float(similarity.mean()), std=float(similarity.std())),
            }
        )
        return cls(spec, references)

    def with_gate(self, energy_floor: float | None) -> EnergyKnn:
        gate = None if energy_floor is None else Gate(energy_floor=energy_floor)
        return EnergyKnn(self.spec.model_copy(update={"gate": gate}), self.references)

    def save(self, directory: Path) -> list[str]:
        write_npz(
            directory / self.spec.references_file, {self.spec.references_array: self.references.astype(np.float16)}
        )
        return [self.spec.references_file]

    def nearest_similarity(self, features: np.ndarray) -> np.ndarray:
        """Cosine similarity of each row to its nearest reference vector: the neighbour scan."""
        out: np.ndarray = (unit(features) @ self.references.T).max(axis=-1)
        return out

    def _combine(self, energy: np.ndarray, similarity: np.ndarray) -> np.ndarray:
        s = self.spec
        out: np.ndarray = (energy - s.energy.mean) / s.energy.std + s.weight * (
            (similarity - s.similarity.mean) / s.similarity.std
        )
        return out

    def score(self, out: Outputs) -> np.ndarray:
        """Every row's score, the neighbour scan included (the factory tunes on these)."""
        assert out.features is not None
        return self._combine(out.energy, self.nearest_similarity(out.features))

    def fired(self, out: Outputs) -> np.ndarray:
        """As `score`, but the gate's rows are in scope without the scan: it runs only on the rows under the
        energy floor, the only ones whose answer it can change."""
        gate = self.spec.gate
        if gate is None:
            return super().fired(out)
        tested = out.energy < gate.energy_floor
        if tested.all():  # one text at a time, the rows are all tested or none: no copies to make
            assert out.features is not None
            whole: np.ndarray = self._combine(out.energy, self.nearest_similarity(out.features)) < self.threshold
            return whole
        fired = np.zeros(len(out), dtype=bool)
        if tested.any():
            assert out.features is not None
            fired[tested] = self._combine(out.energy[tested], self.nearest_similarity(out.features[tested])) < (
                self.threshold
            )
        return fired

    def macs(self) -> int:
        return int(self.references.size)

    def check_features(self, width: int | None) -> None:
        super().check_features(width)
        if width != self.references.shape[1]:
            raise ModelLoadError(
                f"{self.spec.references_file} holds {self.references.shape[1]}-wide vectors, the model gives {width}"
            )


RULES: dict[str, type[Rule]] = {rule.kind: rule for rule in (MaxProb, Energy, Mahalanobis, EnergyKnn)}

# The spec's tagged union of every registered rule's parameters, told apart by `kind`.
if TYPE_CHECKING:
    RuleSpec = RuleSpecBase
else:
    RuleSpec = Annotated[Union[tuple(rule.Spec for rule in RULES.values())], Field(discriminator="kind")]  # noqa: UP007


def rule_class(kind: str) -> type[Rule]:
    try:
        return RULES[kind]
    except KeyError:
        raise ValueError(f"unknown OOS rule {kind[:40]!r}; expected one of {', '.join(RULES)}") from None


def load_rule(spec: Any, directory: Path) -> Rule:
    return rule_class(spec.kind).load(spec, directory)
