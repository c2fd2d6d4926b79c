"""Stage 3: structured pruning of FFN neurons, attention heads and the hidden width, which shrinks the matrices and
so speeds up dense CPU kernels.

Unstructured or movement pruning (the chapter's choice) only zeroes weights, and dense int8 kernels
run just as long on zeros, so it is not used here.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compression import checkpoint, ensemble
from compression.data import Dataset
from compression.errors import FactoryError
from compression.measure.evaluate import evaluate, training_data, training_split, validation_report
from compression.records import write_run

if TYPE_CHECKING:
    import torch

    from compression.pipeline import Context
    from compression.training import Encoded, TrainConfig

log = logging.getLogger(__name__)


@dataclass
class Config:
    ffn_keep: float = field(default=0.75, metadata={"help": "share of FFN neurons kept (1.0: no pruning)"})
    heads_keep: float = field(default=1.0, metadata={"help": "share of attention heads kept in every layer (1.0: all)"})
    hidden_keep: float = field(
        default=1.0,
        metadata={"help": "share of the hidden width kept, in whole heads' widths (1.0: all; compression.slicing)"},
    )
    recover_epochs: float = field(default=7.0, metadata={"help": "distillation epochs after pruning"})
    recover_lr: float = field(default=1.5e-4, metadata={"help": "learning rate of the recovery"})
    recover_copies: int = field(default=3, metadata={"help": "fresh perturbed copies per query for recovery"})
    recover_from_student: bool = field(
        default=False, metadata={"help": "recover from the unpruned student, not the teacher"}
    )
    recover_geometry_weight: float | None = field(
        default=None,
        metadata={
            "help": "weight of the geometry loss in the recovery (default: the distillation's --geometry-weight)"
        },
    )

    def __post_init__(self) -> None:
        shares = (("--ffn-keep", self.ffn_keep), ("--heads-keep", self.heads_keep), ("--hidden-keep", self.hidden_keep))
        for flag, share in shares:
            if not 0.0 < share <= 1.0:
                raise FactoryError(f"{flag} is a share, more than 0 and at most 1, got {share}")
        if self.recover_geometry_weight is not None and self.recover_geometry_weight < 0:
            raise FactoryError(f"--recover-geometry-weight must be at least 0, got {self.recover_geometry_weight}")


@dataclass
class PruneConfig:
    """The resolved settings run() takes: Config's, plus the pipeline's data options and the softening the
    distill stage used (read from its run record)."""

    ffn_keep: float  # share of FFN neurons kept in every layer
    recover_epochs: float  # distillation from the unpruned model afterwards (0: none)
    wiki_path: str
    wiki_oos: int
    train_subset: int
    augment_copies: int  # perturbed, teacher-labelled copies in the recovery transfer set
    alpha: float
    temperature: float
    geometry_weight: float = 0.0  # as the distillation trained the student's sentence embedding
    geometry_source: str | None = None
    transfer_wiki: int = 0
    heads_keep: float = 1.0  # share of attention heads kept in every layer
    hidden_keep: float = 1.0  # share of the hidden width kept


def backward(model: Any, data: Encoded, batches: int = 20) -> None:
    """Leave the classification loss's gradients, summed over `batches` batches, on the model's weights."""
    from torch import nn

    model.train(False)
    model.zero_grad()
    ce = nn.CrossEntropyLoss()
    for i, batch in enumerate(data.batches(32, shuffle=True)):
        if i >= batches:
            break
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ce(out.logits, batch["labels"]).backward()


def neuron_scores(model: Any) -> list[torch.Tensor]:
    """First-order Taylor importance |w . dL/dw| of each FFN neuron, summed over its in and out weights; reads
    the gradients `backward` left."""
    scores = []
    for layer in model.base_model.encoder.layer:
        up, down = layer.intermediate.dense, layer.output.dense
        s = (up.weight * up.weight.grad).abs().sum(1) + (up.bias * up.bias.grad).abs()
        s = s + (down.weight * down.weight.grad).abs().sum(0)
        scores.append(s.detach())
    return scores


def prune_ffn(model: Any, scores: list[torch.Tensor], keep_fraction: float) -> Any:
    """Keep the same number of top-scoring neurons in each layer, so the config stays uniform."""
    import torch

    from compression import slicing

    size = model.config.intermediate_size
    keep_n = max(1, round(size * keep_fraction))
    for layer, s in zip(model.base_model.encoder.layer, scores, strict=True):
        keep = torch.topk(s, keep_n).indices.sort().values
        layer.intermediate.dense = slicing.slice_linear(layer.intermediate.dense, keep, 0)
        layer.output.dense = slicing.slice_linear(layer.output.dense, keep, 1)
    model.config.intermediate_size = keep_n
    return model


def distill_view(cfg: PruneConfig) -> Any:
    """The recovery's transfer set and geometry loss, in the distillation's own terms."""
    from compression.stages.distill import DistillConfig

    return DistillConfig(
        alpha=cfg.alpha,
        temperature=cfg.temperature,
        hidden_weight=0.0,
        layers=[],
        wiki_path=cfg.wiki_path,
        wiki_oos=cfg.wiki_oos,
        train_subset=cfg.train_subset,
        augment_copies=cfg.augment_copies,
        freeze_embeddings=True,
        geometry_weight=cfg.geometry_weight,
        geometry_source=cfg.geometry_source,
        transfer_wiki=cfg.transfer_wiki,
    )


def run(
    student_dir: Path,
    data: Dataset,
    out: Path,
    cfg: PruneConfig,
    train_cfg: TrainConfig,
    teacher_dir: Path | None = None,
) -> dict[str, Any]:
    """Prune the student's FFNs, then recover by distillation from `teacher_dir` (the unpruned student when
    None): from the mean logits of the teacher and its ensemble members, where the teacher stage trained several.
    The fine-tuned teacher is the better target: it does not pass on the student's own errors."""
    import torch

    from compression import geometry, slicing
    from compression.stages.distill import (
        DistillationLoss,
        freeze_word_embeddings,
        geometry_fit,
        geometry_targets,
        transfer_set,
    )
    from compression.training import Encoded, Trainer, predict_logits, seed_everything

    seed_everything(train_cfg.seed)
    torch.set_num_threads(train_cfg.threads)
    model, tokenizer, labels = checkpoint.load(student_dir)
    if cfg.heads_keep < 1.0 or cfg.hidden_keep < 1.0:
        slicing.check_sliceable(model.config)  # before the transfer set and the teachers' logits are built
    split = training_split(data, cfg.wiki_path, cfg.wiki_oos, train_cfg.seed, cfg.train_subset)
    labelled = Encoded(tokenizer, split, labels, train_cfg.max_length)
    # The distillation's transfer set with fresh perturbed copies (another seed).
    recovery = distill_view(cfg)
    transfer = transfer_set(data, recovery, train_cfg.seed + 1, tokenizer.mask_token)
    encoded = Encoded(tokenizer, transfer, labels, train_cfg.max_length)
    if teacher_dir is None:  # the unpruned student itself, already in memory
        targets_from = [student_dir]
        target_logits = torch.from_numpy(predict_logits(model, encoded))
    else:  # the teacher and its ensemble members (compression.ensemble)
        targets_from = ensemble.members(teacher_dir)
        target_logits = torch.from_numpy(ensemble.mean_logits(targets_from, encoded, labels))
    before = model.num_parameters()
    backward(model, labelled)
    # Every score before any cut: a cut replaces the weights it touches, and their gradients with them.
    widths = slicing.hidden_scores(model) if cfg.hidden_keep < 1.0 else None
    prune_ffn(model, neuron_scores(model), cfg.ffn_keep)
    if cfg.heads_keep < 1.0:
        slicing.keep_heads(model, slicing.head_scores(model), cfg.heads_keep)
    if widths is not None:
        slicing.keep_hidden(model, widths, cfg.hidden_keep)
    model.zero_grad()
    history: list[dict[str, float]] = []
    if cfg.recover_epochs > 0:
        freeze_word_embeddings(model)
        targets = None
        if cfg.geometry_weight > 0 and geometry.has_head(model):
            targets = geometry_targets(recovery, transfer.texts, train_cfg.max_length)
        loss = DistillationLoss(
            cfg.alpha,
            cfg.temperature,
            target_logits,
            geometry_weight=cfg.geometry_weight if targets is not None else 0.0,
            geometry_targets=targets,
        )
        rcfg = dataclasses.replace(train_cfg, epochs=cfg.recover_epochs)
        history = Trainer(model, rcfg, loss).train(encoded)
    logits, gold = evaluate(model, tokenizer, data, train_cfg.max_length)
    report = validation_report(logits, gold, labels)
    report["parameters"] = {"before": before, "after": model.num_parameters()}
    if geometry.has_head(model):
        report["geometry_cosine"] = geometry_fit(model, tokenizer, data, recovery, train_cfg.max_length)
    checkpoint.save(out, model, tokenizer, labels)
    config = {
        "prune": dataclasses.asdict(cfg),
        "train": train_cfg.as_dict(),
        "recovery_teachers": [str(path) for path in targets_from],
    }
    write_run(out, "prune", config, report, history=history, training_data=training_data(split, data, transfer))
    log.info("pruned validation: %s", report)
    return report


def run_stage(ctx: Context, cfg: Config) -> None:
    import shutil

    from compression.training import train_config

    out = ctx.dir("prune")
    if not (ctx.dir("distill") / "config.json").is_file():
        raise FactoryError(f"no checkpoint at {ctx.dir('distill')} (run the distill stage first)")
    if cfg.ffn_keep >= 1.0 and cfg.heads_keep >= 1.0 and cfg.hidden_keep >= 1.0:
        # No pruning asked for: the stage passes the student through, so later stages have one input.
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ctx.dir("distill"), out)
        return
    teacher = None if cfg.recover_from_student else ctx.dir("teacher")
    train = train_config(ctx, cfg.recover_epochs, cfg.recover_lr)
    run(ctx.dir("distill"), ctx.dataset, out, resolve(ctx, cfg), train, teacher_dir=teacher)


def resolve(ctx: Context, cfg: Config) -> PruneConfig:
    """The recovery's settings: the flags, and what the distillation recorded (its softening, transfer set and
    geometry loss, the last unless --recover-geometry-weight sets it: with fewer attention heads the geometry is
    what the recovery loses first)."""
    from compression.stages import distill

    kd = distill.recorded(ctx.dir("distill"))
    geometry_weight = kd.geometry_weight if cfg.recover_geometry_weight is None else cfg.recover_geometry_weight
    return PruneConfig(
        cfg.ffn_keep,
        cfg.recover_epochs,
        str(ctx.wiki),
        ctx.wiki_oos,
        ctx.train_subset,
        augment_copies=cfg.recover_copies,
        alpha=kd.alpha,
        temperature=kd.temperature,
        geometry_weight=geometry_weight,
        geometry_source=kd.geometry_source,
        transfer_wiki=kd.transfer_wiki,
        heads_keep=cfg.heads_keep,
        hidden_keep=cfg.hidden_keep,
    )
