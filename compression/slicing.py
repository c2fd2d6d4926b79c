"""Structured slicing of a BERT encoder's attention heads, and rebuilding a sliced checkpoint's shapes on load.

A query's projections Q, K, V and the attention output O cost 4 x hidden^2 multiply-adds per token and layer,
two thirds of a layer once its FFN is pruned to a quarter; dropping whole heads shrinks those four matrices,
which dense CPU kernels then run in proportion. transformers 5 has no `prune_heads` for BERT, so the heads are
cut here: the rows of Q, K and V that belong to a dropped head, and the matching columns of O. BERT's attention
reshapes to (-1 heads, head size), so a layer with fewer heads runs unchanged; the count kept is saved in the
model's config under HEADS_KEPT, from which `rebuild` restores the shapes before the weights are loaded.

Not a stage module: the prune stage and checkpoint import it inside their functions, since it imports torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

HEADS_KEPT = "attention_heads_kept"  # the config key: heads per layer after slicing (absent: all)


def slice_linear(layer: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """`layer` with only the output (dim 0) or input (dim 1) features in `keep`."""
    weight = layer.weight.data.index_select(dim, keep).clone()
    bias = layer.bias.data.clone() if dim == 1 else layer.bias.data.index_select(0, keep).clone()
    new = nn.Linear(weight.shape[1], weight.shape[0])
    new.weight.data, new.bias.data = weight, bias
    return new


def head_size(config: Any) -> int:
    return int(config.hidden_size // config.num_attention_heads)


def heads_per_layer(config: Any) -> int:
    """The attention heads each layer runs: the config's count, or the count kept where heads were sliced."""
    return int(getattr(config, HEADS_KEPT, None) or config.num_attention_heads)


def head_scores(model: Any) -> list[torch.Tensor]:
    """First-order Taylor importance |w . dL/dw| of each attention head, per layer: its rows of Q, K and V and
    its columns of O. Reads the gradients a backward pass left on the model."""
    size = head_size(model.config)
    scores = []
    for layer in model.base_model.encoder.layer:
        att = layer.attention
        total = torch.zeros(heads_per_layer(model.config))
        for proj in (att.self.query, att.self.key, att.self.value):
            rows = (proj.weight * proj.weight.grad).abs().sum(1) + (proj.bias * proj.bias.grad).abs()
            total += rows.detach().view(-1, size).sum(1)
        out = att.output.dense
        total += (out.weight * out.weight.grad).abs().sum(0).detach().view(-1, size).sum(1)
        scores.append(total)
    return scores


def _features(heads: torch.Tensor, size: int) -> torch.Tensor:
    """The feature indices of `heads` in a [heads x size] projection."""
    return (heads.unsqueeze(1) * size + torch.arange(size)).flatten()


def _cut(layer: Any, features: torch.Tensor, kept: int) -> None:
    att = layer.attention
    for name in ("query", "key", "value"):
        setattr(att.self, name, slice_linear(getattr(att.self, name), features, 0))
    att.output.dense = slice_linear(att.output.dense, features, 1)
    att.self.num_attention_heads = kept
    att.self.all_head_size = len(features)


def keep_heads(model: Any, scores: list[torch.Tensor], keep_fraction: float) -> Any:
    """Keep the same number of top-scoring heads in each layer, so one count describes the model."""
    size = head_size(model.config)
    keep_n = max(1, round(heads_per_layer(model.config) * keep_fraction))
    for layer, s in zip(model.base_model.encoder.layer, scores, strict=True):
        _cut(layer, _features(torch.topk(s, keep_n).indices.sort().values, size), keep_n)
    setattr(model.config, HEADS_KEPT, keep_n)
    return model


def rebuild(model: Any) -> Any:
    """Give a model built from a sliced checkpoint's config the sliced shapes (the first heads; the weights are
    loaded over them)."""
    kept = getattr(model.config, HEADS_KEPT, None)
    if kept:
        features = _features(torch.arange(kept), head_size(model.config))
        for layer in model.base_model.encoder.layer:
            _cut(layer, features, kept)
    return model
