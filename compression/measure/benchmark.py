"""Stage-by-stage benchmark in the style of the chapter's PerformanceBenchmark.

Every stage is measured in the same run, the same way: size on disk, batch-1 latency on one
intra-op thread over a fixed set of validation queries after warm-up (tokenisation included),
and validation metrics with the stage's own tuned OOS threshold.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compression.data import Dataset
from compression.errors import FactoryError
from compression.measure.evaluate import validation_report
from compression.measure.latency import latencies_ms
from compression.onnx_stage import OnnxStage
from compression.writable import dir_write_problem

log = logging.getLogger(__name__)
BASELINE = "BERT-base fp32 pipeline (seed baseline)"


@dataclass
class BenchConfig:
    latency_queries: int = 300
    warmup: int = 50
    seed: int = 1
    baseline: bool = True


def _percentiles(times_ms: np.ndarray) -> dict[str, float]:
    return {
        "latency_ms_p50": float(np.percentile(times_ms, 50)),
        "latency_ms_mean": float(times_ms.mean()),
        "latency_ms_p99": float(np.percentile(times_ms, 99)),
        "throughput_qps": float(1000.0 / times_ms.mean()),
    }


def _dir_mb(path: Path, pattern: str) -> float:
    return sum(p.stat().st_size for p in path.glob(pattern)) / 1e6


def bench_torch(name: str, ckpt: Path, data: Dataset, texts: list[str], cfg: BenchConfig) -> dict[str, Any]:
    import torch

    from compression import checkpoint
    from compression.training import Encoded, predict_logits

    torch.set_num_threads(1)
    model, tokenizer, labels = checkpoint.load(ckpt)
    model.eval()
    val = data.split("val")
    logits = predict_logits(model, Encoded(tokenizer, val, labels, 64))
    report = validation_report(logits, np.array(val.label_ids(labels)), labels)

    @torch.no_grad()
    def one(text: str) -> object:
        return model(**tokenizer(text, return_tensors="pt", truncation=True, max_length=64)).logits

    row = {"stage": name, "runtime": "PyTorch fp32", "size_mb": _dir_mb(ckpt, "*.safetensors")}
    row.update(_percentiles(latencies_ms(one, texts, cfg.warmup)))
    return {**row, **_metrics(report), "layers": model.config.num_hidden_layers, "ffn": model.config.intermediate_size}


def bench_onnx(
    name: str, directory: Path, data: Dataset, texts: list[str], cfg: BenchConfig, runtime: str
) -> dict[str, Any]:
    """An intermediate stage's ONNX model, with its own OOS rule and threshold tuned on validation."""
    runner = OnnxStage(directory / "model.onnx", directory / "tokenizer.json", threads=1)
    val = data.split("val")
    labels = json.loads((directory / "labels.json").read_text())
    report = validation_report(runner.logits(val.texts), np.array(val.label_ids(labels)), labels)
    row = {"stage": name, "runtime": runtime, "size_mb": (directory / "model.onnx").stat().st_size / 1e6}
    row.update(_percentiles(latencies_ms(runner.logits_one, texts, cfg.warmup)))
    return {**row, **_metrics(report)}


def bench_served(directory: Path, data: Dataset, cfg: BenchConfig) -> dict[str, Any]:
    """The artifact through the engine, exactly as the service runs it: every stage, the rule and its gate, and
    latency as tokenise + every stage that ran, one query at a time, over every validation query. A cascade is
    judged by its mean and tail, so the row has both beside the median, and the share each stage answers."""
    from app.engine.engine import Engine
    from compression.measure.metrics import score

    engine = Engine.open(directory)
    val = data.split("val")
    gold = np.array(val.label_ids(engine.labels))
    decisions = engine.run(val.texts)
    last = len(engine.stage_names) - 1
    shares = {name: float((decisions.stage == i).mean()) for i, name in enumerate(engine.stage_names)}
    tested = tested_share(engine, [t for t, s in zip(val.texts, decisions.stage, strict=True) if s == last])
    s = score(decisions.pred, gold, engine.oos_index)
    spec = engine.spec
    row = {
        "stage": f"served ({directory})",
        "runtime": ("ORT int8" if spec.transformer.quantization else "ORT fp32") + (" cascade" if last else ""),
        "size_mb": sum((directory / f).stat().st_size for f in spec.files) / 1e6,
    }
    times = latencies_ms(engine.predict, val.texts, cfg.warmup)
    row.update(_percentiles(times))
    return {
        **row,
        "accuracy": s.accuracy,
        "in_scope_accuracy": s.in_scope_accuracy,
        "oos_recall": s.oos_recall,
        "test_weighted_accuracy": s.test_weighted_accuracy,
        "oos_rule": spec.rule.kind,
        "oos_threshold": spec.rule.threshold,
        "answered_by": shares,
        "first_stage_share": 1.0 - shares[engine.stage_names[last]],
        "neighbour_test_share": tested,
        **served_macs(directory, engine, val.texts, decisions.stage, tested),
        "latency_queries": len(val.texts),
        "weights": engine.weights,
    }


def tested_share(engine: Any, texts: list[str]) -> float:
    """Of the queries the last stage answers, the share under the rule's gate: those whose neighbour test (and
    gated encoder) ran. 1 for a rule without a gate."""
    if not texts:
        return 1.0
    return share_under_gate(engine, engine.outputs(texts).energy)


def share_under_gate(engine: Any, energy: np.ndarray) -> float:
    """The share of rows, by their last-stage energy, whose neighbour test runs: 1 for a rule without a gate."""
    gate = getattr(engine.spec.rule, "gate", None)
    if gate is None or not energy.size:
        return 1.0
    return float((energy < gate.energy_floor).mean())


def served_macs(directory: Path, engine: Any, texts: list[str], stage_of: np.ndarray, tested: float) -> dict[str, Any]:
    """Multiply-adds per query at the validation median length: each stage's, and the served path's average, each
    stage weighed by the share of queries that reach it. The last stage counts its graph, and, on the share
    `tested` of its queries, its gated encoder (the then-branch of an If) and the rule's own arithmetic (the
    neighbour scan, or the distances to the class centres)."""
    from compression.measure.macs import count, macs_per_query

    tokens = int(np.median([len(e.ids) for e in engine.encode(texts)]))
    spec = engine.spec
    nodes = count(directory / spec.transformer.file, tokens)
    gated = sum(n.macs for n in nodes if n.conditional)
    plain = sum(n.macs for n in nodes) - gated
    rule = engine.rule.macs()
    transformer = plain + tested * (gated + rule)
    out: dict[str, Any] = {
        "median_tokens": tokens,
        "macs_transformer": round(transformer),
        "macs_transformer_worst": plain + gated + rule,
        "macs_gated_encoder": gated,
        "macs_oos_rule": rule,
    }
    total = 0.0
    for index, stage in enumerate(spec.stages[:-1]):
        reach = float((stage_of >= index).mean())
        first = macs_per_query(directory / stage.file, tokens)
        out[f"macs_{stage.name}_stage"] = first
        total += reach * first
    total += float((stage_of == len(spec.stages) - 1).mean()) * transformer
    out["macs_per_query"] = round(total)
    return out


def bench_baseline(texts: list[str], cfg: BenchConfig, tokenizer_dir: Path) -> dict[str, Any]:
    """BERT-base-uncased shape (12 x 768), random weights, through a transformers pipeline: timing only."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, pipeline

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=151)).eval()  # type: ignore[call-arg,no-untyped-call]
    # all-MiniLM-L6-v2 uses bert-base-uncased's WordPiece vocabulary, so its tokenizer stands in offline.
    if not (tokenizer_dir / "tokenizer.json").is_file():  # no teacher built yet: the pretrained encoder's
        from compression.checkpoint import default_pretrained

        tokenizer_dir = Path(default_pretrained())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, device=-1)
    size = sum(p.numel() for p in model.parameters()) * 4 / 1e6
    row = {"stage": BASELINE, "runtime": "PyTorch fp32 pipeline", "size_mb": size}
    row.update(_percentiles(latencies_ms(lambda t: pipe(t), texts[: max(60, len(texts) // 3)], min(cfg.warmup, 10))))
    return {
        **row,
        "accuracy": None,
        "in_scope_accuracy": None,
        "oos_recall": None,
        "test_weighted_accuracy": None,
        "note": "random weights: accuracy not measured",
    }


def _metrics(report: dict[str, Any]) -> dict[str, Any]:
    t = report["thresholded"]
    return {
        "accuracy": t["accuracy"],
        "in_scope_accuracy": t["in_scope_accuracy"],
        "oos_recall": t["oos_recall"],
        "test_weighted_accuracy": t["test_weighted_accuracy"],
        "oos_rule": report.get("oos_rule", "max_prob"),
        "oos_threshold": report["oos_threshold"],
        "argmax_accuracy": report["argmax"]["accuracy"],
    }


def run(
    stages: list[tuple[str, str, Path]], data: Dataset, out: Path, cfg: BenchConfig, tokenizer_dir: Path
) -> list[dict[str, Any]]:
    """stages: (name, kind, path) with kind one of torch, onnx-fp32, onnx-int8, served."""
    texts = data.split("val").subset(cfg.latency_queries, cfg.seed).texts
    rows: list[dict[str, Any]] = []
    if cfg.baseline:
        rows.append(bench_baseline(texts, cfg, tokenizer_dir))
        log.info("%s", rows[-1])
    for name, kind, path in stages:
        if kind == "torch":
            rows.append(bench_torch(name, path, data, texts, cfg))
        elif kind == "served":
            rows.append(bench_served(path, data, cfg))
        else:
            rows.append(bench_onnx(name, path, data, texts, cfg, "ORT fp32" if kind == "onnx-fp32" else "ORT int8"))
        log.info("%s", rows[-1])
    base = rows[0] if cfg.baseline else None
    for row in rows:
        # By the median and by the mean: a cascade's median hides what its slow stage costs.
        row["speedup_vs_baseline"] = base["latency_ms_p50"] / row["latency_ms_p50"] if base else None
        row["speedup_mean_vs_baseline"] = base["latency_ms_mean"] / row["latency_ms_mean"] if base else None
    from app.cpu import measurement_context

    context = measurement_context()
    for row in rows:
        row["context"] = context
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(
        json.dumps({"context": context, "rows": rows, "config": vars(cfg)}, indent=2) + "\n"
    )
    (out / "benchmark.md").write_text(
        f"CPU: {context['cpu']}, onnxruntime {context['onnxruntime']}\n\n" + markdown(rows)
    )
    plot(rows, out / "benchmark.png")
    return rows


def _fmt(v: Any, digits: int = 3, unit: str = "") -> str:
    return "n/m" if v is None else f"{v:.{digits}f}{unit}"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| stage | runtime | size MB | p50 ms | mean ms | p99 ms | speed-up (p50) | speed-up (mean) | M multiply-adds "
        "| accuracy | in-scope | OOS recall | test-weighted |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['stage']} | {r['runtime']} | {r['size_mb']:.1f} | {r['latency_ms_p50']:.3f} "
        f"| {_fmt(r.get('latency_ms_mean'))} | {r['latency_ms_p99']:.3f} | {_fmt(r['speedup_vs_baseline'], 1, 'x')} "
        f"| {_fmt(r.get('speedup_mean_vs_baseline'), 1, 'x')} "
        f"| {_fmt(r['macs_per_query'] / 1e6 if r.get('macs_per_query') else None, 1)} | {_fmt(r['accuracy'])} "
        f"| {_fmt(r['in_scope_accuracy'])} | {_fmt(r['oos_recall'])} | {_fmt(r['test_weighted_accuracy'])} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r["test_weighted_accuracy"] is None:
            ax.axvline(r["latency_ms_p50"], linestyle="--", color="grey")
            ax.annotate(
                f"{r['stage']}\n(accuracy n/m)",
                (r["latency_ms_p50"], 0.5),
                fontsize=7,
                rotation=90,
                xycoords=("data", "axes fraction"),
                ha="right",
            )
            continue
        ax.scatter(r["latency_ms_p50"], r["test_weighted_accuracy"], s=max(20.0, r["size_mb"] * 4), alpha=0.5)
        ax.annotate(r["stage"], (r["latency_ms_p50"], r["test_weighted_accuracy"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 p50 latency, ms (log scale, 1 thread)")
    ax.set_ylabel("validation test-weighted accuracy")
    ax.set_title("CLINC150: accuracy against latency (point area ~ size on disk)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class Config:
    latency_queries: int = field(default=300, metadata={"help": "validation queries timed per stage"})
    baseline: bool = field(default=True, metadata={"help": "time the BERT-base pipeline baseline"})

    def __post_init__(self) -> None:
        # Refused here, before any stage runs: -1 was a traceback from the sampler, 0 one after every stage was timed.
        if self.latency_queries < 1:
            raise FactoryError(f"--latency-queries must be at least 1, got {self.latency_queries}")


def check(ctx: Any, cfg: Config) -> None:
    """Before any stage of the run: that --reports can be written (made if missing), not only when the benchmark
    has run."""
    reports = Path(ctx.reports)
    if (problem := dir_write_problem(reports)) is not None:
        raise FactoryError(f"--reports {reports} cannot be written: {problem}")
    reports.mkdir(parents=True, exist_ok=True)


def run_stage(ctx: Any, cfg: Config) -> None:
    from app.engine.artifact import read_card
    from compression.measure.metrics import bar_shortfalls, card_disagreements

    candidates: list[tuple[str, str, Path]] = [
        ("teacher", "torch", ctx.dir("teacher")),
        ("distilled student", "torch", ctx.dir("distill")),
        ("FFN-pruned student", "torch", ctx.dir("prune")),
        ("ONNX + ORT fusions", "onnx-fp32", ctx.dir("export")),
        ("int8 quantized", "onnx-int8", ctx.dir("quantize")),
        (f"served ({ctx.model_dir})", "served", ctx.model_dir),
    ]
    stages = [s for s in candidates if (s[2] / ("card.json" if s[1] == "served" else "run.json")).is_file()]
    bench = BenchConfig(latency_queries=cfg.latency_queries, seed=1, baseline=cfg.baseline)
    rows = run(stages, ctx.dataset, ctx.reports, bench, ctx.dir("teacher"))
    served = next((r for r in rows if r["stage"].startswith("served")), None)
    print(markdown(rows))
    if served is None:
        return
    _store_benchmark_row(ctx.model_dir, served)
    print(served_summary(served))
    clinc_oos_recall = _print_oos_pools(ctx.model_dir)
    differ = card_disagreements(served, read_card(ctx.model_dir).metrics.get("validation", {}))
    if differ:
        # The same files answering otherwise is a property of this machine: ONNX Runtime's int8 kernels saturate
        # on CPUs without VNNI unless the weights are stored as uint8 (compression.unsigned_weights).
        print(
            f"warning: on this CPU ({served['context']['cpu']}) {ctx.model_dir} answers validation otherwise than "
            f"its card records: {'; '.join(differ)}. If its graphs hold int8 weights, `python -m "
            f"compression.unsigned_weights {ctx.model_dir}` stores them as uint8, which every CPU multiplies exactly."
        )
    missed = bar_shortfalls(served, clinc_oos_recall)
    if not missed:
        pools = ", OOS recall on the 350" if clinc_oos_recall is not None else ""
        print(f"{ctx.model_dir} meets the accuracy bar (in-scope, OOS recall, test-weighted{pools}) on validation.")
    else:
        # Training is noisy near the bar, so a rebuild says plainly whether it cleared it, and how to undo a rebuild
        # of the committed model (only that one has a committed copy to restore).
        from app.config import DEFAULT_MODEL_DIR

        restore = ""
        if ctx.model_dir.resolve() == DEFAULT_MODEL_DIR:
            restore = f" `git checkout -- {ctx.model_dir}` restores the committed model."
        print(f"warning: {ctx.model_dir} is below the accuracy bar on validation: {'; '.join(missed)}.{restore}")


def served_summary(row: dict[str, Any]) -> str:
    """The served model's path in a few lines: its mean and tail beside the median, and who answers what."""
    shares = ", ".join(f"{name} {share:.1%}" for name, share in row["answered_by"].items())
    lines = [
        f"served model path ({row['latency_queries']} validation queries, one at a time, {row['context']['cpu']}): "
        f"p50 {row['latency_ms_p50']:.3f} ms, mean {row['latency_ms_mean']:.3f} ms, p99 {row['latency_ms_p99']:.3f} ms",
        f"answered by: {shares}; the neighbour test ran for {row['neighbour_test_share']:.1%} of the last stage's",
        f"multiply-adds per query: {row['macs_per_query'] / 1e6:.2f} M (median {row['median_tokens']} tokens)",
    ]
    if "weights" in row:  # rows from before 2026-12-05 do not say
        lines.append(f"weights: {row['weights']}")
    if row.get("speedup_mean_vs_baseline"):
        lines.append(
            f"against BERT-base fp32 in this run: {row['speedup_vs_baseline']:.0f}x by p50, "
            f"{row['speedup_mean_vs_baseline']:.0f}x by mean"
        )
    return "\n".join(lines)


def _print_oos_pools(model_dir: Path) -> float | None:
    """The served model's OOS figures on pools no stage trained on (compression.measure.pools), where it has them;
    returns the served path's recall on CLINC's 350 where that is the report pool."""
    from app.engine.artifact import read_card
    from compression.measure.pools import REPORT_POOL, markdown_table
    from compression.measure.report import describe_policy, threshold_policy

    metrics = read_card(model_dir).metrics
    pools = metrics.get("oos_pools")
    if not pools:
        return None
    print(f"\nOut-of-scope pools (each rule's threshold set to {describe_policy(threshold_policy(metrics))}):")
    print(markdown_table(pools))
    name = pools["report_pool"]
    served = pools["served"][name]
    low, high = served["oos_recall_95"]
    print(f"served OOS recall on {name}: {served['oos_recall']:.3f}, 95% interval [{low:.3f}, {high:.3f}]")
    return float(served["oos_recall"]) if name == REPORT_POOL else None


def _store_benchmark_row(model_dir: Path, row: dict[str, Any]) -> None:
    """The card carries its benchmark row; card.json is not hashed, so the artifact stays valid."""
    from app.engine.artifact import read_card
    from compression.stages.artifact import write_card

    write_card(model_dir, read_card(model_dir).model_copy(update={"benchmark": row}))
