"""Stage 4: ONNX export with dynamic axes, ONNX Runtime transformer fusions, and a parity check."""

from __future__ import annotations

import logging
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compression import checkpoint
from compression.data import Dataset
from compression.errors import FactoryError
from compression.measure.evaluate import validation_report
from compression.onnx_stage import OnnxStage
from compression.records import write_run

if TYPE_CHECKING:
    from torch import nn

    from compression.pipeline import Context

log = logging.getLogger(__name__)
OPSET = 17


def _served_outputs(model: Any) -> nn.Module:
    """The model as (input_ids, attention_mask) -> logits, and, for a student with a geometry head
    (compression.geometry), its unit sentence embedding as a second output: one pass gives both."""
    import torch
    from torch import nn

    from compression import geometry

    class Served(nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model
            self.with_features = geometry.has_head(model)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            # Explicit zero segment ids: left to the model, they are rebuilt from a buffer by about 15 small
            # ops per call, a measurable share of a sub-millisecond query.
            token_type_ids = torch.zeros_like(input_ids)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                output_hidden_states=self.with_features,
            )
            if not self.with_features:
                return out.logits
            return out.logits, geometry.embed(self.model, out.hidden_states[-1], attention_mask)

    return Served(model)


def write_tokenizer(src_dir: Path, dest: Path, window: int) -> None:
    """tokenizer.json for the Rust `tokenizers` library: truncate to the model's window, never pad."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(src_dir / "tokenizer.json"))
    tok.enable_truncation(max_length=window)
    tok.no_padding()
    tok.save(str(dest))


def trace(wrapper: nn.Module, tokenizer: Any, path: Path, outputs: list[str]) -> None:
    """Write `wrapper`, a module (input_ids, attention_mask) -> [batch, ...] (or a tuple of those), as ONNX with
    its outputs named `outputs`; batch and sequence axes stay dynamic."""
    import torch

    sample = tokenizer(["book a flight to paris", "hi"], padding=True, return_tensors="pt")
    # The TorchScript exporter is deprecated, but its graph is the one ORT's BERT fusions are written for.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # Tracing warns about Python-level shape checks; parity at several lengths is checked afterwards.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        # The wrapper must be in eval mode too: the exporter restores the wrapper's mode afterwards,
        # which would otherwise switch the wrapped model back to training (dropout on).
        torch.onnx.export(
            wrapper.eval(),
            (sample["input_ids"], sample["attention_mask"]),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=outputs,
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                **{name: {0: "batch"} for name in outputs},
            },
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


FEATURES = "features"  # the student's sentence embedding, where it has a geometry head


def export_onnx(model: Any, tokenizer: Any, path: Path) -> list[str]:
    """The served graph; returns its output names."""
    from compression import geometry

    model.eval()
    # ORT's attention fusion matches the eager attention graph, not the SDPA one.
    model.set_attn_implementation("eager")
    outputs = ["logits", FEATURES] if geometry.has_head(model) else ["logits"]
    trace(_served_outputs(model), tokenizer, path, outputs)
    return outputs


class _SlicedHeadsNotice(logging.Filter):
    """Drops ORT's warning that the heads' total width differs from the layer's input width: slicing heads
    (compression.slicing) does that on purpose, and the fused Attention op takes the two widths apart (the
    export's parity check holds it to PyTorch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Input hidden size")


def fuse(raw: Path, out: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """ORT's BERT fusions (attention, bias-gelu, embed-layernorm), saved as a new graph. Skip-layernorm is
    left out: on CPU it is slower than the ops it replaces (see onnx_runner.DISABLED_OPTIMIZERS). `hidden_size` is
    ORT's name for the heads' total width, `num_heads` x head size: the hidden size unless heads were sliced."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    notice, fusion_log = _SlicedHeadsNotice(), logging.getLogger("fusion_attention")
    fusion_log.addFilter(notice)
    try:
        optimized = optimize_model(
            str(raw),
            model_type="bert",
            num_heads=num_heads,
            hidden_size=hidden_size,
            opt_level=1,
            optimization_options=options,
        )
    finally:
        fusion_log.removeFilter(notice)
    optimized.save_model_to_file(str(out))
    counts: dict[str, int] = optimized.get_fused_operator_statistics()
    return counts


def run(ckpt_dir: Path, data: Dataset, out: Path, max_length: int, parity_n: int = 300) -> dict[str, Any]:
    from compression.training import Encoded, predict_embeddings, predict_logits

    model, tokenizer, labels = checkpoint.load(ckpt_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw, fused = out / "model.raw.onnx", out / "model.onnx"
    outputs = export_onnx(model, tokenizer, raw)
    from compression import slicing

    heads = slicing.heads_per_layer(model.config)
    fusions = fuse(raw, fused, heads, heads * slicing.head_size(model.config))
    write_tokenizer(ckpt_dir, out / "tokenizer.json", max_length)
    shutil.copy(ckpt_dir / "labels.json", out / "labels.json")

    val = data.split("val")
    runner = OnnxStage(fused, out / "tokenizer.json", features=FEATURES if FEATURES in outputs else None)
    exported = runner.outputs(val.texts)
    onnx_logits = exported.logits
    sub = val.subset(parity_n, seed=0)
    sub_encoded = Encoded(tokenizer, sub, labels, max_length)
    torch_logits = predict_logits(model, sub_encoded, batch_size=1)
    index = [{t: i for i, t in enumerate(val.texts)}[t] for t in sub.texts]
    diff = float(np.abs(onnx_logits[index] - torch_logits).max())
    if diff > 1e-3:
        raise RuntimeError(f"ONNX logits differ from PyTorch by {diff:.2e}")
    report = validation_report(onnx_logits, np.array(val.label_ids(labels)), labels)
    report["parity_max_abs_diff"] = diff
    if exported.features is not None:
        torch_features = predict_embeddings(model, sub_encoded, batch_size=1)
        report["features_parity_max_abs_diff"] = float(np.abs(exported.features[index] - torch_features).max())
        if report["features_parity_max_abs_diff"] > 1e-3:
            raise RuntimeError(f"ONNX features differ from PyTorch by {report['features_parity_max_abs_diff']:.2e}")
    report["outputs"] = outputs
    report["fused_operators"] = {k: v for k, v in fusions.items() if v}
    raw.unlink()
    write_run(out, "export", {"opset": OPSET, "max_length": max_length, "source": str(ckpt_dir)}, report)
    log.info("export: parity %.2e, fusions %s", diff, report["fused_operators"])
    return report


# The checkpoints the served transformer can come from.
EXPORT_SOURCES = ("teacher", "prune", "distill")


@dataclass
class Config:
    parity_queries: int = field(default=300, metadata={"help": "validation queries checked against PyTorch"})
    export_from: str = field(
        default="teacher",
        metadata={
            "help": "the checkpoint served: teacher (6 layers; its OOS rule reads --oos-features embedder or "
            "mean); prune, the distilled and pruned student, with its sentence-embedding head where it was "
            "distilled with --geometry-weight (--oos-features student); distill, the same before pruning"
        },
    )

    def __post_init__(self) -> None:
        if self.export_from not in EXPORT_SOURCES:
            raise FactoryError(f"--export-from must be one of {', '.join(EXPORT_SOURCES)}, got {self.export_from!r}")


def run_stage(ctx: Context, cfg: Config) -> None:
    run(ctx.dir(cfg.export_from), ctx.dataset, ctx.dir("export"), ctx.max_length, cfg.parity_queries)
