"""Out-of-scope rules: one registry, used by the service on one row and by the factory on a whole split.

A rule scores how in-scope a query looks, from its logits or, for feature-space rules, from the
transformer's pooled features and per-class statistics that ship in the artifact (`FeatureStats`); below
the card's threshold the answer is `oos`. Every function here is vectorised over leading axes, so that the
service and the factory's evaluation run the same arithmetic, and the factory's tuned threshold is exactly
the one the service applies. Adding a rule is one entry in `RULES`.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probs: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return probs


@dataclass(frozen=True)
class FeatureStats:
    """What the feature-space rules compare a query's features with, fitted on the training split and stored as
    `oos_stats.npz` in the artifact:
    - for `mahalanobis`, the in-scope classes' statistics, whitened: with P = L L^T the inverse of the covariance
      shared by the classes, a query's squared Mahalanobis distance to class c is |f L - centers[c]|^2, where
      centers = means L;
    - for `energy_knn`, the in-scope training queries' unit-length features (`neighbours`) and how the rule's two
      scores are standardised and weighed (`combine`: energy mean and std, similarity mean and std on in-scope
      validation, then the similarity's weight)."""

    whiten: np.ndarray  # L, [D, D]
    centers: np.ndarray  # class means times L, [K, D]
    neighbours: np.ndarray | None = None  # [N, D], unit rows
    combine: np.ndarray | None = None  # [5]

    ARRAYS = ("whiten", "centers")
    OPTIONAL = ("neighbours", "combine")

    @property
    def dim(self) -> int:
        return int(self.whiten.shape[0])

    @property
    def macs(self) -> int:
        """Multiply-adds of one query's distances: f L, then z . centers."""
        return int(self.whiten.size + self.centers.size)

    @property
    def knn_macs(self) -> int:
        """Multiply-adds of one query's similarities to every stored neighbour."""
        return int(self.neighbours.size) if self.neighbours is not None else 0

    @classmethod
    def load(cls, path: Path) -> FeatureStats:
        """Read and check an npz file (no pickles); ValueError on any problem."""
        try:
            with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as npz:
                arrays = {name: np.asarray(npz[name], dtype=np.float32) for name in cls.ARRAYS}
                optional = {n: np.asarray(npz[n], dtype=np.float32) for n in cls.OPTIONAL if n in npz.files}
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"unreadable {path.name}: {str(exc)[:200]}") from None
        whiten, centers = arrays["whiten"], arrays["centers"]
        if whiten.ndim != 2 or whiten.shape[0] != whiten.shape[1] or centers.ndim != 2:
            raise ValueError(f"{path.name}: whiten must be [D, D] and centers [K, D]")
        if centers.shape[1] != whiten.shape[0] or centers.shape[0] < 1:
            raise ValueError(f"{path.name}: centers are {centers.shape}, whiten is {whiten.shape}")
        neighbours, combine = optional.get("neighbours"), optional.get("combine")
        if neighbours is not None and (
            neighbours.ndim != 2 or neighbours.shape[1] != whiten.shape[0] or not neighbours.size
        ):
            raise ValueError(f"{path.name}: neighbours are {neighbours.shape}, features are {whiten.shape[0]} wide")
        if combine is not None and (combine.shape != (5,) or not (combine[1] > 0 and combine[3] > 0)):
            raise ValueError(f"{path.name}: combine must be 5 values with positive standard deviations")
        if not all(np.isfinite(a).all() for a in (whiten, centers, *optional.values())):
            raise ValueError(f"{path.name}: non-finite values")
        return cls(whiten=whiten, centers=centers, neighbours=neighbours, combine=combine)

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {"whiten": self.whiten.astype(np.float32), "centers": self.centers.astype(np.float32)}
        if self.neighbours is not None:
            # Half precision halves the file; similarities move by about 1e-3, and the factory scores the stored
            # arrays, so its thresholds are the service's.
            arrays["neighbours"] = self.neighbours.astype(np.float16)
        if self.combine is not None:
            arrays["combine"] = self.combine.astype(np.float32)
        with path.open("wb") as f:
            np.savez(f, **arrays)

    def sq_distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances to every class, [..., K], by |z|^2 - 2 z.m + |m|^2."""
        z = features.astype(np.float32) @ self.whiten
        near = z @ self.centers.T
        out: np.ndarray = (z * z).sum(-1, keepdims=True) - 2 * near + (self.centers * self.centers).sum(-1)
        clipped: np.ndarray = np.maximum(out, 0.0)  # rounding can take a distance just below zero
        return clipped

    def nearest_similarity(self, features: np.ndarray) -> np.ndarray:
        """Cosine similarity to the nearest stored neighbour (unit rows), [...]."""
        if self.neighbours is None:
            raise ValueError("oos_stats has no neighbours")
        f = features.astype(np.float32)
        f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)
        out: np.ndarray = (f @ self.neighbours.T).max(axis=-1)
        return out


def _max_prob(logits: np.ndarray, features: np.ndarray | None, stats: FeatureStats | None) -> np.ndarray:
    out: np.ndarray = softmax(logits).max(axis=-1)
    return out


def _energy(logits: np.ndarray, features: np.ndarray | None, stats: FeatureStats | None) -> np.ndarray:
    top = logits.max(axis=-1)
    out: np.ndarray = top + np.log(np.exp(logits - top[..., None]).sum(axis=-1))
    return out


def _mahalanobis(logits: np.ndarray, features: np.ndarray | None, stats: FeatureStats | None) -> np.ndarray:
    if features is None or stats is None:
        raise ValueError("the mahalanobis rule needs the model's features and the artifact's oos_stats")
    # Per feature dimension, so that the threshold reads the same whatever the width: about 1 in-scope.
    out: np.ndarray = -stats.sq_distances(features).min(axis=-1) / stats.dim
    return out


def _energy_knn(logits: np.ndarray, features: np.ndarray | None, stats: FeatureStats | None) -> np.ndarray:
    if features is None or stats is None or stats.neighbours is None or stats.combine is None:
        raise ValueError("the energy_knn rule needs the model's features and oos_stats with neighbours and combine")
    e_mean, e_std, s_mean, s_std, weight = (float(x) for x in stats.combine)
    energy = (_energy(logits, None, None) - e_mean) / e_std
    similarity = (stats.nearest_similarity(features) - s_mean) / s_std
    out: np.ndarray = energy + weight * similarity
    return out


# A rule's score: (logits [..., C], features [..., D] or None, stats or None) -> in-scope score [...].
Score = Callable[[np.ndarray, "np.ndarray | None", "FeatureStats | None"], np.ndarray]


@dataclass(frozen=True)
class OosRule:
    name: str
    fn: Score
    low: float  # the thresholds that make sense for this score: low <= t < high
    high: float
    grid_step: float  # the factory tunes the threshold on this grid
    doc: str
    needs_features: bool = False  # the pooled features and the artifact's FeatureStats
    feature_macs: Callable[[FeatureStats], int] | None = None  # its feature-space arithmetic per query

    def score(
        self, logits: np.ndarray, features: np.ndarray | None = None, stats: FeatureStats | None = None
    ) -> np.ndarray:
        return self.fn(logits, features, stats)

    def macs(self, stats: FeatureStats | None) -> int:
        """Multiply-adds of the rule's feature-space arithmetic for one query (0 for a logits rule)."""
        return self.feature_macs(stats) if self.feature_macs is not None and stats is not None else 0

    def check_threshold(self, threshold: float) -> None:
        if not math.isfinite(threshold):
            raise ValueError(f"oos_threshold must be finite, got {threshold}")
        if not self.low <= threshold < self.high:
            raise ValueError(f"oos_threshold must be in [{self.low}, {self.high}) for {self.name}, got {threshold}")


RULES: dict[str, OosRule] = {
    rule.name: rule
    for rule in (
        OosRule("max_prob", _max_prob, 0.0, 1.0, 0.01, "top softmax probability"),
        OosRule(
            "energy",
            _energy,
            -math.inf,
            math.inf,
            0.01,
            "log-sum-exp of the logits, the negative free energy of Liu et al. (2020), 'Energy-based "
            "Out-of-distribution Detection': it keeps the logits' scale, which the softmax normalises away",
        ),
        OosRule(
            "mahalanobis",
            _mahalanobis,
            -math.inf,
            0.0,
            0.01,
            "minus the squared Mahalanobis distance of the pooled features to the nearest in-scope class mean, "
            "with the covariance shared by the classes, per feature dimension (Lee et al. 2018, 'A Simple "
            "Unified Framework for Detecting Out-of-Distribution Samples'; Podolskiy et al. 2021 on CLINC150)",
            needs_features=True,
            feature_macs=lambda stats: stats.macs,
        ),
        OosRule(
            "energy_knn",
            _energy_knn,
            -math.inf,
            math.inf,
            0.01,
            "energy plus the cosine similarity of a general-purpose sentence embedding (the pretrained encoder's, "
            "not fine-tuned) to the nearest in-scope training query, each standardised on in-scope validation: "
            "fine-tuning pulls unseen queries onto some intent, while the pretrained space still sees them as "
            "far from every training query (kNN as in Sun et al. 2022, 'Out-of-Distribution Detection with Deep "
            "Nearest Neighbors')",
            needs_features=True,
            feature_macs=lambda stats: stats.knn_macs,
        ),
    )
}


def get_rule(name: str) -> OosRule:
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown OOS rule {name[:40]!r}; expected one of {', '.join(RULES)}") from None


@dataclass(frozen=True)
class Decision:
    """Per row: the answer's label index, its confidence, and the softmax probabilities."""

    pred: np.ndarray
    confidence: np.ndarray
    probs: np.ndarray


def decide(
    logits: np.ndarray,
    oos_index: int,
    rule: str,
    threshold: float,
    features: np.ndarray | None = None,
    stats: FeatureStats | None = None,
) -> Decision:
    """Argmax, unless the rule's score is under the threshold: then `oos`, with the model's doubt about its
    best in-scope guess, max(p(oos), 1 - p(top)), as the confidence."""
    probs = softmax(logits)
    pred = probs.argmax(axis=-1)
    top = np.take_along_axis(probs, pred[..., None], axis=-1)[..., 0]
    fired = get_rule(rule).score(logits, features, stats) < threshold
    pred = np.where(fired, oos_index, pred)
    confidence = np.where(fired, np.maximum(probs[..., oos_index], 1.0 - top), top)
    return Decision(pred=pred, confidence=confidence, probs=probs)
