"""The serving spec: everything that decides an answer, as one strict, typed model, and the card that carries it.

`card.json` beside the model files holds four blocks. `spec` decides every answer: the tokenizer and its
window, the labels, the stages in order with their files and thresholds, and the OOS rule (a tagged union with
named parameters per rule, `app.engine.rules`). `files` has the sha256 of every file the spec names.
`provenance` (data, commands, machines, versions) and `metrics` never change an answer. Unknown fields are
refused everywhere, so a card the engine does not fully understand is never served. card.json itself is not
hashed: the factory adds its benchmark figures after the fact.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.engine.rules import FILE_NAME, RuleSpec, rule_class

CARD_FILE = "card.json"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenizerSpec(Strict):
    file: str = Field("tokenizer.json", pattern=FILE_NAME)
    max_length: int = Field(ge=2, description="token window where the tokenizer file sets no truncation")


class LabelsSpec(Strict):
    file: str = Field("labels.json", pattern=FILE_NAME)
    count: int = Field(ge=2, description="how many labels the file holds, and how wide every stage's logits are")
    oos_label: str = Field("oos", min_length=1)


class StaticStage(Strict):
    """A cheap stage before the last: it answers a row when its top probability reaches `threshold` and its
    answer is an intent; every other row goes on. It never answers `oos`: an out-of-scope query sent down an
    intent's flow is the costly error, so those get the last stage's judgement."""

    kind: Literal["static"] = "static"
    name: str = Field("first", pattern=r"^[a-z][a-z0-9_]{0,30}$", description="what metrics and headers call it")
    file: str = Field(pattern=FILE_NAME)
    threshold: float = Field(ge=0.0, le=1.0)


class TransformerStage(Strict):
    """The last stage: its logits, and its features where the rule reads them, decide every row that reaches it."""

    kind: Literal["transformer"] = "transformer"
    name: str = Field("transformer", pattern=r"^[a-z][a-z0-9_]{0,30}$")
    file: str = Field(pattern=FILE_NAME)
    logits_output: str = "logits"
    features_output: str | None = None
    quantization: str | None = None
    # ORT graph rewrites the factory measured as slower for this model; the engine leaves them out too.
    ort_disabled_optimizers: list[str] = Field(default_factory=list)

    @field_validator("ort_disabled_optimizers")
    @classmethod
    def _optimizer_names(cls, names: list[str]) -> list[str]:
        if not all(n.isidentifier() for n in names):
            raise ValueError("must be ONNX Runtime optimizer names")
        return names


Stage = Annotated[StaticStage | TransformerStage, Field(discriminator="kind")]


class ServingSpec(Strict):
    tokenizer: TokenizerSpec
    labels: LabelsSpec
    stages: list[Stage] = Field(min_length=1, max_length=4)
    rule: RuleSpec

    @model_validator(mode="after")
    def _consistent(self) -> ServingSpec:
        *early, last = self.stages
        if not isinstance(last, TransformerStage) or any(not isinstance(s, StaticStage) for s in early):
            raise ValueError("stages must be static stages followed by one transformer stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must differ, got {names}")
        if rule_class(self.rule.kind).needs_features and last.features_output is None:
            raise ValueError(f"the {self.rule.kind} rule needs the transformer's features_output")
        return self

    @property
    def transformer(self) -> TransformerStage:
        last = self.stages[-1]
        assert isinstance(last, TransformerStage)
        return last

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the engine reads, in the order it reads them."""
        return (self.tokenizer.file, self.labels.file, *(s.file for s in self.stages), *self.rule.files())


class FileEntry(Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Provenance(Strict):
    """What produced the artifact. Nothing here changes an answer."""

    created: str
    git_commit: str | None = None
    command: str | None = None
    seed: int | None = None
    data: dict[str, Any] = Field(default_factory=dict, description="what each stage trained on")
    stages: dict[str, Any] = Field(default_factory=dict, description="each factory stage's resolved config")
    ran_on: dict[str, Any] = Field(default_factory=dict, description="where each stage ran")
    versions: dict[str, str] = Field(default_factory=dict)
    licenses: dict[str, Any] = Field(default_factory=dict)
    history: list[dict[str, Any]] = Field(default_factory=list, description="later changes to the card")


class Card(Strict):
    format: Literal[3] = 3
    name: str = Field(min_length=1, max_length=100)
    # It goes into every answer (model_version), a metrics label and log lines: no spaces, newlines or control
    # characters. The factory writes 2026.12.05-8e82d3c5.
    version: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    spec: ServingSpec
    files: dict[str, FileEntry]
    provenance: Provenance
    metrics: dict[str, Any] = Field(default_factory=dict)
    benchmark: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _every_file_hashed(self) -> Card:
        missing = [f for f in self.spec.files if f not in self.files]
        if missing:
            raise ValueError(f"files lists no sha256 for {', '.join(missing)}")
        return self
