"""Stage: the quick recipe's classifier, a linear head on the frozen pretrained sentence encoder.

The full recipe fine-tunes an encoder: about 75 minutes on 2 cores for 15,000 queries. A team iterating on its
intents needs an answer in minutes. all-MiniLM-L6-v2 already places sentences by meaning, so a
multinomial logistic regression on its unit embedding (the embedder stage's int8 graph, run as served) separates
most intents well. The regression's L2 weight is chosen from a short grid by in-scope validation accuracy.

Output: model.onnx, the embedder's graph with the head joined to it: `logits` (embedding x W + b) and `features`
(the embedding itself, which the feature-space OOS rules read: `--oos-classifier head --oos-features student`),
with tokenizer.json and labels.json. The oos stage reads it in place of the quantize stage's.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compression.data import OOS, Dataset
from compression.errors import FactoryError
from compression.graphs import FEATURES_OUTPUT
from compression.measure.evaluate import training_data, training_split
from compression.measure.metrics import score
from compression.onnx_stage import OnnxStage
from compression.records import write_run
from compression.stages.embedder import MODEL_FILE as EMBEDDER_FILE
from compression.stages.embedder import OUTPUT as EMBEDDING

if TYPE_CHECKING:
    from compression.pipeline import Context

log = logging.getLogger(__name__)
MODEL_FILE = "model.onnx"
LOGITS = "logits"
# The embedder's int8 weights, as its stage quantised them (compression.stages.quantize.dynamic, per tensor).
QUANTIZATION = "dynamic"


@dataclass
class Config:
    head_l2: list[float] = field(
        default_factory=lambda: [1e-4, 1e-3, 1e-2],
        metadata={"help": "L2 weights of the head tried (on features scaled to unit variance); validation chooses"},
    )
    head_iterations: int = field(default=150, metadata={"help": "L-BFGS iterations of each fit"})

    def __post_init__(self) -> None:
        if not self.head_l2 or any(not (w >= 0 and np.isfinite(w)) for w in self.head_l2):
            raise FactoryError(f"--head-l2 must be finite weights >= 0, got {self.head_l2}")
        if self.head_iterations < 1:
            raise FactoryError(f"--head-iterations must be >= 1, got {self.head_iterations}")


def fit(x: np.ndarray, y: np.ndarray, l2: float, iterations: int, start: np.ndarray) -> np.ndarray:
    """Multinomial logistic regression by full-batch L-BFGS from `start`: mean cross-entropy + l2 * |W|^2. Weights
    are [D + 1, C], the bias as the last row. Deterministic: no random initialisation, one full batch."""
    import torch

    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
    w = torch.tensor(start[:-1], dtype=torch.float32, requires_grad=True)
    b = torch.tensor(start[-1], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return np.vstack([w.detach().numpy(), b.detach().numpy()[None]])


def write_graph(embedder: Path, dest: Path, weights: np.ndarray, scale: float) -> None:
    """The embedder's graph with `logits` = (scale * embedding) x W + b beside `features` = the embedding."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(embedder))
    graph = model.graph
    (embedding,) = [o for o in graph.output if o.name == EMBEDDING]
    w = (scale * weights[:-1]).astype(np.float32)
    b = weights[-1].astype(np.float32)
    graph.initializer.extend([numpy_helper.from_array(w, "head/W"), numpy_helper.from_array(b, "head/b")])
    graph.node.extend(
        [
            helper.make_node("MatMul", [EMBEDDING, "head/W"], ["head/product"], name="head/MatMul"),
            helper.make_node("Add", ["head/product", "head/b"], [LOGITS], name="head/Add"),
            helper.make_node("Identity", [EMBEDDING], [FEATURES_OUTPUT], name="head/features"),
        ]
    )
    dims = [d.dim_param or d.dim_value for d in embedding.type.tensor_type.shape.dim]
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info(LOGITS, onnx.TensorProto.FLOAT, [dims[0], w.shape[1]]),
            helper.make_tensor_value_info(FEATURES_OUTPUT, onnx.TensorProto.FLOAT, dims),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))


def run(embedder_dir: Path, data: Dataset, out: Path, cfg: Config, ctx: Context) -> dict[str, Any]:
    for name in (EMBEDDER_FILE, "tokenizer.json"):
        if not (embedder_dir / name).is_file():
            raise FactoryError(f"missing {embedder_dir / name} (run the embedder stage first)")
    labels = data.labels
    split = training_split(data, str(ctx.wiki), ctx.wiki_oos, ctx.seed, ctx.train_subset)
    encoder = OnnxStage(embedder_dir / EMBEDDER_FILE, embedder_dir / "tokenizer.json")
    log.info("head: embedding %d training examples with the frozen encoder", len(split))
    x = encoder.logits(split.texts)
    y = np.array(split.label_ids(labels))
    val = data.split("val")
    val_x, val_gold = encoder.logits(val.texts), np.array(val.label_ids(labels))
    # Unit embeddings have coordinates of about 1/sqrt(D): scaled to unit variance, one L2 grid suits any encoder.
    scale = float(np.sqrt(x.shape[1]))
    oos = labels.index(OOS)
    fits: dict[float, tuple[np.ndarray, float]] = {}
    weights = np.zeros((x.shape[1] + 1, len(labels)), dtype=np.float32)
    # The strongest L2 first, each fit starting from the last: the weaker ones converge in fewer steps.
    for l2 in sorted(cfg.head_l2, reverse=True):
        weights = fit(scale * x, y, l2, cfg.head_iterations, weights)
        pred = (scale * val_x @ weights[:-1] + weights[-1]).argmax(-1)
        fits[l2] = weights, score(pred, val_gold, oos).in_scope_accuracy
        log.info("head: l2 %g: validation in-scope accuracy %.4f", l2, fits[l2][1])
    chosen = max(cfg.head_l2, key=lambda w: (fits[w][1], w))  # ties: the stronger L2
    out.mkdir(parents=True, exist_ok=True)
    write_graph(embedder_dir / EMBEDDER_FILE, out / MODEL_FILE, fits[chosen][0], scale)
    shutil.copy(embedder_dir / "tokenizer.json", out / "tokenizer.json")
    (out / "labels.json").write_text(json.dumps(labels) + "\n")
    # Scored through the written graph, not from val_x: the record is of what will be served, joins included.
    served = OnnxStage(out / MODEL_FILE, out / "tokenizer.json", output=LOGITS).logits(val.texts)
    report = {
        "l2": chosen,
        "by_l2": {f"{w:g}": round(acc, 4) for w, (_, acc) in fits.items()},
        "argmax": score(served.argmax(-1), val_gold, oos).as_dict(),
        "chosen": QUANTIZATION,
        "encoder": "frozen: the embedder stage's int8 graph",
    }
    write_run(out, "head", asdict(cfg), report, training_data=training_data(split, data))
    log.info("head: l2 %g, validation argmax %s", chosen, report["argmax"])
    return report


def run_stage(ctx: Context, cfg: Config) -> None:
    run(ctx.dir("embedder"), ctx.dataset, ctx.dir("head"), cfg, ctx)
