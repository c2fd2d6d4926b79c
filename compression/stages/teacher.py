"""Stage 1: fine-tune a pretrained encoder on CLINC150 (151 classes) as the teacher."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compression import checkpoint, ensemble
from compression.data import Dataset
from compression.errors import FactoryError
from compression.measure.evaluate import evaluate, training_data, training_split, validation_report
from compression.records import write_run

if TYPE_CHECKING:
    from compression.pipeline import Context
    from compression.training import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Config:
    pretrained: str | None = field(
        default=None, metadata={"help": "local path or hub id (default: the all-MiniLM-L6-v2 package)"}
    )
    teacher_epochs: float = field(default=7, metadata={"help": "fine-tuning epochs"})
    teacher_lr: float = field(default=1e-4, metadata={"help": "fine-tuning learning rate"})
    label_smoothing: float = field(default=0.1, metadata={"help": "label smoothing of the cross-entropy"})
    teachers: int = field(
        default=1,
        metadata={
            "help": "teachers fine-tuned, with seeds --seed, --seed + 1, ...: the first is the teacher every stage "
            "reads; the prune stage's recovery distils from the mean of all their logits (compression.ensemble)"
        },
    )

    def __post_init__(self) -> None:
        if self.teachers < 1:
            raise FactoryError(f"--teachers must be at least 1, got {self.teachers}")


@dataclass
class TeacherConfig:
    """The resolved settings run() takes: Config's, plus the pipeline's data options."""

    pretrained: str | None
    wiki_path: str
    wiki_oos: int
    train_subset: int  # 0 means the whole training split


def run(data: Dataset, out: Path, cfg: TeacherConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    from compression.training import Encoded, Trainer, seed_everything

    seed_everything(train_cfg.seed)
    model, tokenizer = checkpoint.load_pretrained(cfg.pretrained, data.labels)
    split = training_split(data, cfg.wiki_path, cfg.wiki_oos, train_cfg.seed, cfg.train_subset)
    log.info("teacher: %d training examples, %d labels", len(split), len(data.labels))
    encoded = Encoded(tokenizer, split, data.labels, train_cfg.max_length)
    history = Trainer(model, train_cfg).train(encoded)
    logits, gold = evaluate(model, tokenizer, data, train_cfg.max_length)
    report = validation_report(logits, gold, data.labels)
    checkpoint.save(out, model, tokenizer, data.labels)
    config = {"teacher": asdict(cfg), "train": train_cfg.as_dict()}
    write_run(out, "teacher", config, report, history=history, training_data=training_data(split, data))
    log.info("teacher validation: %s", report)
    return report


def run_stage(ctx: Context, cfg: Config) -> None:
    import shutil

    from compression.training import train_config

    teacher = TeacherConfig(cfg.pretrained, str(ctx.wiki), ctx.wiki_oos, ctx.train_subset)
    train = train_config(ctx, cfg.teacher_epochs, cfg.teacher_lr, cfg.label_smoothing)
    out = ctx.dir("teacher")
    # An earlier run's members would otherwise join this run's mean.
    shutil.rmtree(out / ensemble.MEMBERS, ignore_errors=True)
    run(ctx.dataset, out, teacher, train)
    for offset in range(1, cfg.teachers):
        # Exactly the teacher stage at that seed: its own Wikipedia sample and initialisation.
        seed = train.seed + offset
        run(ctx.dataset, ensemble.member_dir(out, seed), teacher, replace(train, seed=seed))
