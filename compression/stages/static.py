"""Stage: the cascade's first stage, a static embedding bag with a small head, distilled from the quantized
transformer.

Every query costs the transformer about 2·n·(4H² + 2HF) multiply-adds per token, which without int8 dot
products (AVX2-only CPUs) is milliseconds. Many queries do not need it: a mean of per-token vectors and a
one-hidden-layer head answer most of CLINC150 confidently and correctly (see docs/compute-light.md).

- Per-token vectors: each vocabulary token alone through the pretrained encoder, `[CLS] token [SEP]`,
  mean-pooled, reduced by PCA to `static_dim` dimensions. They initialise an EmbeddingBag (mean).
- Targets: the transformer's logits (the oos stage's, with its served OOS rule raising `oos`), the model the
  cascade falls back to, over the training split,
  Wikipedia out-of-scope sentences and perturbed copies of the training queries (its cheap logits make a
  large transfer set affordable). Knowledge distillation (temperature, alpha) plus cross-entropy on the
  hard labels where a row has one.
- The cascade threshold: the lowest first-stage confidence at which the cascade keeps the transformer's own
  in-scope accuracy, and its OOS recall to within `static_oos_tolerance`, on in-scope validation plus the
  held-out Wikipedia sentences (compression.measure.pools.tuning_split), using the service's own first-stage rule
  (app.engine.engine.first_stage_answers). It is reported on validation, and checked there by two-fold cross-fitting.
- Output `static.onnx`: Gather -> Cast (-> Mul by the row's scale) -> ReduceMean -> (MatMul -> Add -> Gelu)
  -> MatMul -> Add, the table stored in int8 with a scale per row (or fp16), each MatMul's weights in int8 per
  output column with the activations quantised per query (or fp32). The threshold is tuned on the graph's own
  logits; the record counts the validation answers that storing the table, and the int8 head, changed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.engine.engine import first_stage_answers
from app.engine.rules import Outputs, Rule
from compression.data import Dataset, Split, load_wiki
from compression.errors import FactoryError
from compression.graphs import FEATURES_OUTPUT
from compression.measure.metrics import TEST_OOS_SHARE, Scores, score, threshold_for_policy
from compression.measure.pools import tuning_split
from compression.onnx_stage import OnnxStage
from compression.records import read_run, write_run
from compression.stages.oos import read_rule, write_rule

if TYPE_CHECKING:
    from compression.pipeline import Context

log = logging.getLogger(__name__)
MODEL_FILE = "static.onnx"
GRID = tuple(round(0.30 + 0.01 * i, 2) for i in range(70))  # 0.30 .. 0.99


TABLE_TYPES = ("int8", "float16")
HEAD_TYPES = ("int8", "fp32")


@dataclass
class Config:
    static_dim: int = field(default=384, metadata={"help": "width of the first stage's token vectors (PCA)"})
    # A hidden layer lifts the share the first stage answers at no loss of accuracy from 63% to about 80% on
    # validation (docs/compute-light.md), for 0.55 M multiply-adds: 1% of the transformer's.
    static_hidden: int = field(default=1024, metadata={"help": "hidden GELU layer of the first stage (0: none)"})
    # Few epochs: longer training makes the hidden layer confident on the queries it gets wrong.
    static_epochs: int = field(default=4, metadata={"help": "training epochs of the first stage"})
    static_lr: float = field(default=3e-3, metadata={"help": "Adam learning rate of the first stage"})
    static_copies: int = field(default=6, metadata={"help": "perturbed copies per query, transformer-labelled"})
    static_alpha: float = field(default=0.7, metadata={"help": "weight of the distillation loss (rest: CE)"})
    static_temperature: float = field(default=2.0, metadata={"help": "distillation temperature"})
    static_label_smoothing: float = field(default=0.2, metadata={"help": "label smoothing of the hard-label CE"})
    static_table: str = field(
        default="int8", metadata={"help": "how static.onnx stores the token vectors: int8 (per-row scale) or float16"}
    )
    # A batch-1 product reads every weight once per query: 2.2 MB of fp32 for CLINC150's head, more than a core's
    # L2 cache, so the head was half the first stage's time; int8 weights (a quarter of the bytes) cut the graph
    # from 64 to 25 us on one Xeon, and `make compare`'s peak from 2.7-2.8k to 3.2-3.4k req/s for a 9.2 M cascade
    # (docs/one-small-model.md, a twelfth session).
    static_head: str = field(
        default="int8",
        metadata={
            "help": "how static.onnx computes its dense head: int8 (weights per output column, activations "
            "quantised per query, as the transformer's) or fp32"
        },
    )
    static_wiki_oos: int = field(default=6000, metadata={"help": "Wikipedia sentences in the transfer set"})
    static_oos_margin: float = field(
        default=2.0, metadata={"help": "how far above the top logit `oos` is put where the transformer says oos"}
    )
    static_pretrained: str = field(
        default="", metadata={"help": "encoder for the token vectors (default: the all-MiniLM-L6-v2 package)"}
    )
    # The oos stage's policy (a rejection rate, or an in-scope accuracy) is a promise about what is served, and
    # the first stage's answers are never rejected by the rule: so it is kept on the cascade, not the transformer.
    static_rule_on_cascade: bool = field(
        default=True,
        metadata={
            "help": "set the transformer rule's threshold on the cascade, by the oos stage's policy (its rejection "
            "rate, or its in-scope accuracy target), in-scope validation queries alone choosing it"
        },
    )
    static_oos_tolerance: float = field(
        default=0.001,
        metadata={
            "help": "share of the tuning pool's out-of-scope sentences the first stage may answer that "
            "the transformer would catch"
        },
    )
    # A cost target, where the chooser's point is not the one wanted: a higher threshold sends more queries to
    # the transformer (more multiply-adds) and its rule (more out-of-scope queries caught).
    static_threshold: float = field(
        default=0.0,
        metadata={"help": "fix the cascade threshold instead of choosing it (0: choose it; else in (0, 1])"},
    )

    # The first stage's seed (its transfer set and its training) moves its in-scope mistakes, and through them the
    # rule's threshold on the cascade: under 10 M multiply-adds, 2.6 to 5.2 points of the 350 between four seeds
    # (docs/one-small-model.md, "The first stage's seed"). Candidates compare at one cost, so they need a threshold.
    static_candidates: int = field(
        default=1,
        metadata={
            "help": "first stages trained on the seeds seed, seed+1, ...; the one with the least net harm on "
            "in-scope validation queries at --static-threshold is kept (needs --static-threshold)"
        },
    )

    def __post_init__(self) -> None:
        if self.static_table not in TABLE_TYPES:
            raise FactoryError(f"--static-table must be one of {', '.join(TABLE_TYPES)}, got {self.static_table!r}")
        if self.static_head not in HEAD_TYPES:
            raise FactoryError(f"--static-head must be one of {', '.join(HEAD_TYPES)}, got {self.static_head!r}")
        if not 0.0 <= self.static_threshold <= 1.0:
            raise FactoryError(f"static_threshold must be 0 (choose it) or in (0, 1], got {self.static_threshold}")
        if self.static_candidates < 1:
            raise FactoryError(f"static_candidates must be 1 or more, got {self.static_candidates}")
        if self.static_candidates > 1 and not self.static_threshold:
            raise FactoryError("static_candidates above 1 needs static_threshold: candidates compare at one cost")


# ---------------------------------------------------------------- token vectors and training


def token_vectors(pretrained: str, vocab_size: int, special: list[int]) -> np.ndarray:
    """Each token id alone between the tokenizer's own special tokens, mean-pooled encoder output."""
    import torch
    from transformers import AutoModel

    from compression.checkpoint import default_pretrained

    encoder = AutoModel.from_pretrained(pretrained or default_pretrained()).eval()
    if encoder.config.vocab_size != vocab_size:
        raise FactoryError(f"encoder vocabulary {encoder.config.vocab_size} != the served tokenizer's {vocab_size}")
    if len(special) != 2:
        raise FactoryError(f"expected a [CLS]-like and a [SEP]-like token around a word, got {special}")
    out = np.empty((vocab_size, encoder.config.hidden_size), np.float32)
    with torch.no_grad():
        for start in range(0, vocab_size, 1024):
            ids = torch.arange(start, min(vocab_size, start + 1024))
            x = torch.stack([torch.full_like(ids, special[0]), ids, torch.full_like(ids, special[1])], dim=1)
            out[start : start + len(ids)] = encoder(
                input_ids=x, attention_mask=torch.ones_like(x)
            ).last_hidden_state.mean(1)
    return out


def pca(vectors: np.ndarray, dim: int) -> np.ndarray:
    centred = vectors - vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    reduced = centred @ vt[:dim].T
    out: np.ndarray = (reduced / reduced.std()).astype(np.float32)
    return out


def train_bag(
    init: np.ndarray,
    ids: list[list[int]],
    targets: np.ndarray,
    hard: np.ndarray,
    cfg: Config,
    seed: int,
    threads: int,
) -> tuple[np.ndarray, list[Dense], list[float]]:
    """EmbeddingBag(mean), then a GELU hidden layer when `static_hidden` > 0, then a linear layer to the
    logits; KD on the transformer's logits plus CE on hard labels (-100: none). Returns the table, the
    dense layers in order, and the loss per epoch."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    bag = torch.nn.EmbeddingBag.from_pretrained(torch.tensor(init), freeze=False, mode="mean", sparse=True)
    d, classes = init.shape[1], targets.shape[1]
    head: torch.nn.Module = (
        torch.nn.Sequential(
            torch.nn.Linear(d, cfg.static_hidden), torch.nn.GELU(), torch.nn.Linear(cfg.static_hidden, classes)
        )
        if cfg.static_hidden > 0
        else torch.nn.Sequential(torch.nn.Linear(d, classes))
    )
    # Sparse gradients: each step touches a few hundred of the 30k rows, not the whole table.
    opt_bag = torch.optim.SparseAdam(list(bag.parameters()), lr=cfg.static_lr)
    opt_head = torch.optim.Adam(head.parameters(), lr=cfg.static_lr)
    soft_all = torch.tensor(targets)
    hard_all = torch.tensor(hard)
    t = cfg.static_temperature
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(cfg.static_epochs):
        order = torch.randperm(len(ids), generator=gen).tolist()
        total, steps = 0.0, 0
        for b in range(0, len(order), 64):
            idx = order[b : b + 64]
            seqs = [ids[i] for i in idx]
            offsets = torch.tensor([0, *(len(s) for s in seqs[:-1])]).cumsum(0)
            logits = head(bag(torch.tensor([tok for s in seqs for tok in s]), offsets))
            kd = F.kl_div(F.log_softmax(logits / t, -1), F.softmax(soft_all[idx] / t, -1), reduction="batchmean") * (
                t * t
            )
            hard_b = hard_all[idx]
            loss = cfg.static_alpha * kd
            if bool((hard_b >= 0).any()):
                loss = loss + (1 - cfg.static_alpha) * F.cross_entropy(
                    logits, hard_b, ignore_index=-100, label_smoothing=cfg.static_label_smoothing
                )
            opt_bag.zero_grad()
            opt_head.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt_bag.step()  # type: ignore[no-untyped-call]
            opt_head.step()
            total += float(loss.detach())
            steps += 1
        history.append(total / max(steps, 1))
        log.info("static: epoch %d loss %.4f", len(history), history[-1])
    layers = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    dense = [Dense(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in layers]
    return bag.weight.detach().numpy().copy(), dense, history


@dataclass(frozen=True)
class Dense:
    """One linear layer of the first stage's head: x @ weight [in, out] + bias; GELU between layers."""

    weight: np.ndarray
    bias: np.ndarray


def _gelu(x: np.ndarray) -> np.ndarray:
    """The exact GELU, x * Phi(x), as torch.nn.GELU() and ONNX's Gelu compute it."""
    from math import erf, sqrt

    out: np.ndarray = 0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))
    return out


def head_logits(pooled: np.ndarray, dense: list[Dense]) -> np.ndarray:
    """The head in numpy fp32: the reference the ONNX graph is checked against."""
    x = pooled
    for i, layer in enumerate(dense):
        x = x @ layer.weight + layer.bias
        if i < len(dense) - 1:
            x = _gelu(x)
    return x


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: table ~ q * scale, with scale [V, 1] = max |row| / 127 (1 for an all-zero row)."""
    peak = np.abs(table).max(axis=1, keepdims=True)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
    return q, scale


def stored_table(table: np.ndarray, table_type: str) -> np.ndarray:
    """The table as the graph computes with it, in fp32: what `head_logits` is checked against."""
    if table_type == "int8":
        q, scale = quantize_rows(table)
        out: np.ndarray = q.astype(np.float32) * scale
        return out
    return table.astype(np.float16).astype(np.float32)


def write_onnx(
    path: Path, table: np.ndarray, dense: list[Dense], table_type: str = "int8", head_type: str = "fp32"
) -> None:
    """input_ids [1, seq] -> logits [1, C]: the rows of the query's tokens (Gather; an int8 table is scaled
    back row by row, a float16 one cast), ReduceMean, then per dense layer MatMul -> Add, Gelu between; an int8
    head has each MatMul dynamically quantised (ONNX Runtime's quantize_dynamic, int8 weights per column)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if table_type not in TABLE_TYPES:
        raise FactoryError(f"table type must be one of {', '.join(TABLE_TYPES)}, got {table_type!r}")
    if head_type not in HEAD_TYPES:
        raise FactoryError(f"head type must be one of {', '.join(HEAD_TYPES)}, got {head_type!r}")
    inits = [numpy_helper.from_array(np.array([1], dtype=np.int64), "seq_axis")]
    if table_type == "int8":
        # A third of the fp32 bytes and half the fp16 ones, in the file and in each worker's memory.
        q, scale = quantize_rows(table)
        inits += [numpy_helper.from_array(q, "table"), numpy_helper.from_array(scale, "scales")]
        nodes = [
            helper.make_node("Gather", ["table", "input_ids"], ["rows8"], axis=0),
            helper.make_node("Cast", ["rows8"], ["rows_q"], to=TensorProto.FLOAT),
            helper.make_node("Gather", ["scales", "input_ids"], ["row_scales"], axis=0),
            helper.make_node("Mul", ["rows_q", "row_scales"], ["rows"]),
        ]
    else:
        inits.append(numpy_helper.from_array(table.astype(np.float16), "table"))
        nodes = [
            helper.make_node("Gather", ["table", "input_ids"], ["rows16"], axis=0),
            helper.make_node("Cast", ["rows16"], ["rows"], to=TensorProto.FLOAT),
        ]
    nodes.append(helper.make_node("ReduceMean", ["rows", "seq_axis"], ["pooled"], keepdims=0))
    x = "pooled"
    for i, layer in enumerate(dense):
        last = i == len(dense) - 1
        inits += [
            numpy_helper.from_array(layer.weight.astype(np.float32), f"weight{i}"),
            numpy_helper.from_array(layer.bias.astype(np.float32), f"bias{i}"),
        ]
        out = "logits" if last else f"hidden{i}"
        nodes += [
            helper.make_node("MatMul", [x, f"weight{i}"], [f"product{i}"]),
            helper.make_node("Add", [f"product{i}", f"bias{i}"], [out if last else f"linear{i}"]),
        ]
        if not last:
            nodes.append(helper.make_node("Gelu", [f"linear{i}"], [out]))
        x = out
    graph = helper.make_graph(
        nodes,
        "static_embedding_bag",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", dense[-1].weight.shape[1]])],
        inits,
    )
    # Opset 20 has Gelu as a standard op (ONNX Runtime runs it as one kernel).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="clinc-intent")
    model.ir_version = 9
    onnx.checker.check_model(model)
    if head_type == "fp32":
        onnx.save(model, str(path))
        return
    from compression.stages.quantize import dynamic

    fp32 = path.with_name(path.name + ".fp32")
    onnx.save(model, str(fp32))
    try:
        # The MatMuls alone: left to itself the quantiser also stores the int8 table's row scales in 8 bits.
        dynamic(fp32, path, per_channel=True, op_types=["MatMul"])
    finally:
        fp32.unlink()


# ---------------------------------------------------------------- the cascade threshold


def cascade_scores(
    first: np.ndarray, second: np.ndarray, gold: np.ndarray, oos: int, threshold: float
) -> tuple[Scores, float]:
    """The cascade's scores and the share the first stage answers, from precomputed predictions:
    `first` the first stage's logits, `second` the transformer's served predictions."""
    out = Outputs.of(first)
    answered = first_stage_answers(out, threshold, oos)
    return score(np.where(answered, out.pred, second), gold, oos), float(answered.mean())


def keeps_accuracy(s: Scores, base: Scores, oos_tolerance: float = 0.0) -> bool:
    """In-scope accuracy held; OOS recall, and with it test-weighted accuracy, held to within the tolerance."""
    return (
        s.in_scope_accuracy >= base.in_scope_accuracy - 1e-9
        and s.oos_recall >= base.oos_recall - oos_tolerance - 1e-9
        and s.test_weighted_accuracy >= base.test_weighted_accuracy - TEST_OOS_SHARE * oos_tolerance - 1e-9
    )


def choose_threshold(
    first: np.ndarray, second: np.ndarray, gold: np.ndarray, oos: int, oos_tolerance: float = 0.0
) -> float:
    """The lowest threshold on GRID at which the cascade scores at least what the transformer alone does
    (its OOS recall to within `oos_tolerance`: on 2,000 held-out sentences, 0.001 is two of them)."""
    base = score(second, gold, oos)
    for tau in GRID:
        if keeps_accuracy(cascade_scores(first, second, gold, oos, tau)[0], base, oos_tolerance):
            return tau
    return 1.0  # nothing keeps the accuracy: the first stage never answers


def net_harm(first: np.ndarray, transformer_pred: np.ndarray, gold: np.ndarray, oos: int, threshold: float) -> int:
    """Over the in-scope queries the first stage answers at `threshold`: those it gets wrong where the transformer's
    argmax is right, less those it gets right where the argmax is wrong. Each one counts against the rule's
    in-scope budget on the cascade (rule_on_cascade), so the fewer, the more out-of-scope queries the rule may
    reject. In-scope queries alone count: no out-of-scope query chooses a candidate."""
    out = Outputs.of(first)
    mine = first_stage_answers(out, threshold, oos) & (gold != oos)
    right, transformer_right = out.pred == gold, transformer_pred == gold
    return int((mine & ~right & transformer_right).sum() - (mine & right & ~transformer_right).sum())


def cross_fit(first: np.ndarray, second: np.ndarray, gold: np.ndarray, oos: int) -> list[dict[str, Any]]:
    """Choose on one half of validation (alternate rows), score on the other, both ways round."""
    folds = [np.arange(len(gold)) % 2 == k for k in (0, 1)]
    out = []
    for tune, held in (folds, folds[::-1]):
        tau = choose_threshold(first[tune], second[tune], gold[tune], oos)
        s, share = cascade_scores(first[held], second[held], gold[held], oos, tau)
        base = score(second[held], gold[held], oos)
        out.append(
            {"threshold": tau, "first_stage_share": share, "cascade": s.as_dict(), "transformer": base.as_dict()}
        )
    return out


# ---------------------------------------------------------------- the stage


def mask_token(tokenizer: Any) -> str | None:
    """The tokenizer's own mask token, found among its special tokens, if it has one."""
    for token in tokenizer.get_added_tokens_decoder().values():
        if token.special and "mask" in token.content.lower():
            return str(token.content)
    return None


def transfer_set(
    data: Dataset, wiki: str, wiki_oos: int, copies: int, seed: int, mask: str | None, subset: int = 0
) -> Split:
    from compression.augment import augment

    train = data.split("train")
    if subset:
        train = train.subset(subset, seed)
    return train + load_wiki(wiki, wiki_oos, seed) + augment(train, copies, seed, mask)


def rule_on_cascade(
    rule: Rule,
    first: np.ndarray,
    second: Outputs,
    gold: np.ndarray,
    oos: int,
    tau: float,
    policy: dict[str, float],
) -> Rule:
    """The rule at the threshold that meets the oos stage's `policy` (Config.threshold_policy there) on the
    cascade: the rows the first stage answers are never rejected by the rule, so the in-scope queries it may
    reject are counted on the cascade, not on the transformer alone. Only in-scope queries choose it.
    - in_scope_accuracy: the strictest threshold that keeps the cascade's in-scope accuracy at the target;
    - in_scope_rejection: the one under which the cascade refuses at most that share of in-scope queries, the
      transformer's own `oos` answers included (the first stage answers only in scope)."""
    first_out = Outputs.of(first)
    answered = first_stage_answers(first_out, tau, oos)
    scores = rule.score(second)
    # A row the first stage answers counts as right exactly when its answer is, whatever the threshold.
    kept = np.where(answered, scores.max() + 1e6, scores)
    pred = np.where(answered, first_out.pred, second.pred)
    threshold = threshold_for_policy(kept, pred, gold, oos, rule.kind, policy)
    log.info("static: the rule's threshold on the cascade %.2f (transformer alone %.2f)", threshold, rule.threshold)
    return rule.with_threshold(threshold)


def served_targets(outputs: Outputs, oos: int, rule: Rule, margin: float) -> np.ndarray:
    """The transformer's logits, with `oos` raised to the top (by `margin`) wherever its OOS rule fires: the
    first stage learns what the transformer answers, not only its argmax, which on out-of-scope queries is
    usually some intent with a low score."""
    fired = rule.decide(outputs, oos)[0] == oos
    logits = outputs.logits.astype(np.float32)
    out = logits.copy()
    out[fired, oos] = logits[fired].max(axis=-1) + margin
    return out


def run(transformer_dir: Path, data: Dataset, out: Path, cfg: Config, ctx: Context) -> dict[str, Any]:
    """Train the first stage against the transformer and OOS rule in `transformer_dir`, the oos stage's output."""
    from compression.augment import IGNORE

    for name in ("model.onnx", "tokenizer.json", "labels.json"):
        if not (transformer_dir / name).is_file():
            raise FactoryError(f"missing {transformer_dir / name} (run the oos stage first)")
    out.mkdir(parents=True, exist_ok=True)
    rule = read_rule(transformer_dir)
    features = FEATURES_OUTPUT if rule.needs_features else None
    transformer = OnnxStage(transformer_dir / "model.onnx", transformer_dir / "tokenizer.json", features=features)
    tokenizer = transformer.tokenizer
    labels = data.labels
    oos = labels.index("oos")

    special = tokenizer.encode("").ids
    vectors = token_vectors(cfg.static_pretrained, tokenizer.get_vocab_size(), special)
    init = pca(vectors, cfg.static_dim)

    for name in ("tokenizer.json", "labels.json"):
        (out / name).write_bytes((transformer_dir / name).read_bytes())
    val = data.split("val")
    gold = np.array(val.label_ids(labels))
    val_outputs = transformer.outputs(val.texts)

    def train_on(seed: int) -> tuple[np.ndarray, list[Dense], list[float], int]:
        """One first stage, on the transfer set of `seed`, written as the stage's graph: table, head, loss history,
        transfer queries."""
        split = transfer_set(
            data, str(ctx.wiki), cfg.static_wiki_oos, cfg.static_copies, seed, mask_token(tokenizer), ctx.train_subset
        )
        log.info("static: seed %d: labelling %d transfer queries with the transformer", seed, len(split))
        targets = served_targets(transformer.outputs(split.texts), oos, rule, cfg.static_oos_margin)
        hard = np.array([labels.index(i) if i != IGNORE else -100 for i in split.intents])
        ids = [e.ids for e in tokenizer.encode_batch(split.texts)]
        table, dense, history = train_bag(init, ids, targets, hard, cfg, seed, ctx.threads)
        write_onnx(out / MODEL_FILE, table, dense, cfg.static_table, cfg.static_head)
        return table, dense, history, len(split)

    # Each candidate's graph is read back as served; the least net harm is kept, the first of equals (a single
    # candidate has nothing to compare with, and no threshold need be fixed for it).
    candidates: list[dict[str, Any]] = []
    seeds = range(ctx.seed, ctx.seed + cfg.static_candidates)
    for seed in seeds:
        trained = train_on(seed)
        runner = OnnxStage(out / MODEL_FILE, out / "tokenizer.json")
        logits = runner.logits(val.texts)
        if cfg.static_candidates > 1:
            harm = net_harm(logits, val_outputs.pred, gold, oos, cfg.static_threshold)
            log.info("static: seed %d: net harm %d on in-scope validation at %.2f", seed, harm, cfg.static_threshold)
            candidates.append({"seed": seed, "net_harm": harm})
            if len(candidates) > 1 and harm >= min(c["net_harm"] for c in candidates[:-1]):
                continue
        kept_seed, (table, dense, history, transfer_queries), first, first_model = seed, trained, logits, runner
    if kept_seed != seeds[-1]:  # a later candidate's graph overwrote the kept one; its session read it already
        write_onnx(out / MODEL_FILE, table, dense, cfg.static_table, cfg.static_head)

    second = rule.decide(val_outputs, oos)[0]
    val_ids = [e.ids for e in tokenizer.encode_batch(val.texts)]
    fp32 = head_logits(np.stack([table[x].mean(0) for x in val_ids]), dense)
    stored = stored_table(table, cfg.static_table)
    reference = head_logits(np.stack([stored[x].mean(0) for x in val_ids]), dense)
    # The threshold is chosen on in-scope validation and held-out Wikipedia sentences, so that no real CLINC
    # out-of-scope query tunes it (compression.measure.pools); it is reported on validation as it stands.
    tune = tuning_split(data, str(ctx.wiki))
    tune_second = rule.decide(transformer.outputs(tune.texts), oos)[0]
    tune_gold = np.array(tune.label_ids(labels))
    chosen = choose_threshold(first_model.logits(tune.texts), tune_second, tune_gold, oos, cfg.static_oos_tolerance)
    tau = cfg.static_threshold or chosen
    transformer_alone = score(second, gold, oos)
    if cfg.static_rule_on_cascade:
        policy = read_run(transformer_dir).get("metrics", {}).get("threshold_policy")
        if not policy:
            raise FactoryError(f"no threshold_policy in {transformer_dir / 'run.json'} (run the oos stage again)")
        rule = rule_on_cascade(rule, first, val_outputs, gold, oos, tau, policy)
        second = rule.decide(val_outputs, oos)[0]
    write_rule(out, rule)
    cascade, share = cascade_scores(first, second, gold, oos, tau)
    report = {
        "cascade_threshold": tau,
        "chooser_threshold": chosen,
        "seed": kept_seed,
        "candidates": candidates,
        "first_stage_share": share,
        "cascade": cascade.as_dict(),
        "transformer": transformer_alone.as_dict(),
        "first_stage_argmax": score(first.argmax(-1), gold, oos).as_dict(),
        # The graph computes what the trained head does on the stored table (exactly with an fp32 head), and
        # how often storing the table, and an int8 head, change the first stage's answer against the fp32 table
        # and head it was trained as.
        "graph_max_abs_error": float(np.abs(reference - first).max()),
        "table": cfg.static_table,
        "table_argmax_changes": int((fp32.argmax(-1) != reference.argmax(-1)).sum()),
        "head": cfg.static_head,
        "head_argmax_changes": int((reference.argmax(-1) != first.argmax(-1)).sum()),
        "cross_fit": cross_fit(first, second, gold, oos),
        "by_threshold": {
            f"{t:.2f}": {"first_stage_share": sh, **s.as_dict()}
            for t in (*GRID[::10], 0.95, 0.99)
            for s, sh in [cascade_scores(first, second, gold, oos, t)]
        },
        "transformer_rule": {
            "oos_rule": rule.kind,
            "oos_threshold": rule.threshold,
            "on_cascade": cfg.static_rule_on_cascade,
        },
        "threshold_tuned_on": "in-scope validation + wiki_heldout",
        "kind": f"embedding_bag, GELU head {cfg.static_hidden}" if cfg.static_hidden else "embedding_bag",
        "macs_per_token": table.shape[1],
        "macs_fixed": sum(layer.weight.size for layer in dense),
    }
    write_run(out, "static", asdict(cfg), report, history=history, transfer_queries=transfer_queries)
    log.info("static: threshold %.2f answers %.1f%% of validation: %s", tau, 100 * share, cascade.as_dict())
    return report


def run_stage(ctx: Context, cfg: Config) -> None:
    run(ctx.dir("oos"), ctx.dataset, ctx.dir("static"), cfg, ctx)
