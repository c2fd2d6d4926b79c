"""The factory as a declared pipeline: each stage is a name (also its output directory under --artifacts), the
stages whose outputs it reads, and a module that defines the stage's `Config` dataclass and
`run_stage(ctx, cfg)`. CLI flags are generated from `Common` and each stage's `Config`, so every default lives
in one dataclass field. Adding a stage is one module and one entry in `STAGES`.

The stage protocol: a stage module defines `Config`, a dataclass whose fields all have defaults and
`metadata={"help": ...}` (field `ffn_keep` is flag `--ffn-keep`; a bool is `--x/--no-x`, a list
comma-separated), and `run_stage(ctx: Context, cfg: Config) -> None`, which reads its inputs from
`ctx.dir(<input stage>)` and writes `ctx.dir(<its name>)`. It imports torch, transformers and onnx inside
functions only, so that reading its Config needs none of them: `--help` of every stage, and
`python -m compression data`, run in the serving environment. The registry names modules instead of importing
them; the CLI imports only the chosen stages' modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import logging
import time
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from app.engine.artifact import sha256_file
from compression import progress
from compression.data import CLINC_SHA256S, DEFAULT_DATA, DEFAULT_WIKI, Dataset, check_wiki, load_clinc
from compression.data import SOURCE as CLINC_SOURCE
from compression.errors import FactoryError
from compression.labelled import Columns, load_labelled

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    module: str
    help: str


# In order: `python -m compression all` runs them so. `inputs` are the stages whose output directories a stage
# reads (artifact and bench also read the earlier stages' run records, for the card and the stage table).
# The stages that read neither the validation split nor the Wikipedia sentences (every other one trains, tunes or
# reports on them).
READ_NO_DATA = frozenset({"embedder", "export", "bench"})

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("teacher", (), "compression.stages.teacher", "fine-tune the pretrained encoder on CLINC150"),
        Stage(
            "search", ("teacher",), "compression.stages.search", "Optuna search of the distillation's alpha, T and lr"
        ),
        Stage("distill", ("teacher", "search"), "compression.stages.distill", "distil a shallower student"),
        Stage(
            "prune", ("distill", "teacher"), "compression.stages.prune", "prune FFN neurons, recover by distillation"
        ),
        Stage("export", ("prune", "teacher"), "compression.stages.export", "ONNX export with ORT transformer fusions"),
        Stage("quantize", ("export",), "compression.stages.quantize", "int8 quantisation, the best candidate kept"),
        Stage("embedder", (), "compression.stages.embedder", "the pretrained sentence encoder, for the OOS rule"),
        Stage(
            "head", ("embedder",), "compression.stages.head", "the quick recipe's classifier: a head on the embedder"
        ),
        Stage(
            "oos",
            ("quantize", "head", "embedder"),
            "compression.stages.oos",
            "the OOS rule on the classifier (--oos-classifier: quantize or head), chosen on held-out pools",
        ),
        Stage("static", ("oos",), "compression.stages.static", "the cascade's first stage, distilled"),
        Stage(
            "artifact",
            ("oos", "quantize", "head", "static", "teacher", "distill", "prune", "export", "embedder"),
            "compression.stages.artifact",
            "write the served artifact and its card",
        ),
        Stage(
            "bench",
            ("artifact", "teacher", "distill", "prune", "export", "quantize"),
            "compression.measure.benchmark",
            "measure every stage, write reports/",
        ),
    )
}


@dataclass(frozen=True)
class Recipe:
    """A named way to build a served model: its stages in order, and the flag values it sets (the command line's
    own flags override them)."""

    stages: tuple[str, ...]
    defaults: dict[str, Any]
    help: str


# Every stage but the quick recipe's head: the book's pipeline (chapter 8), each stage measured by bench.
_CHAPTER8 = tuple(name for name in STAGES if name != "head")
# The recipes whose student carries the OOS rule's sentence geometry itself (docs/one-small-model.md): a geometry
# head trained on a large transfer set, the rule on the student's own features against 4 prototypes per intent,
# and CLINC150's in-scope accuracy target, which their documented figures hold. One dict, so the two cannot drift.
_OWN_GEOMETRY: dict[str, Any] = {
    "geometry_weight": 3.0,
    "transfer_wiki": 20000,
    "oos_features": "student",
    "oos_prototypes": 4,
    "oos_rule": "energy_knn",
    "oos_in_scope_target": 0.952,
}


def _own_geometry(skipped: str) -> tuple[str, ...]:
    """The book's stages without `skipped`, and without the embedder: its pretrained sentence encoder is what the
    student's geometry head replaces, and nothing downstream reads it (it would export an unused graph)."""
    return tuple(name for name in _CHAPTER8 if name not in (skipped, "embedder"))


# The pruned recipe's settings (its comment in RECIPES says what they come from); the served recipe adds to them.
_PRUNED: dict[str, Any] = {
    "student_layers": [],  # every layer of the teacher
    "student_epochs": 0,
    "alpha": 0.3996,
    "temperature": 7.655,
    "ffn_keep": 0.25,
    "recover_epochs": 6,
    "recover_copies": 2,
    "recover_lr": 2.7e-4,
    "export_from": "prune",
    **_OWN_GEOMETRY,
}


RECIPES: dict[str, Recipe] = {
    # What models/clinc150 serves (issue 23, docs/one-small-model.md, a fourteenth session): the pruned recipe with
    # the settings registered before its three builds (2 of which had to pass; seed 42's did): 8 of 12 attention
    # heads kept, the recovery distilled from the mean logits of 3 teachers (seeds --seed .. --seed + 2) with
    # geometry weight 6, and the best of 4 first-stage seeds at a threshold of 0.75 (under 10 M multiply-adds).
    "served": Recipe(
        _own_geometry("search"),
        {
            **_PRUNED,
            "teachers": 3,
            "heads_keep": 0.667,
            "recover_geometry_weight": 6.0,
            "static_candidates": 4,
            "static_threshold": 0.75,
        },
        "the full recipe, what models/clinc150 serves: the pruned recipe's student with 8 of 12 heads, recovered "
        "from 3 teachers, its cascade under 10 M multiply-adds (docs/one-small-model.md)",
    ),
    # What models/clinc150 served until 2026.12.04: the teacher exported (--export-from teacher), its OOS rule on
    # the pretrained sentence encoder, run for the rows the rule is unsure of (51 M multiply-adds per query).
    "two-encoder": Recipe(
        ("teacher", "export", "quantize", "embedder", "oos", "static", "artifact", "bench"),
        {},
        "the earlier served model: the fine-tuned teacher, int8, its OOS rule on the pretrained encoder, the cascade",
    ),
    "chapter8": Recipe(
        _CHAPTER8,
        {},
        "the two-encoder recipe plus the book's search, distillation and pruning, each stage measured (its students "
        "are measured, not served)",
    ),
    # The one small student that carries the OOS rule's sentence geometry itself (docs/one-small-model.md); its
    # documented figures hold CLINC150's in-scope accuracy target, 0.952. It seeds from the teacher's layers 1, 3
    # and 5 (its last layer is the one the teacher's classifier was trained on) and is served unpruned: there,
    # (e′) read best of the students at every cost, and the pruned student read lower than the unpruned one at
    # equal multiply-adds (0.829 of the 350 at 9.8 M against 0.843 at 9.3 M), so pruning is not in its path.
    "student": Recipe(
        _own_geometry("prune"),
        {"student_layers": [1, 3, 5], "export_from": "distill", **_OWN_GEOMETRY},
        "the full recipe's student with its own sentence geometry (docs/one-small-model.md)",
    ),
    # Issue 23's student at the 3-layer student's cost that keeps the teacher's depth: all its layers and its
    # attention, the FFNs pruned to a quarter (1536 -> 384 neurons; 0.88 M multiply-adds per token and layer
    # against the 3-layer student's 1.77 M), a geometry head added, then recovered by distillation from the
    # teacher on the student recipe's transfer set with its settings (6 epochs, 2 copies, 20,000 Wikipedia
    # sentences, geometry weight 3, an earlier search's best alpha, temperature and learning rate, so the search
    # does not run). The distill stage only seeds it (0 epochs). Its transformer alone caught 0.909, 0.883 and
    # 0.871 of the 350 in three builds, against 0.866 for the 3-layer (e'); its first stage varied as theirs do,
    # and it is not served (docs/one-small-model.md, a ninth session). The first-stage pick (--static-candidates 4
    # --static-threshold 0.6) is not set here: at 10 M it read 0.877, 0.849 and 0.863 of the 350 (a tenth session).
    # Nor is --heads-keep: with 8 of 12 heads the transformer loses more geometry than the cheaper cascade gains
    # (0.874, 0.789 and 0.843 of the 350 at 10 M in three builds; 6 heads 0.860; an eleventh session). With
    # --recover-geometry-weight 6 as well, 8 heads read 0.889 (tw 0.9444, 9.2 M), 0.820 and 0.837 in three builds.
    # Recovered from the mean of three teachers' logits, with --static-candidates 4 --static-threshold 0.7, the
    # weakest seed read 0.889 (tw 0.9444, 9.8 M) in one build: the lead (docs/one-small-model.md, a twelfth session).
    # Those settings, registered and built three times, are the served recipe's (a thirteenth and fourteenth session).
    "pruned": Recipe(
        _own_geometry("search"),
        _PRUNED,
        "the teacher's 6 layers with FFNs pruned to a quarter, recovered by distillation, with its own sentence "
        "geometry (docs/one-small-model.md)",
    ),
    # Minutes on 2 cores: the frozen pretrained encoder with a linear head, its OOS rule in the encoder's own space
    # against 4 prototypes per intent. No static first stage: labelling its transfer set (111,000 queries for
    # CLINC150) with the 6-layer encoder alone takes longer than the rest of the recipe.
    "quick": Recipe(
        ("embedder", "head", "oos", "artifact"),
        {"oos_classifier": "head", "oos_features": "student", "oos_prototypes": 4},
        "the quick recipe: a linear head on the frozen pretrained encoder, for iteration",
    ),
}
# `all`: every stage in order, as before recipes had names.
RECIPE_ALIASES = {"all": "chapter8"}


# The shortest token window: [CLS] and [SEP] alone fill 2 (a window of 0 or 1 failed only at the artifact stage).
MIN_MAX_LENGTH = 2


@dataclass
class Common:
    """Options every stage shares."""

    data: Path = field(
        default=DEFAULT_DATA,
        metadata={"help": "training examples: CLINC150's JSON (original format), or CSV or JSONL of text and intent"},
    )
    val_data: Path | None = field(
        default=None,
        metadata={"help": "validation examples (CSV or JSONL data); without, --val-share of each intent is held out"},
    )
    oos_data: Path | None = field(
        default=None,
        metadata={"help": "out-of-scope examples (CSV or JSONL, text only): evaluated on, never trained on"},
    )
    text_column: str = field(default=Columns.text, metadata={"help": "CSV column or JSONL key of the text"})
    intent_column: str = field(default=Columns.intent, metadata={"help": "CSV column or JSONL key of the intent"})
    val_share: float = field(
        default=0.1, metadata={"help": "share of each intent held out when there is no --val-data"}
    )
    wiki: Path = field(default=DEFAULT_WIKI, metadata={"help": "Wikipedia sentences used as extra oos"})
    artifacts: Path = field(default=Path("artifacts"), metadata={"help": "where stages read and write"})
    model_dir: Path = field(default=Path("models/clinc150"), metadata={"help": "the served artifact"})
    reports: Path = field(default=Path("reports"), metadata={"help": "benchmark reports"})
    seed: int = field(default=42, metadata={"help": "seed of every random choice"})
    threads: int = field(default=2, metadata={"help": "torch threads for training"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    max_length: int = field(default=64, metadata={"help": "token window, also the served truncation"})
    wiki_oos: int = field(default=2000, metadata={"help": "Wikipedia sentences added as oos examples"})
    train_oos: bool = field(
        default=False,
        metadata={
            "help": "train on CLINC's 250 oos_train queries; without, as served, they stay out of every stage "
            "for the 350-query OOS pool (compression.measure.pools)"
        },
    )
    train_subset: int = field(default=0, metadata={"help": "use only N training rows (0: all)"})

    def __post_init__(self) -> None:
        # Out of range, each had failed deep in a stage with a traceback, some after an hour's teacher. The
        # seed's bound is numpy's (2**32 - 1), less room for the seeds counted up from it (--teachers, say).
        bounds = {"seed": (0, 2**31 - 1), "threads": (1, None), "batch_size": (1, None), "wiki_oos": (0, None)}
        bounds |= {"max_length": (MIN_MAX_LENGTH, None), "train_subset": (0, None)}
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                flag = "--" + name.replace("_", "-")
                within = f"at least {low}" if high is None else f"from {low} to {high}"
                raise FactoryError(f"{flag} must be {within}, got {value}")


class Context(Common):
    """What every stage gets besides its own config: the common options (typed attributes), the stage
    directories and the data, read once."""

    def __init__(self, common: Common, flags: argparse.Namespace | None = None) -> None:
        super().__init__(**{f.name: getattr(common, f.name) for f in dataclasses.fields(Common)})
        self._flags = flags if flags is not None else argparse.Namespace()

    def dir(self, stage: str) -> Path:
        """A stage's output directory: artifacts/<stage>."""
        return Path(self.artifacts) / stage

    def config_of(self, config: type[C]) -> C:
        """Another stage's config from this run's flags where they were given (with `all`), else its defaults:
        for settings a stage shares with one that runs later, such as the distillation's, which the search
        tunes for. Values a stage reads from an earlier stage come from that stage's output directory."""
        given = {
            f.name: getattr(self._flags, f.name) for f in dataclasses.fields(config) if hasattr(self._flags, f.name)
        }
        return config(**given)

    @functools.cached_property
    def dataset(self) -> Dataset:
        """CLINC150's JSON by its suffix, else a team's CSV or JSONL files (compression.labelled)."""
        if Path(self.data).suffix == ".json":
            given = [flag for flag, value in (("--val-data", self.val_data), ("--oos-data", self.oos_data)) if value]
            if given:
                raise FactoryError(f"{' and '.join(given)}: only with CSV or JSONL data; {self.data} has its own")
            return load_clinc(self.data, train_oos=self.train_oos)
        columns = Columns(self.text_column, self.intent_column)
        return load_labelled(self.data, self.val_data, self.oos_data, columns, self.val_share, self.seed)

    @property
    def data_source(self) -> dict[str, Any]:
        """What the card's provenance says of the data: CLINC150's source and licence, or a team's files (name and
        sha256 of each; their licence is the team's to state)."""
        if Path(self.data).suffix == ".json":
            # The file by sha256 and --train-oos, which moves its oos_train into training: a resume (`--from`) on an
            # edited file, or the other setting, had been accepted. CLINC150's licence only for CLINC150's file.
            digest = sha256_file(self.data)
            read = {"file": Path(self.data).name, "sha256": digest, "train_oos": self.train_oos}
            if digest in CLINC_SHA256S:
                return {**CLINC_SOURCE, **read}
            return {"name": "the team's own labelled examples, in CLINC150's JSON format", **read}
        given = {"train": self.data, "validation": self.val_data, "out_of_scope": self.oos_data}
        return {
            "name": "the team's own labelled examples",
            "files": {role: {"name": Path(f).name, "sha256": sha256_file(f)} for role, f in given.items() if f},
            "validation": "given" if self.val_data else f"{self.val_share:g} of each intent, seed {self.seed}",
            "columns": {"text": self.text_column, "intent": self.intent_column},  # which labels a resume reads
        }


class StageModule(Protocol):
    Config: type[Any]

    def run_stage(self, ctx: Context, cfg: Any) -> None: ...


def load(stage: Stage) -> StageModule:
    """A stage's module. Stage modules import the training libraries inside their functions only, so loading
    one to read its Config works in the serving environment too."""
    try:
        module: Any = importlib.import_module(stage.module)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (stage.module == exc.name or stage.module.startswith(exc.name + ".")):
            raise  # a library the module needs: not for this message
        raise FactoryError(f"stage {stage.name}: its module {stage.module} is not there") from None
    for name in ("Config", "run_stage"):
        if not hasattr(module, name):
            raise FactoryError(f"stage {stage.name}: {stage.module} defines no {name}")
    return typing.cast(StageModule, module)


def flag_names(configs: list[type[Any]]) -> list[str]:
    """The flags these dataclasses generate, in order; one name must not appear twice (with `all`, every
    stage's Config is built from one set of flags)."""
    return [_flag(f) for config in configs for f in dataclasses.fields(config)]


# ---------------------------------------------------------------- flags from dataclasses


def _flag(f: dataclasses.Field[Any]) -> str:
    return "--" + f.name.replace("_", "-")


def _scalar(annotation: Any) -> tuple[type, bool]:
    """The argparse type of a field's annotation, and whether None is allowed."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def add_flags(parser: argparse.ArgumentParser | Any, config: type[Any], title: str) -> None:
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        kind, optional = _scalar(hints[f.name])
        factory: Any = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory()
        text = f.metadata.get("help", "")
        if kind is bool:
            shown = _flag(f) if default else "--no-" + _flag(f)[2:]
            group.add_argument(
                _flag(f), action=argparse.BooleanOptionalAction, default=default, help=f"{text} (default: {shown})"
            )
        elif kind is list or typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0] if typing.get_args(kind) else str
            shown = ",".join(str(x) for x in default)
            group.add_argument(
                _flag(f), type=_list_of(item), default=default, help=f"{text} (comma-separated; default: {shown})"
            )
        else:
            # An optional field's None means "decided by the stage"; its help says how.
            suffix = "" if optional and default is None else " (default: %(default)s)"
            group.add_argument(_flag(f), type=kind, default=default, help=text + suffix)


def _list_of(item: type) -> Any:
    def parse(spec: str) -> list[Any]:
        try:
            return [item(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {item.__name__}s, got {spec!r}") from None

    return parse


def build(config: type[Any], args: argparse.Namespace) -> Any:
    return config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config)})


def resume(names: list[str], start: str, artifacts: Path) -> list[str]:
    """The stages from `start` on, once the earlier ones have each left a run record under `artifacts` (a recipe
    resumed after a failure, or on another machine's teacher, reads them as if it had just written them)."""
    if start not in names:
        raise FactoryError(f"--from {start}: not a stage of this recipe ({', '.join(names)})")
    earlier = names[: names.index(start)]
    missing = [name for name in earlier if not (artifacts / name / "run.json").is_file()]
    if missing:
        raise FactoryError(
            f"--from {start}: {', '.join(missing)} left no run.json under {artifacts}; run from {missing[0]}"
        )
    return names[names.index(start) :]


def run(names: list[str], args: argparse.Namespace, log: logging.Logger, resumed: Sequence[str] = ()) -> None:
    """Run the named stages in the order given, each with its Config built from the parsed flags; `resumed`: the
    recipe's stages before them (`--from`), whose outputs they read."""
    ctx = Context(build(Common, args), args)
    ctx.dataset  # noqa: B018 - read and check the data before any stage starts: a bad file fails in one line
    if not set(names) <= READ_NO_DATA:  # what they read, checked now, not after an hour's teacher, say
        ctx.dataset.split("val")  # a CLINC150-format file without one
        check_wiki(ctx.wiki)
    # Every stage's settings are checked before the first stage runs, so a bad flag of a late stage fails in one
    # line at once, not after the teacher has trained for an hour.
    modules = [load(STAGES[name]) for name in names]
    configs = [build(module.Config, args) for module in modules]
    for module, config in zip(modules, configs, strict=True):
        check = getattr(module, "check", None)  # a stage's own checks of its destination, where it has some
        if check is not None:
            check(ctx, config)
    if "artifact" in names:
        _check_model_dir(ctx)
    _check_encoders(ctx, [*resumed, *names])
    source = ctx.data_source
    _check_resumed_data(resumed, ctx, source)
    if "artifact" in [*resumed, *names]:
        _claim_artifacts(ctx)
    for number, (name, module, config) in enumerate(zip(names, modules, configs, strict=True), 1):
        started = time.perf_counter()
        with progress.stage(name, number, len(names)):
            log.info("stage %s: start (inputs: %s)", name, ", ".join(STAGES[name].inputs) or "none")
            module.run_stage(ctx, config)
            if ctx.dir(name).is_dir():
                (ctx.dir(name) / DATA_RECORD).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
            log.info("stage %s: done in %.0f s", name, time.perf_counter() - started)


def _check_model_dir(ctx: Context) -> None:
    """A team's data (anything but CLINC150's JSON, as the Makefile has it) built into --model-dir's default had
    replaced the served CLINC150 model."""
    if Path(ctx.data).suffix != ".json" and Path(ctx.model_dir).resolve() == Path(Common.model_dir).resolve():
        raise FactoryError(
            f"--data {ctx.data} needs a --model-dir of its own (models/my-intents, say): {Common.model_dir} is the "
            "served CLINC150 model, which the build would replace"
        )


def _check_encoders(ctx: Context, stages: Sequence[str]) -> None:
    """The pretrained encoders resolve (a bad --embedder-pretrained was found at the embedder stage, after the
    teacher had trained), and --max-length fits their positions: past them, the served tokenizer gave the encoder
    positions it has not got, and the service answered 500 to a long text."""
    from compression.checkpoint import default_pretrained, positions
    from compression.stages.embedder import Config as EmbedderConfig
    from compression.stages.teacher import Config as TeacherConfig

    pretrained = ctx.config_of(TeacherConfig).pretrained
    encoders: dict[str, str | None] = {}
    if "teacher" in stages or "embedder" not in stages:  # the quick recipe's encoder is the embedder's alone
        encoders["--pretrained"] = pretrained
    if "embedder" in stages:  # its default is the teacher's
        encoders["--embedder-pretrained"] = ctx.config_of(EmbedderConfig).embedder_pretrained or pretrained
    count = min(positions(source or default_pretrained(), flag) for flag, source in encoders.items())
    if ctx.max_length > count:
        raise FactoryError(
            f"--max-length must be from {MIN_MAX_LENGTH} to {count} (the pretrained encoder's positions), got "
            f"{ctx.max_length}"
        )


# Beside each stage's output: the data it was built from (Context.data_source: a team's files by sha256).
DATA_RECORD = "data.json"


def _check_resumed_data(resumed: Sequence[str], ctx: Context, source: dict[str, Any]) -> None:
    """A recipe resumed (`--from`) reads its earlier stages' outputs: each was built from this run's data. On
    another file, the stages had made a model of the old file's intents under a card naming the new one. An
    output from before these records has none, and is read as it is."""
    for earlier in resumed:
        record = ctx.dir(earlier) / DATA_RECORD
        if not record.is_file():
            continue
        recorded = json.loads(record.read_text())
        # A key an earlier version did not record (the columns, say) is read as this run's.
        if {**source, **recorded} != source:
            raise FactoryError(
                f"--from: {ctx.dir(earlier)} was built from other data than {ctx.data}; run from the first stage, or "
                "give this data --artifacts of its own"
            )


# In --artifacts: the model directory whose build its stage outputs are (`make model` names the directory after
# OUT's last part, so OUT=a/x and OUT=b/x would otherwise share artifacts/x, each building on the other's stages).
MODEL_RECORD = "model_dir.txt"


def _claim_artifacts(ctx: Context) -> None:
    """--artifacts belongs to the first model built from it: refused for another, else recorded."""
    record, model_dir = Path(ctx.artifacts) / MODEL_RECORD, Path(ctx.model_dir).resolve()
    if record.is_file() and (owner := record.read_text().strip()) != str(model_dir):
        raise FactoryError(
            f"{ctx.artifacts} holds the stages built for {owner}, not {model_dir}: remove {ctx.artifacts}, or give "
            "OUT another last name (or --artifacts another directory)"
        )
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(f"{model_dir}\n")
    except OSError as exc:
        raise FactoryError(f"{ctx.artifacts} cannot be written: {exc.strerror or exc} (--artifacts)") from None
