"""Stage 2: knowledge distillation into a shallower student initialised from the teacher's layers."""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compression import checkpoint
from compression.augment import augment
from compression.data import OOS, Dataset, Split, load_wiki_transfer
from compression.errors import FactoryError
from compression.measure.evaluate import evaluate, training_data, training_split, validation_report
from compression.measure.metrics import selection_score
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
        default_factory=lambda: [0, 2, 4],
        metadata={"help": "teacher layers that seed the student (an empty list: every layer)"},
    )
    # 0: no distillation here, the student is the teacher's layers as they are (with the geometry head where
    # asked for), for the prune stage to cut and train (the pruned recipe).
    student_epochs: float = field(
        default=6, metadata={"help": "distillation epochs (0: the teacher's layers as they are)"}
    )
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
    # The student recipe (make model RECIPE=student) sets 3: the cosine loss about as large as the distillation's
    # late in training. At 10 it dominated, and the student fell short of the teacher's classes
    # (docs/one-small-model.md).
    geometry_weight: float = field(
        default=0.0,
        metadata={
            "help": "weight of the cosine loss that trains the student's sentence embedding to the pretrained "
            "encoder's (compression.geometry); 0: a logits-only student"
        },
    )
    geometry_source: str | None = field(
        default=None, metadata={"help": "the pretrained sentence encoder (default: the all-MiniLM-L6-v2 package)"}
    )
    transfer_wiki: int = field(
        default=0,
        metadata={"help": "Wikipedia sentences added to the transfer set with soft targets only (none held out)"},
    )

    def __post_init__(self) -> None:
        if self.student_epochs < 0:
            raise FactoryError(f"--student-epochs must be at least 0, got {self.student_epochs:g}")
        # A negative weight would train the embedding away from the encoder's, silently, for an hour.
        if self.geometry_weight < 0:
            raise FactoryError(f"--geometry-weight must be at least 0, got {self.geometry_weight:g}")


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
    geometry_weight: float = 0.0  # of the cosine loss to the pretrained sentence embedding (0: no embedding head)
    geometry_source: str | None = None  # the pretrained encoder; None: the all-MiniLM-L6-v2 package
    transfer_wiki: int = 0  # soft-only Wikipedia sentences in the transfer set


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


def check_layers(layers: list[int], n_teacher: int) -> None:
    if not layers or any(not 0 <= i < n_teacher for i in layers) or sorted(set(layers)) != layers:
        raise ValueError(f"student layers must be increasing indices below {n_teacher}, got {layers}")


def make_student(teacher: Any, layers: list[int]) -> Any:
    """A copy of the teacher keeping only `layers` of its encoder, in order (DistilBERT-style init)."""
    from torch import nn

    check_layers(layers, teacher.config.num_hidden_layers)
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
    `teacher_logits`); when `hidden_weight` > 0, the teacher's hidden states at the student's layers; and when
    `geometry_weight` > 0, the cosine distance of the student's sentence embedding to the pretrained encoder's
    (row `batch["index"]` of `geometry_targets`)."""

    alpha: float
    temperature: float
    teacher_logits: torch.Tensor
    hidden_weight: float = 0.0
    layers: list[int] = field(default_factory=list)  # student layer k mirrors teacher layer layers[k]
    teacher: Any | None = None
    geometry_weight: float = 0.0
    geometry_targets: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.hidden_weight > 0 and (self.teacher is None or not self.layers):
            raise ValueError("hidden-state transfer needs the teacher model and the layer mapping")
        if self.geometry_weight > 0 and self.geometry_targets is None:
            raise ValueError("the geometry loss needs the pretrained embeddings of the transfer set")

    def __call__(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch

        from compression import geometry

        want_geometry = self.geometry_weight > 0
        want_hidden = self.hidden_weight > 0 or want_geometry
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=want_hidden
        )
        logits = self.teacher_logits[batch["index"]]
        loss = kd_loss(out.logits, logits, batch["labels"], self.alpha, self.temperature)
        if want_geometry and self.geometry_targets is not None:
            embedding = geometry.embed(model, out.hidden_states[-1], batch["attention_mask"])
            target = self.geometry_targets[batch["index"]]
            loss = loss + self.geometry_weight * geometry.cosine_loss(embedding, target)
        if self.hidden_weight > 0 and self.teacher is not None:
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


def transfer_set(data: Dataset, cfg: DistillConfig, seed: int, mask: str | None) -> Split:
    """What the student learns from: the training queries and the Wikipedia out-of-scope sentences (hard labels),
    perturbed copies of both, and more Wikipedia sentences (teacher-labelled only): the queries show it the
    intents, the rest the teacher's function and the pretrained geometry on text that is no intent."""
    from compression.augment import IGNORE

    labelled = training_split(data, cfg.wiki_path, cfg.wiki_oos, seed, cfg.train_subset)
    extra = load_wiki_transfer(cfg.wiki_path, cfg.transfer_wiki, seed, set(labelled.texts), IGNORE)
    return labelled + augment(labelled, cfg.augment_copies, seed, mask) + extra


def geometry_source(cfg: DistillConfig) -> str:
    """The pretrained sentence encoder whose embedding the geometry head learns: the configured one, else the
    all-MiniLM-L6-v2 package."""
    return cfg.geometry_source or checkpoint.default_pretrained()


def geometry_targets(cfg: DistillConfig, texts: list[str], max_length: int) -> torch.Tensor:
    import torch

    from compression.geometry import pretrained_embeddings

    return torch.from_numpy(pretrained_embeddings(geometry_source(cfg), texts, max_length))


def train_student(
    teacher: Any,
    tokenizer: Any,
    data: Dataset,
    cfg: DistillConfig,
    train_cfg: TrainConfig,
    teacher_logits_cache: dict[str, torch.Tensor] | None = None,
) -> tuple[Any, list[dict[str, float]]]:
    import torch

    from compression import geometry
    from compression.training import Encoded, Trainer, predict_logits, seed_everything

    seed_everything(train_cfg.seed)
    torch.set_num_threads(train_cfg.threads)
    if train_cfg.epochs == 0:
        student = make_student(teacher, cfg.layers)
        if cfg.geometry_weight > 0:
            geometry.add_head(student, geometry.pretrained_dim(geometry_source(cfg)))
        return student, []
    split = transfer_set(data, cfg, train_cfg.seed, tokenizer.mask_token)
    encoded = Encoded(tokenizer, split, data.labels, train_cfg.max_length)
    key = (
        f"{cfg.wiki_oos}:{cfg.train_subset}:{train_cfg.seed}:{train_cfg.max_length}:{cfg.augment_copies}:"
        f"{cfg.transfer_wiki}"
    )
    cache = teacher_logits_cache if teacher_logits_cache is not None else {}
    if key not in cache:
        cache[key] = torch.from_numpy(predict_logits(teacher, encoded))
    logits = cache[key]
    student = make_student(teacher, cfg.layers)
    if cfg.freeze_embeddings:
        freeze_word_embeddings(student)
    targets = None
    if cfg.geometry_weight > 0:
        if "geometry:" + key not in cache:
            cache["geometry:" + key] = geometry_targets(cfg, split.texts, train_cfg.max_length)
        targets = cache["geometry:" + key]
        geometry.add_head(student, int(targets.shape[1]))
    teacher.eval()
    loss = DistillationLoss(
        cfg.alpha,
        cfg.temperature,
        logits,
        hidden_weight=cfg.hidden_weight,
        layers=cfg.layers,
        teacher=teacher if cfg.hidden_weight > 0 else None,
        geometry_weight=cfg.geometry_weight,
        geometry_targets=targets,
    )
    history = Trainer(student, train_cfg, loss).train(encoded)
    return student, history


def run(teacher_dir: Path, data: Dataset, out: Path, cfg: DistillConfig, train_cfg: TrainConfig) -> dict[str, Any]:
    teacher, tokenizer, labels = checkpoint.load(teacher_dir)
    if labels != data.labels:
        raise FactoryError(f"the teacher's labels ({teacher_dir}) differ from the data's label order")
    depth = teacher.config.num_hidden_layers
    if not cfg.layers:  # every layer of whatever depth the teacher has; the record names them
        cfg = replace(cfg, layers=list(range(depth)))
    try:
        check_layers(cfg.layers, depth)
    except ValueError as exc:
        raise FactoryError(f"--student-layers: {exc}") from None
    student, history = train_student(teacher, tokenizer, data, cfg, train_cfg)
    logits, gold = evaluate(student, tokenizer, data, train_cfg.max_length)
    report = validation_report(logits, gold, data.labels)
    if cfg.geometry_weight > 0:
        report["geometry_cosine"] = geometry_fit(student, tokenizer, data, cfg, train_cfg.max_length)
    checkpoint.save(out, student, tokenizer, data.labels)
    config = {"distill": asdict(cfg), "train": train_cfg.as_dict()}
    labelled = training_split(data, cfg.wiki_path, cfg.wiki_oos, train_cfg.seed, cfg.train_subset)
    # With no epochs the student learnt nothing here: its training data is the teacher's.
    transfer = transfer_set(data, cfg, train_cfg.seed, tokenizer.mask_token) if train_cfg.epochs > 0 else labelled
    write_run(out, "distill", config, report, history=history, training_data=training_data(labelled, data, transfer))
    log.info("student validation: %s", report)
    return report


def geometry_fit(
    student: Any, tokenizer: Any, data: Dataset, cfg: DistillConfig, max_length: int
) -> dict[str, float | None]:
    """How closely the student's sentence embedding follows the pretrained encoder's: mean cosine on validation
    (in scope, and its 100 out-of-scope queries, which no stage trains on)."""
    from compression.training import Encoded, predict_embeddings

    val = data.split("val")
    ours = predict_embeddings(student, Encoded(tokenizer, val, data.labels, max_length))
    theirs = geometry_targets(cfg, val.texts, max_length).numpy()
    cosine = (ours * theirs).sum(-1)
    is_oos = np.array([i == OOS for i in val.intents])
    oos = round(float(cosine[is_oos].mean()), 4) if is_oos.any() else None  # a team's data may have none
    return {"in_scope": round(float(cosine[~is_oos].mean()), 4), "oos": oos}


def val_score(student: Any, tokenizer: Any, data: Dataset, max_length: int) -> float:
    """The search's objective (compression.measure.metrics.selection_score)."""
    logits, gold = evaluate(student, tokenizer, data, max_length)
    return selection_score(validation_report(logits, gold, data.labels))


def resolve(ctx: Context, cfg: Config) -> tuple[DistillConfig, TrainConfig]:
    """The distillation settings: the flags where given, else the search's best (read from the search stage's
    output, when it ran), else the fallbacks above."""
    from compression.stages.teacher import Config as TeacherConfig
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
        geometry_weight=cfg.geometry_weight,
        # The sentence space the student learns: the encoder the teacher was fine-tuned from, unless told.
        geometry_source=cfg.geometry_source or ctx.config_of(TeacherConfig).pretrained,
        transfer_wiki=cfg.transfer_wiki,
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
    run(ctx.dir("teacher"), ctx.dataset, ctx.dir("distill"), distill, train)
