"""`python -m compression.measure.kernel_bench`: ORT's fused SkipLayerNormalization against the Add + LayerNormalization
it replaces, one op on one thread, at a few query lengths. It is the measurement behind leaving the fusion
out of the export (onnx_runner.DISABLED_OPTIMIZERS); rerun it after an onnxruntime upgrade."""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN = 384


def _graph(fused: bool, hidden: int) -> bytes:
    params = [
        numpy_helper.from_array(np.ones(hidden, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(hidden, np.float32), "beta"),
    ]
    if fused:
        nodes = [
            helper.make_node(
                "SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["y"], domain="com.microsoft", epsilon=1e-12
            )
        ]
    else:
        nodes = [
            helper.make_node("Add", ["x", "skip"], ["sum"]),
            helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12),
        ]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "seq", hidden]) for n in ("x", "skip")]
    output = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "residual_layernorm", inputs, output, params)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return bytes(helper.make_model(graph, opset_imports=opsets).SerializeToString())


def time_us(fused: bool, tokens: int, runs: int, hidden: int = HIDDEN) -> float:
    """Median microseconds per session.run; graph rewrites off, so each graph runs as written."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(_graph(fused, hidden), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, tokens, hidden)).astype(np.float32)
    feed = {"x": x, "skip": x}
    for _ in range(max(10, runs // 10)):
        session.run(None, feed)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times[i] = time.perf_counter() - start
    return float(np.median(times) * 1e6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compression.measure.kernel_bench", description=__doc__)
    p.add_argument("--tokens", default="1,14,64", help="query lengths to time")
    p.add_argument("--runs", type=int, default=5000)
    a = p.parse_args(argv)
    print(f"onnxruntime {ort.__version__}, hidden {HIDDEN}, 1 thread, median us per call")
    print("| tokens | SkipLayerNormalization | Add + LayerNormalization | ratio |")
    print("|---|---|---|---|")
    for tokens in (int(t) for t in a.tokens.split(",")):
        fused, plain = time_us(True, tokens, a.runs), time_us(False, tokens, a.runs)
        print(f"| {tokens} | {fused:.1f} | {plain:.1f} | {fused / plain:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
