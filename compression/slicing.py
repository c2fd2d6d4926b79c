"""Structured slicing of a BERT encoder's attention heads and of its hidden width, and rebuilding a sliced
checkpoint's shapes on load.

A query's projections Q, K, V and the attention output O cost 4 x hidden^2 multiply-adds per token and layer,
two thirds of a layer once its FFN is pruned to a quarter; dropping whole heads shrinks those four matrices,
which dense CPU kernels then run in proportion. transformers 5 has no `prune_heads` for BERT, so the heads are
cut here: the rows of Q, K and V that belong to a dropped head, and the matching columns of O. BERT's attention
reshapes to (-1 heads, head size), so a layer with fewer heads runs unchanged; the count kept is saved in the
model's config under HEADS_KEPT, from which `rebuild` restores the shapes before the weights are loaded.

The hidden width (the residual stream every layer reads and writes) is cut with one set of features for the whole
model: the embeddings' columns, every LayerNorm, the inputs of Q, K, V, the FFN and the pooler, and the outputs of
O, the FFN and the pooler. Each matrix product of a layer then shrinks in proportion, and the layers stay. Unlike
a head, a dropped feature also leaves every LayerNorm's mean and variance, so the sliced model is not the whole
one with features silenced: it needs the recovery that follows pruning. The config then says hidden_size =
the width kept, and num_attention_heads = that width over the head size, so that HF's classes and `head_size`
keep the 32-wide head; HEADS_KEPT says how many heads the layers run.

Not a stage module: the prune stage and checkpoint import it inside their functions, since it imports torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compression.errors import FactoryError

HEADS_KEPT = "attention_heads_kept"  # the config key: heads per layer after slicing (absent: all)
SLICEABLE = ("bert",)  # the model types whose module names the cuts below know


def check_sliceable(config: Any) -> None:
    """Raise FactoryError unless the cuts below know this model's layout (BERT's; all-MiniLM-L6-v2 is one)."""
    if config.model_type not in SLICEABLE:
        raise FactoryError(
            f"--heads-keep and --hidden-keep cut BERT encoders only, not a {config.model_type!r} model "
            "(--ffn-keep cuts any model whose layers have intermediate.dense and output.dense)"
        )


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


def hidden_scores(model: Any) -> torch.Tensor:
    """First-order Taylor importance |w . dL/dw| of each hidden feature, summed over every weight that reads or
    writes it (see the module's docstring); reads the gradients a backward pass left. Weights without a gradient
    (a frozen table, a head the loss did not reach) add nothing."""
    hidden = int(model.config.hidden_size)
    total = torch.zeros(hidden)

    def add(tensor: torch.Tensor, dim: int) -> None:
        # `dim`: the axis that indexes the hidden features (1 for a product's inputs and for embedding tables).
        if tensor.grad is not None:
            term = (tensor * tensor.grad).abs().detach()
            total.add_(term if term.dim() == 1 else term.sum(1 - dim))

    emb = model.base_model.embeddings
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        add(table.weight, 1)
    norms = [emb.LayerNorm]
    for layer in model.base_model.encoder.layer:
        att = layer.attention
        for proj in (att.self.query, att.self.key, att.self.value, layer.intermediate.dense):
            add(proj.weight, 1)
        for proj in (att.output.dense, layer.output.dense):
            add(proj.weight, 0)
            add(proj.bias, 0)
        norms += [att.output.LayerNorm, layer.output.LayerNorm]
    for norm in norms:
        add(norm.weight, 0)
        add(norm.bias, 0)
    pooler = model.base_model.pooler
    if pooler is not None:
        add(pooler.dense.weight, 1)
        add(pooler.dense.weight, 0)
        add(pooler.dense.bias, 0)
    add(model.classifier.weight, 1)
    head = getattr(model, "geometry_head", None)
    if isinstance(head, nn.Linear):
        add(head.weight, 1)
    return total


def _embedding(table: nn.Embedding, keep: torch.Tensor) -> nn.Embedding:
    new = nn.Embedding(table.num_embeddings, len(keep), padding_idx=table.padding_idx)
    new.weight.data = table.weight.data.index_select(1, keep).clone()
    return new


def _norm(norm: nn.LayerNorm, keep: torch.Tensor) -> nn.LayerNorm:
    new = nn.LayerNorm(len(keep), eps=norm.eps)
    new.weight.data = norm.weight.data.index_select(0, keep).clone()
    new.bias.data = norm.bias.data.index_select(0, keep).clone()
    return new


def keep_hidden(model: Any, scores: torch.Tensor, keep_fraction: float) -> Any:
    """Keep the top-scoring hidden features, a whole number of heads' width of them (at least one), everywhere the
    residual stream is read or written. Call it after `keep_heads`, with scores taken before either cut."""
    size = head_size(model.config)
    heads = heads_per_layer(model.config)
    keep_n = max(1, round(model.config.hidden_size * keep_fraction / size)) * size
    keep = torch.topk(scores, keep_n).indices.sort().values
    emb = model.base_model.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        setattr(emb, name, _embedding(getattr(emb, name), keep))
    emb.LayerNorm = _norm(emb.LayerNorm, keep)
    for layer in model.base_model.encoder.layer:
        att = layer.attention
        for name in ("query", "key", "value"):
            setattr(att.self, name, slice_linear(getattr(att.self, name), keep, 1))
        att.output.dense = slice_linear(att.output.dense, keep, 0)
        att.output.LayerNorm = _norm(att.output.LayerNorm, keep)
        layer.intermediate.dense = slice_linear(layer.intermediate.dense, keep, 1)
        layer.output.dense = slice_linear(layer.output.dense, keep, 0)
        layer.output.LayerNorm = _norm(layer.output.LayerNorm, keep)
    pooler = model.base_model.pooler
    if pooler is not None:
        pooler.dense = slice_linear(slice_linear(pooler.dense, keep, 1), keep, 0)
    model.classifier = slice_linear(model.classifier, keep, 1)
    head = getattr(model, "geometry_head", None)
    if isinstance(head, nn.Linear):
        model.geometry_head = slice_linear(head, keep, 1)
    model.config.hidden_size = keep_n
    model.config.num_attention_heads = keep_n // size
    setattr(model.config, HEADS_KEPT, heads)
    return model


def rebuild(model: Any) -> Any:
    """Give a model built from a sliced checkpoint's config the sliced shapes: Q, K, V and O over the heads kept
    (the weights are loaded over them). The hidden width needs nothing here: the config's hidden_size is already
    the width kept."""
    kept = getattr(model.config, HEADS_KEPT, None)
    if kept:
        hidden, width = int(model.config.hidden_size), kept * head_size(model.config)
        for layer in model.base_model.encoder.layer:
            att = layer.attention
            for name in ("query", "key", "value"):
                setattr(att.self, name, nn.Linear(hidden, width))
            att.output.dense = nn.Linear(width, hidden)
            att.self.num_attention_heads = kept
            att.self.all_head_size = width
    return model
