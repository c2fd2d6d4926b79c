"""Stage 5: int8 quantisation for ONNX Runtime. Dynamic (per-tensor and per-channel weight scales) and
static QDQ are all built and measured (their speed in interleaved rounds); of those not measurably slower than
the fastest, the one whose logits stay closest to the fp32 graph's is kept.

Closest, not most accurate: quantisation should keep the model the earlier stages chose, and the candidates'
accuracies differ by a few validation queries, which is noise (two students' per-tensor graphs won on
test-weighted accuracy by 0.002 while their logits erred 2.5 to 5 times as much as per-channel ones,
docs/one-small-model.md). Fidelity is measured on in-scope validation and the held-out Wikipedia sentences, so
no real out-of-scope query chooses the graph."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compression.data import Dataset, Split
from compression.errors import FactoryError
from compression.measure.evaluate import validation_report
from compression.measure.latency import interleaved_p50_ms
from compression.measure.metrics import selection_score
from compression.measure.pools import TUNING_POOL, tuning_split
from compression.onnx_stage import OnnxStage
from compression.records import write_run
from compression.unsigned_weights import unsigned_weights

if TYPE_CHECKING:
    from compression.pipeline import Context

log = logging.getLogger(__name__)
LATENCY_QUERIES = 300
# Rounds of LATENCY_QUERIES each, the candidates taking turns (compression.measure.latency.interleaved_p50_ms).
LATENCY_ROUNDS = 7
# A candidate within this share of the fastest one's p50 counts as equally fast: run-to-run noise on
# these machines is about that large. Among equally fast candidates the most faithful to fp32 is kept.
LATENCY_TOLERANCE = 0.10


def dynamic(src: Path, dest: Path, per_channel: bool = False, op_types: list[str] | None = None) -> None:
    """int8 weights, stored as uint8 (compression.unsigned_weights: the same products on every CPU), activations
    quantised per run; `op_types` limits which ops (None: every op it can)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Fused graphs carry ops whose output type the quantiser cannot infer; FLOAT is the right default.
    quantize_dynamic(
        str(src),
        str(dest),
        op_types_to_quantize=op_types,
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    unsigned_weights(dest)


def static(src: Path, dest: Path, runner: OnnxStage, calibration: Split) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Calibration(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self, texts: list[str]) -> None:
            self.feeds = iter([runner.model.feed(runner.tokenizer.encode(t).ids) for t in texts])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(
        str(src),
        str(dest),
        Calibration(calibration.texts),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        # Only the big matrices: calibrating the pooler's bias path fails, and it is a small share of the time.
        op_types_to_quantize=["MatMul"],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    unsigned_weights(dest)


def measure(runner: OnnxStage, data: Dataset, fidelity: Split, reference: np.ndarray) -> dict[str, Any]:
    """Validation scores as for every stage, and the mean squared error of the logits on `fidelity` to
    `reference`, the fp32 graph's logits there."""
    val = data.split("val")
    report = validation_report(runner.logits(val.texts), np.array(val.label_ids(data.labels)), data.labels)
    report["logit_mse_to_fp32"] = float(((runner.logits(fidelity.texts) - reference) ** 2).mean())
    return report


def choose(results: dict[str, dict[str, Any]]) -> str:
    """The candidate closest to the fp32 graph among those within LATENCY_TOLERANCE of the fastest; ties go to
    the more accurate (compression.measure.metrics.selection_score), then to speed."""
    fastest = min(r["latency_ms_p50"] for r in results.values())
    fast = [n for n, r in results.items() if r["latency_ms_p50"] <= fastest * (1 + LATENCY_TOLERANCE)]
    return min(
        fast,
        key=lambda n: (results[n]["logit_mse_to_fp32"], -selection_score(results[n]), results[n]["latency_ms_p50"]),
    )


def run(
    export_dir: Path, data: Dataset, wiki: str, out: Path, calibration_n: int = 300, seed: int = 42
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    src, tokenizer = export_dir / "model.onnx", export_dir / "tokenizer.json"
    if not src.is_file():
        raise FactoryError(f"no ONNX model at {src} (run the export stage first)")
    candidates = {
        "dynamic": out / "model.dynamic.onnx",
        "dynamic_per_channel": out / "model.dynamic_per_channel.onnx",
        "static_qdq": out / "model.static.onnx",
    }
    dynamic(src, candidates["dynamic"])
    dynamic(src, candidates["dynamic_per_channel"], per_channel=True)
    calib = data.split("train").subset(calibration_n, seed)
    static(src, candidates["static_qdq"], OnnxStage(src, tokenizer), calib)
    fidelity = tuning_split(data, wiki)
    reference = OnnxStage(src, tokenizer).logits(fidelity.texts)
    runners = {name: OnnxStage(path, tokenizer, threads=1) for name, path in candidates.items()}
    results = {name: measure(runner, data, fidelity, reference) for name, runner in runners.items()}
    timed = data.split("val").subset(LATENCY_QUERIES, seed=1).texts
    p50 = interleaved_p50_ms({name: runner.logits_one for name, runner in runners.items()}, timed, LATENCY_ROUNDS)
    for name, path in candidates.items():
        results[name]["latency_ms_p50"] = p50[name]
        results[name]["size_mb"] = path.stat().st_size / 1e6
    for name, r in results.items():
        log.info(
            "%s: p50 %.3f ms, logit MSE to fp32 %.5f, accuracy %.4f",
            name,
            r["latency_ms_p50"],
            r["logit_mse_to_fp32"],
            selection_score(r),
        )
    chosen = choose(results)
    shutil.copy(candidates[chosen], out / "model.onnx")
    for name in ("tokenizer.json", "labels.json"):
        shutil.copy(export_dir / name, out / name)
    report = {"chosen": chosen, "candidates": results, **results[chosen]}
    config = {
        "calibration_n": calibration_n,
        "seed": seed,
        "latency_tolerance": LATENCY_TOLERANCE,
        "latency": f"p50 over {LATENCY_QUERIES} validation queries, median of {LATENCY_ROUNDS} interleaved rounds",
        "chosen_by": f"logit MSE to the fp32 graph on in-scope validation and {TUNING_POOL}",
    }
    write_run(out, "quantize", config, report)
    return report


@dataclass
class Config:
    calibration_queries: int = field(default=300, metadata={"help": "training queries for static calibration"})


def run_stage(ctx: Context, cfg: Config) -> None:
    run(ctx.dir("export"), ctx.dataset, str(ctx.wiki), ctx.dir("quantize"), cfg.calibration_queries, ctx.seed)
