"""A small PyTorch training loop; stages customise its loss by passing ``loss`` (or overriding ``compute_loss``).

Not a stage module: stage modules import it inside their functions, since it imports torch."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from compression import progress
from compression.data import Split

if TYPE_CHECKING:
    from compression.pipeline import Context

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """One training run's settings: the stage's epochs and learning rate, the pipeline's common options (see
    `train_config`, which fills them; their defaults live in compression.pipeline.Common), and the optimiser's
    fixed settings."""

    epochs: float
    lr: float
    batch_size: int
    max_length: int
    seed: int
    threads: int
    label_smoothing: float = 0.0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


BUCKET_BATCHES = 50


class Encoded:
    """Token ids for a split, tokenised once; batches are padded to their longest member."""

    def __init__(self, tokenizer: Any, split: Split, labels: list[str], max_length: int) -> None:
        enc = tokenizer(split.texts, truncation=True, max_length=max_length)
        self.input_ids: list[list[int]] = enc["input_ids"]
        self.labels = torch.tensor(split.label_ids(labels), dtype=torch.long)
        self.pad_id = int(tokenizer.pad_token_id or 0)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, index: list[int]) -> dict[str, torch.Tensor]:
        seqs = [self.input_ids[i] for i in index]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[index], "index": torch.tensor(index)}

    def batches(
        self, batch_size: int, shuffle: bool, rng: random.Random | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        order = list(range(len(self)))
        if not shuffle:
            for start in range(0, len(order), batch_size):
                yield self.batch(order[start : start + batch_size])
            return
        rng = rng or random.Random(0)
        rng.shuffle(order)
        # Length buckets: one long Wikipedia sentence would otherwise pad a whole batch of short queries.
        # Sorting within windows of BUCKET_BATCHES batches keeps batches random across the epoch.
        window = batch_size * BUCKET_BATCHES
        groups: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: len(self.input_ids[i]))
            groups += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        rng.shuffle(groups)
        for group in groups:
            yield self.batch(group)


@torch.no_grad()
def _predict_rows(
    model: Any, data: Encoded, batch_size: int, rows_of: Callable[[dict[str, torch.Tensor]], torch.Tensor]
) -> np.ndarray:
    """`rows_of(batch)` for every row of `data`, in eval mode. Batches of similar length waste no work on padding;
    rows go back to their places afterwards."""
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        rows = rows_of(data.batch(index)).float().numpy()
        if out is None:
            out = np.empty((len(data), rows.shape[-1]), dtype=np.float32)
        out[index] = rows
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


def predict_logits(model: Any, data: Encoded, batch_size: int = 128) -> np.ndarray:
    return _predict_rows(
        model, data, batch_size, lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    )


def predict_embeddings(model: Any, data: Encoded, batch_size: int = 128) -> np.ndarray:
    """The student's unit sentence embeddings (compression.geometry), batched like predict_logits."""
    from compression import geometry

    def embed(b: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        return geometry.embed(model, hidden.hidden_states[-1], b["attention_mask"])

    return _predict_rows(model, data, batch_size, embed)


Loss = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]  # (model, batch) -> scalar loss


class Trainer:
    """AdamW with linear warm-up and decay; one epoch is a shuffled pass over the data. The loss is the
    cross-entropy with the config's label smoothing unless `loss` is given."""

    def __init__(self, model: Any, config: TrainConfig, loss: Loss | None = None) -> None:
        self.model = model
        self.config = config
        self.loss = loss
        self.ce = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.loss is not None:
            return self.loss(self.model, batch)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss: torch.Tensor = self.ce(out.logits, batch["labels"])
        return loss

    def train(self, data: Encoded, on_epoch: Any = None) -> list[dict[str, float]]:
        cfg = self.config
        torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        rng = random.Random(cfg.seed)
        steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
        total = max(1, int(steps_per_epoch * cfg.epochs))
        warmup = int(total * cfg.warmup_ratio)
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))
        )
        history: list[dict[str, float]] = []
        step, epoch = 0, 0
        began, report_every = time.perf_counter(), progress.every(total)
        while step < total:
            self.model.train()
            started, running, count = time.perf_counter(), 0.0, 0
            for batch in data.batches(cfg.batch_size, shuffle=True, rng=rng):
                loss = self.compute_loss(batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                opt.step()
                sched.step()
                running += float(loss.detach())
                count += 1
                step += 1
                if step % report_every == 0:
                    log.info(
                        "step %d/%d (%.0f%%) loss %.4f, %s",
                        step,
                        total,
                        100 * step / total,
                        running / count,
                        progress.time_left(step, total, time.perf_counter() - began),
                    )
                if step >= total:
                    break
            epoch += 1
            row = {"epoch": epoch, "loss": running / max(1, count), "seconds": time.perf_counter() - started}
            if on_epoch is not None:
                row.update(on_epoch(self.model))
            log.info("epoch %d: %s", epoch, {k: round(v, 4) for k, v in row.items()})
            history.append(row)
        return history


def train_config(ctx: Context, epochs: float, lr: float, label_smoothing: float = 0.0) -> TrainConfig:
    """A stage's training settings: its own epochs and learning rate, the pipeline's common options."""
    return TrainConfig(
        epochs=epochs,
        lr=lr,
        batch_size=ctx.batch_size,
        label_smoothing=label_smoothing,
        max_length=ctx.max_length,
        seed=ctx.seed,
        threads=ctx.threads,
    )
