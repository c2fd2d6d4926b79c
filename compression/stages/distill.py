"""Stage 2: knowledge distillation into a shallower student initialised from the teacher's layers."""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compression import checkpoint
from compression.augment import augment
from compression.data import Clinc
from compression.errors import FactoryError
from compression.measure.evaluate import evaluate, training_data, training_split, validation_report
from compression.records import read_best_params, read_run, write_run

if TYPE_CHECKING:
    import torch

    from compression.pipeline import Context
    from compression.training import TrainConfig

log = logging.getLogger(__name__)
# Used where neither a flag nor the search's best sets them (the search also starts from these).
FALLBACK_ALPHA, FALLBACK_TEMPERATURE, FALLBACK_LR = 0.5, 4.0, 2e-4


@dataclass
class Config:
    student_layers: list[int] = field(
        default_factory=lambda: [0, 2, 4], metadata={"help": "teacher layers that seed the student"}
    )
    student_epochs: float = field(default=6, metadata={"help": "distillation epochs"})
    student_lr: float | None = field(
        default=None, metadata={"help": f"learning rate (default: the search's best, else {FALLBACK_LR:g})"}
    )
    alpha: float | None = field(
        default=None,
        metadata={"help": f"weight of the hard-label CE (default: the search's best, else {FALLBACK_ALPHA:g})"},
    )
    temperature: float | None = field(
        default=None,
        metadata={"help": f"softmax temperature (default: the search's best, else {FALLBACK_TEMPERATURE:g})"},
    )
    hidden_weight: float = field(default=0.0, metadata={"help": "hidden-state transfer loss weight"})
    augment_copies: int = field(default=2, metadata={"help": "perturbed copies per query, teacher-labelled"})
    # The teacher's tuned word embeddings are two thirds of a 3-layer student's weights; freezing them cuts
    # the optimiser's work per step by about a third here and keeps rare words where the teacher put them.
    train_embeddings: bool = field(default=False, metadata={"help": "also train the student's word embeddings"})


@dataclass
class DistillConfig:
    """The resolved settings `run` and `train_student` take: Config's, with the search's best filled in, plus
    the pipeline's common data options (see `resolve`)."""

    alpha: float  # weight of the hard-label cross-entropy; 1 - alpha goes to the soft targets
    temperature: float
    hidden_weight: float  # weight of the hidden-state MSE between mapped layers
    layers: list[int]  # teacher layers that seed the student
    wiki_path: str
    wiki_oos: int
    train_subset: int  # 0: the whole training split
    augment_copies: int  # perturbed copies of each training query, labelled by the teacher only
    freeze_embeddings: bool


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """The chapter's loss: alpha * CE(student, y) + (1 - alpha) * T^2 * KL(teacher_T || student_T)."""
    import torch.nn.functional as F

    # Augmented rows have no hard label (-100); a batch of only those has no CE term.
    has_label = labels != -100
    ce = F.cross_entropy(student_logits, labels) if bool(has_label.any()) else student_logits.sum() * 0.0
    kl = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
    )
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl


def make_student(teacher: Any, layers: list[int]) -> Any:
    """A copy of the teacher keeping only `layers` of its encoder, in order (DistilBERT-style init)."""
    from torch import nn

    n_teacher = teacher.config.num_hidden_layers
    if not layers or any(not 0 <= i < n_teacher for i in layers) or sorted(set(layers)) != layers:
        raise ValueError(f"student layers must be increasing indices below {n_teacher}, got {layers}")
    student = copy.deepcopy(teacher)
    encoder = student.base_model.encoder
    encoder.layer = nn.ModuleList([encoder.layer[i] for i in layers])
    student.config.num_hidden_layers = len(layers)
    return student


def freeze_word_embeddings(model: Any) -> None:
    model.base_model.embeddings.word_embeddings.weight.requires_grad_(False)


@dataclass
class DistillationLoss:
    """A Trainer loss mixing hard labels with the teacher's softened logits (row `batch["index"]` of
    `teacher_logits`) and, when `hidden_weight` > 0, the teacher's hidden states at the student's layers."""

    alpha: float
    temperature: float
    teacher_logits: torch.Tensor
    hidden_weight: float = 0.0
    layers: list[int] = field(default_factory=list)  # student layer k mirrors teacher layer layers[k]
    teacher: Any | None = None

    def __post_init__(self) -> None:
        if self.hidden_weight > 0 and (self.teacher is None or not self.layers):
            raise ValueError("hidden-state transfer needs the teacher model and the layer mapping")

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch

        want_hidden = self.hidden_weight > 0
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=want_hidden
        )
        logits = self.teacher_logits[batch["index"]]
        loss = kd_loss(out.logits, logits, batch["labels"], self.alpha, self.temperature)
        if want_hidden and self.teacher is not None:
            with torch.no_grad():
                t_out = self.teacher(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
                )
            mask = batch["attention_mask"].unsqueeze(-1).float()
            # hidden_states[0] is the shared embedding output, so layer i is hidden_states[i + 1].
            pairs = [(k + 1, t + 1) for k, t in enumerate(self.layers)]
            mse = sum(
                (((out.hidden_states[s] - t_out.hidden_states[t]) ** 2) * mask).sum() / (mask.sum() * mask.shape[-1])
                for s, t in pairs
            )
            loss = loss + self.hidden_weight * mse / len(pairs)
        return loss


def train_student(
    teacher: Any,
    tokenizer: Any,
    data: Clinc,
    cfg: DistillConfig,
    train_cfg: TrainConfig,
    teacher_logits_cache: dict[str, torch.Tensor] | None = None,
) -> tuple[Any, list[dict[str, float]]]:
    import torch

    from compression.training import Encoded, Trainer, predict_logits, seed_everything

    seed_everything(train_cfg.seed)
    torch.set_num_threads(train_cfg.threads)
    split = training_split(data, cfg.wiki_path, cfg.wiki_oos, train_cfg.seed, cfg.train_subset)
    split = split + augment(split, cfg.augment_copies, train_cfg.seed, tokenizer.mask_token)
    encoded = Encoded(tokenizer, split, data.labels, train_cfg.max_length)
    key = f"{cfg.wiki_oos}:{cfg.train_subset}:{train_cfg.seed}:{train_cfg.max_length}:{cfg.augment_copies}"
    if teacher_logits_cache is not None and key in teacher_logits_cache:
        logits = teacher_logits_cache[key]
    else:
        logits = torch.from_numpy(predict_logits(teacher, encoded))
        if teacher_logits_cache is not None:
            teacher_logits_cache[key] = logits
    student = make_student(teacher, cfg.layers)
    if cfg.freeze_embeddings:
        freeze_word_embeddings(student)
    teacher.eval()
    loss = DistillationLoss(
        cfg.alpha,
        cfg.temperature,
        logits,
        hidden_weight=cfg.hidden_weight,
        layers=cfg.layers,
        teacher=teacher if cfg.hidden_weight > 0 else None,
    )
    history = Trainer(student, train_cfg, loss).train(encoded)
    return student, history


def run(teacher_dir: Path, data: Clinc, out: Path, cfg: DistillConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    teacher, tokenizer, labels = checkpoint.load(teacher_dir)
    if labels != data.labels:
        raise FactoryError(f"the teacher's labels ({teacher_dir}) differ from the data's label order")
    student, history = train_student(teacher, tokenizer, data, cfg, train_cfg)
    logits, gold = evaluate(student, tokenizer, data, train_cfg.max_length)
    report = validation_report(logits, gold, data.labels)
    checkpoint.save(out, student, tokenizer, data.labels)
    config = {"distill": asdict(cfg), "train": train_cfg.as_dict()}
    split = training_split(data, cfg.wiki_path, cfg.wiki_oos, train_cfg.seed, cfg.train_subset)  # before copies
    write_run(out, "distill", config, report, history=history, training_data=training_data(split, data))
    log.info("student validation: %s", report)
    return report


def val_score(student: Any, tokenizer: Any, data: Clinc, max_length: int) -> float:
    logits, gold = evaluate(student, tokenizer, data, max_length)
    report = validation_report(logits, gold, data.labels)
    return float(np.float64(report["thresholded"]["test_weighted_accuracy"]))


def resolve(ctx: Context, cfg: Config) -> tuple[DistillConfig, TrainConfig]:
    """The distillation settings: the flags where given, else the search's best (read from the search stage's
    output, when it ran), else the fallbacks above."""
    from compression.training import train_config

    best = read_best_params(ctx.dir("search"))
    distill = DistillConfig(
        alpha=cfg.alpha if cfg.alpha is not None else best.get("alpha", FALLBACK_ALPHA),
        temperature=cfg.temperature if cfg.temperature is not None else best.get("temperature", FALLBACK_TEMPERATURE),
        hidden_weight=cfg.hidden_weight,
        layers=list(cfg.student_layers),
        wiki_path=str(ctx.wiki),
        wiki_oos=ctx.wiki_oos,
        train_subset=ctx.train_subset,
        augment_copies=cfg.augment_copies,
        freeze_embeddings=not cfg.train_embeddings,
    )
    lr = cfg.student_lr if cfg.student_lr is not None else best.get("lr", FALLBACK_LR)
    return distill, train_config(ctx, cfg.student_epochs, lr)


def recorded(distill_dir: Path) -> DistillConfig:
    """The settings the distill stage ran with, from its run record: for the stages that read its output."""
    record = read_run(distill_dir).get("config", {}).get("distill")
    try:
        return DistillConfig(**record)
    except TypeError:
        raise FactoryError(
            f"no distillation record at {distill_dir / 'run.json'} (run the distill stage first)"
        ) from None


def run_stage(ctx: Context, cfg: Config) -> None:
    distill, train = resolve(ctx, cfg)
    run(ctx.dir("teacher"), ctx.clinc, ctx.dir("distill"), distill, train)
