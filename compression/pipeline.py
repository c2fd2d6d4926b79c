"""The factory as a declared pipeline: each stage is a name (also its output directory under --artifacts), the
stages whose outputs it reads, and a module that defines the stage's `Config` dataclass and
`run_stage(ctx, cfg)`. CLI flags are generated from `Common` and each stage's `Config`, so every default lives
in one dataclass field. Adding a stage is one module and one entry in `STAGES`.

The registry names modules instead of importing them, so `python -m compression --help` and
`python -m compression data` need no training libraries; a stage's module is imported when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from compression.data import DEFAULT_DATA, DEFAULT_WIKI, Clinc, load_clinc


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    module: str
    help: str


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("teacher", (), "compression.teacher", "fine-tune the pretrained encoder on CLINC150"),
        Stage("search", ("teacher",), "compression.search", "Optuna search of the distillation's alpha, T and lr"),
        Stage("distill", ("teacher", "search"), "compression.distill", "distil a shallower student"),
        Stage("prune", ("distill", "teacher"), "compression.prune", "prune FFN neurons, recover by distillation"),
        Stage("export", ("prune",), "compression.export", "ONNX export with ORT transformer fusions"),
        Stage("quantize", ("export",), "compression.quantize", "int8 quantisation, the best candidate kept"),
        Stage("static", ("quantize",), "compression.static", "the cascade's first stage, distilled"),
        Stage("artifact", ("quantize", "static"), "compression.artifact", "write the served artifact and card"),
        Stage("bench", ("artifact",), "compression.benchmark", "measure every stage, write reports/"),
    )
}


@dataclass
class Common:
    """Options every stage shares."""

    data: Path = field(default=DEFAULT_DATA, metadata={"help": "CLINC150 JSON file (original format)"})
    wiki: Path = field(default=DEFAULT_WIKI, metadata={"help": "Wikipedia sentences used as extra oos"})
    artifacts: Path = field(default=Path("artifacts"), metadata={"help": "where stages read and write"})
    model_dir: Path = field(default=Path("models/clinc150"), metadata={"help": "the served artifact"})
    reports: Path = field(default=Path("reports"), metadata={"help": "benchmark reports"})
    seed: int = field(default=42, metadata={"help": "seed of every random choice"})
    threads: int = field(default=2, metadata={"help": "torch threads for training"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    max_length: int = field(default=64, metadata={"help": "token window, also the served truncation"})
    wiki_oos: int = field(default=2000, metadata={"help": "Wikipedia sentences added as oos examples"})
    train_subset: int = field(default=0, metadata={"help": "use only N training rows (0: all)"})


class Context:
    """What a stage gets besides its own config: the common options, stage directories and the data."""

    def __init__(self, common: Common, args: argparse.Namespace | None = None) -> None:
        self.common = common
        self._args = args or argparse.Namespace()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.common, name)

    def dir(self, stage: str) -> Path:
        return Path(self.common.artifacts) / stage

    def config_of(self, stage: str) -> Any:
        """Another stage's config, from this run's flags where given (with `all`), else its defaults: for
        settings one stage shares with another, such as distillation's layers, used by the search."""
        config = load(STAGES[stage]).Config
        given = {f.name: getattr(self._args, f.name) for f in dataclasses.fields(config) if hasattr(self._args, f.name)}
        return config(**given)

    @functools.cached_property
    def clinc(self) -> Clinc:
        return load_clinc(self.common.data)


class StageModule(Protocol):
    Config: type[Any]

    def run_stage(self, ctx: Context, cfg: Any) -> None: ...


def load(stage: Stage) -> StageModule:
    module: Any = importlib.import_module(stage.module)
    return typing.cast(StageModule, module)


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
            group.add_argument(_flag(f), action=argparse.BooleanOptionalAction, default=default, help=text)
        elif kind is list or typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0] if typing.get_args(kind) else str
            group.add_argument(_flag(f), type=_list_of(item), default=default, help=f"{text} (comma-separated)")
        else:
            suffix = " (default: see the stage)" if optional and default is None else " (default: %(default)s)"
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


def run(names: list[str], args: argparse.Namespace, log: Any) -> None:
    import time

    ctx = Context(build(Common, args), args)
    ctx.clinc  # noqa: B018 - read and check the data before any stage starts: a bad file fails in one line
    for name in names:
        stage = STAGES[name]
        module = load(stage)
        started = time.perf_counter()
        log.info("stage %s: start (inputs: %s)", name, ", ".join(stage.inputs) or "none")
        module.run_stage(ctx, build(module.Config, args))
        log.info("stage %s: done in %.0f s", name, time.perf_counter() - started)
