"""Multiply-adds for one query of n tokens through an ONNX classifier, counted from its graph: the cost figure
that does not change from machine to machine.

Every matrix product with a 2-D weight counts rows × K × N, where rows is n for per-token work and 1 after the
sequence is pooled (a Gather from activations, as BERT's pooler takes [CLS], or a ReduceMean). A fused
attention adds 2 · n² · H for its scores and context; a ReduceMean pool adds n · d additions.

    python -m compression.macs models/clinc150/model.onnx --tokens 11
"""

from __future__ import annotations

import argparse
from pathlib import Path

MATMULS = {"MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "FusedMatMul", "Gemm"}
ATTENTION = {"Attention", "QAttention"}


def macs_per_query(path: Path, tokens: int) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name: list(i.dims) for i in graph.initializer}
    pooled: set[str] = set()  # tensors that hold one row per query, not one per token
    total = 0
    for node in graph.node:  # ONNX graphs are stored in topological order
        after_pool = any(i in pooled for i in node.input)
        if node.op_type == "ReduceMean" or (node.op_type == "Gather" and node.input[0] not in weights):
            if node.op_type == "ReduceMean":
                dims = _width(node.input[0], graph, weights)
                total += tokens * dims
            pooled.update(node.output)
            continue
        if after_pool:
            pooled.update(node.output)
        rows = 1 if after_pool else tokens
        two_d = [weights[i] for i in node.input if i in weights and len(weights[i]) == 2]
        if node.op_type in MATMULS | ATTENTION and two_d:
            k, n = two_d[0]
            total += rows * k * n
            if node.op_type in ATTENTION:
                total += 2 * tokens * tokens * (n // 3)
    return total


def _width(tensor: str, graph: object, weights: dict[str, list[int]]) -> int:
    """Width of an embedding lookup's rows: the table's second dimension."""
    for node in graph.node:  # type: ignore[attr-defined]
        if tensor in node.output:
            for i in node.input:
                if i in weights and len(weights[i]) == 2:
                    return weights[i][1]
            return _width(node.input[0], graph, weights)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compression.macs", description=__doc__)
    p.add_argument("model", type=Path)
    p.add_argument("--tokens", type=int, default=11, help="tokens in the query, [CLS] and [SEP] included")
    a = p.parse_args(argv)
    print(f"{macs_per_query(a.model, a.tokens):,} multiply-adds for a {a.tokens}-token query")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
