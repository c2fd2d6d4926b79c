"""The student's second signal: a sentence embedding trained to reproduce a pretrained encoder's.

Fine-tuning on the intents teaches a classifier to put every query on some intent, unseen ones too; a sentence
encoder pretrained on a billion sentence pairs still places unrelated sentences far apart, and that is what the
energy_knn rule's neighbour test reads. A small student cut from the classifier loses that geometry (it lives in
the encoder's last layers), so it is trained back: a linear head over the student's mean-pooled last hidden
states, scaled to unit length, learns the pretrained encoder's unit embedding of each transfer sentence (a cosine
loss beside the distillation's). One forward pass then gives both the logits and the embedding.

Not a stage module: stage modules import it inside their functions, since it imports torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)
HEAD_FILE = "geometry_head.safetensors"
HEAD_ATTR = "geometry_head"


def add_head(model: Any, dim: int) -> None:
    """A linear head hidden -> dim, started as the identity where the widths agree (the mean-pooled states are the
    pretrained encoder's own sentence embedding before fine-tuning moved them)."""
    hidden = model.config.hidden_size
    head = nn.Linear(hidden, dim)
    with torch.no_grad():
        head.bias.zero_()
        if dim == hidden:
            head.weight.copy_(torch.eye(dim))
    setattr(model, HEAD_ATTR, head)


def has_head(model: Any) -> bool:
    return isinstance(getattr(model, HEAD_ATTR, None), nn.Module)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled: torch.Tensor = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return pooled


def embed(model: Any, last_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The student's unit sentence embedding from its last hidden states."""
    out: torch.Tensor = getattr(model, HEAD_ATTR)(mean_pool(last_hidden, mask))
    unit: torch.Tensor = out / out.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return unit


def cosine_loss(embedding: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity, averaged: 0 where the student's embedding points where the pretrained one does."""
    return (1.0 - (embedding * target).sum(-1)).mean()


def save_head(directory: Path, model: Any) -> None:
    from safetensors.torch import save_file

    head = getattr(model, HEAD_ATTR)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(directory / HEAD_FILE))


def load_head(directory: Path, model: Any) -> None:
    """Attach the head saved beside a checkpoint, where there is one."""
    path = directory / HEAD_FILE
    if not path.is_file():
        return
    from safetensors.torch import load_file

    state = load_file(str(path))
    add_head(model, int(state["weight"].shape[0]))
    getattr(model, HEAD_ATTR).load_state_dict(state)


def without_head(model: Any) -> dict[str, torch.Tensor]:
    """The model's state dict without the head, which HF's own format has no place for."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_ATTR + ".")}


def pretrained_dim(source: str) -> int:
    """The width of the pretrained encoder's sentence embedding, which the geometry head reproduces."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(source).hidden_size)


@torch.no_grad()
def pretrained_embeddings(source: str, texts: list[str], max_length: int, batch_size: int = 128) -> np.ndarray:
    """The pretrained encoder's unit sentence embedding of every text (masked mean of its last hidden states), the
    targets of the geometry loss. Sorted by length into batches, so little is spent on padding."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    encoder = AutoModel.from_pretrained(source).eval()
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
    out = np.empty((len(texts), encoder.config.hidden_size), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        width = max(len(ids[i]) for i in index)
        batch = torch.full((len(index), width), int(tokenizer.pad_token_id or 0), dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            batch[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        pooled = mean_pool(encoder(input_ids=batch, attention_mask=mask).last_hidden_state, mask)
        out[index] = (pooled / pooled.norm(dim=-1, keepdim=True)).numpy()
    log.info("geometry: %d pretrained embeddings from %s", len(texts), source)
    return out
