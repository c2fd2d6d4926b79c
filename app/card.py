"""The model card: the contract between the factory that writes an artifact and the service that serves it.

`card.json` sits beside the model files and is validated here, once, by the service at start-up and by the
factory before it writes one: the rules that used to be scattered defaults are validators. Version 1 cards
(no `schema_version`) describe a single transformer; version 2 adds an optional cascade first stage and
per-CPU variants. card.json itself is not hashed, so the factory can add its benchmark row after the fact.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.oos import get_rule

CARD_SCHEMA_VERSION = 2
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"
CORE_FILES = (MODEL_FILE, TOKENIZER_FILE, LABELS_FILE)


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class CascadeStage(BaseModel):
    """A first stage that answers confident in-scope queries before the transformer (see app.cascade)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    model: str = Field(description="file name of the first stage's ONNX model, listed in `files`")
    kind: str = Field("embedding_bag", description="what the first stage is, for people")
    threshold: float = Field(ge=0.0, le=1.0, description="its top probability must reach this to answer")
    macs_per_token: float | None = None


class Variant(BaseModel):
    """Settings chosen at start-up from the CPU's flags: the first variant whose flags the CPU has wins."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[a-z0-9_\-]{1,40}$")
    requires_any: list[str] = Field(default_factory=list, description="CPU flags; empty matches every CPU")
    cascade_threshold: float | None = Field(None, ge=0.0, le=1.0)
    why: str = ""


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    schema_version: int = Field(1, ge=1, le=CARD_SCHEMA_VERSION)
    name: str = "clinc150-intent"
    version: str = Field(min_length=1, max_length=100)
    files: dict[str, FileEntry]
    inputs: list[str] = Field(default_factory=lambda: ["input_ids", "attention_mask"])
    output: str = "logits"
    # For feature-space OOS rules: the transformer's output of pooled features, and the npz file of the
    # classes' statistics (app.oos.FeatureStats), listed in `files` with its sha256 like every served file.
    features_output: str | None = None
    oos_stats: str | None = None
    max_length: int = Field(512, ge=2, description="token window; the tokenizer's own truncation wins")
    num_labels: int | None = Field(None, ge=2)
    oos_label: str = "oos"
    oos_rule: str = "max_prob"
    oos_threshold: float = 0.0
    # ORT graph rewrites the factory measured as slower for this model; the service leaves them out too.
    ort_disabled_optimizers: list[str] = Field(default_factory=list)
    quantization: str | None = None
    cascade: CascadeStage | None = None
    variants: list[Variant] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    benchmark: dict[str, Any] = Field(default_factory=dict)

    @field_validator("oos_rule")
    @classmethod
    def _known_rule(cls, rule: str) -> str:
        get_rule(rule)
        return rule

    @field_validator("ort_disabled_optimizers")
    @classmethod
    def _optimizer_names(cls, names: list[str]) -> list[str]:
        if not all(n.isidentifier() for n in names):
            raise ValueError("must be ONNX Runtime optimizer names")
        return names

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        rule = get_rule(self.oos_rule)
        rule.check_threshold(self.oos_threshold)
        if rule.needs_features and (self.features_output is None or self.oos_stats is None):
            raise ValueError(f"oos_rule {self.oos_rule} needs features_output and oos_stats")
        missing = [f for f in self.served_files if f not in self.files]
        if missing:
            raise ValueError(f"files lists no sha256 for {', '.join(missing)}")
        if self.cascade is not None and self.schema_version < 2:
            raise ValueError("a cascade needs schema_version 2")
        return self

    @property
    def served_files(self) -> tuple[str, ...]:
        """Every file the served path reads; each must be in `files`, with its sha256."""
        extra = (self.cascade.model,) if self.cascade is not None else ()
        stats = (self.oos_stats,) if self.oos_stats is not None else ()
        return (*CORE_FILES, *extra, *stats)

    def variant_for(self, cpu_flags: frozenset[str]) -> Variant | None:
        for variant in self.variants:
            if not variant.requires_any or cpu_flags & set(variant.requires_any):
                return variant
        return None
