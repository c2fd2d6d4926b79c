"""`python -m compression STAGE ...`: one stage of the pipeline (compression.pipeline.STAGES) from the
previous stages' outputs under --artifacts, or a recipe's stages in order (compression.pipeline.RECIPES: `served`,
`chapter8`, also called `all`, `student` or `quick`); `data` downloads the dataset.

Flags come from the pipeline's `Common` options and from the chosen stages' `Config` dataclasses (only the
chosen stages' modules are imported, and those import the training libraries only when they run), so
`--help`, any stage's `--help` and `data` run without torch.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from compression import data as data_mod
from compression import pipeline, progress
from compression.errors import FactoryError

log = logging.getLogger("compression")


def _chosen(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    argv = sys.argv[1:] if argv is None else argv
    chosen = _chosen(argv)
    parser = argparse.ArgumentParser(prog="python -m compression", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="stage", required=True)
    p = sub.add_parser("data", help="download CLINC150 and the Wikipedia out-of-scope sentences (needs the internet)")
    p.add_argument("--dest", type=Path, default=data_mod.DOWNLOAD_DIR, help="directory to write both files into")
    for name, stage in pipeline.STAGES.items():
        p = sub.add_parser(name, help=stage.help)
        if name == chosen:  # only the chosen stages' modules are imported
            _add_stage_flags(p, (name,))
    for name in [*pipeline.RECIPES, *pipeline.RECIPE_ALIASES]:
        recipe = _recipe(name)
        p = sub.add_parser(name, help=f"recipe: {recipe.help}" if name in pipeline.RECIPES else f"the same as {name}")
        if name == chosen:
            p.add_argument(
                "--from",
                dest="from_stage",
                metavar="STAGE",
                help="start at this stage of the recipe, reading the earlier stages' outputs from --artifacts",
            )
            _add_stage_flags(p, recipe.stages)
            p.set_defaults(**recipe.defaults)
    return parser


def _recipe(name: str) -> pipeline.Recipe:
    return pipeline.RECIPES[pipeline.RECIPE_ALIASES.get(name, name)]


def _add_stage_flags(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    pipeline.add_flags(parser, pipeline.Common, "common")
    for name in names:
        s = pipeline.STAGES[name]
        pipeline.add_flags(parser, pipeline.load(s).Config, f"{s.name} (inputs: {', '.join(s.inputs) or 'none'})")


def run_stage(a: argparse.Namespace) -> None:
    if a.stage == "data":
        for path in data_mod.download_all(a.dest):
            print(f"downloaded and verified {path}")
        data_file, wiki_file = a.dest / data_mod.DATA_FILE, a.dest / data_mod.WIKI_FILE
        print(f"use them with: make model DATA={data_file} MODEL_ARGS='--wiki {wiki_file}'")
        return
    names = [a.stage] if a.stage in pipeline.STAGES else list(_recipe(a.stage).stages)
    earlier: list[str] = []
    if getattr(a, "from_stage", None):
        remaining = pipeline.resume(names, a.from_stage, Path(a.artifacts))
        earlier, names = names[: len(names) - len(remaining)], remaining
    pipeline.run(names, a, log, resumed=earlier)


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (what `timeout`, CI runners and `docker stop` send) raises SystemExit(143) for the block, so that a
    build stopped part-way cleans up as a failed one does: by default the process died where it stood, and left
    its half-built model directory beside OUT for good."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser(argv).parse_args(argv)
        handler = logging.StreamHandler()
        handler.addFilter(progress.StageFilter())
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO, format=progress.FORMAT, handlers=[handler]
        )
        with sigterm_as_exit():
            run_stage(args)
    except FactoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
