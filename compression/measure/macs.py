"""Multiply-adds for one query of n tokens through an ONNX classifier, counted from its graph: the cost figure
that does not change from machine to machine (latency does: an int8 product is about 4x cheaper on a CPU with
VNNI than on an AVX2-only one; see app.cpu).

The graph's inputs are fixed at batch 1 and n tokens and every tensor's shape is inferred: by ONNX shape
inference where it can, and, for the tensors it cannot follow (the contrib ops of a fused, quantized graph:
QEmbedLayerNormalization, QAttention...), by running the graph once on ONNX Runtime with optimizations off
and reading the shapes it produces. Then:

- a matrix product (MatMul, Gemm, MatMulInteger, MatMulIntegerToFloat, DynamicQuantizeMatMul, FusedMatMul,
  QLinearMatMul, MatMulNBits, Einsum) costs (elements of its output) x (its inner dimension K);
- a fused attention (com.microsoft Attention / QAttention) costs its Q, K, V projections as a product, plus
  n·L·(d_q + d_v) for the scores and the context (2·n²·H when L = n and d_q = d_v = H);
  MultiHeadAttention and ONNX's own Attention cost the scores and context only (their projections are
  separate MatMuls);
- a mean or sum over tokens (the pooling of an embedding-bag classifier, whose axes keep the feature axis)
  costs one addition per input element: n·d. Reductions over the feature axis (a decomposed LayerNorm)
  count nothing, as a fused LayerNormalization does not;
- an If (the gated sentence encoder of compression.graphs.gate_encoder_output) costs its then-branch, as
  if taken: its nodes are counted as `conditional`, so that a caller can weigh them by how often it runs.

    python -m compression.measure.macs models/clinc150/model.onnx --tokens 11
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

Shape = tuple[int, ...]

MATMULS = frozenset(
    {
        "MatMul",
        "Gemm",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "FusedMatMul",
        "QLinearMatMul",
        "MatMulNBits",
        "MatMulInteger16",
        "Einsum",
    }
)
PROJECTED_ATTENTION = frozenset({"Attention", "QAttention"})  # com.microsoft: the QKV projection is inside
ATTENTION = frozenset({"MultiHeadAttention"})  # com.microsoft, and ONNX's own Attention: scores and context only
POOLING = frozenset({"ReduceMean", "ReduceSum"})
CONTRIB = "com.microsoft"


@dataclass(frozen=True)
class NodeMacs:
    name: str
    op_type: str
    macs: int
    conditional: bool = False  # inside an If: run only when its condition holds


def macs_per_query(onnx_path: Path | str, seq_len: int) -> int:
    """Multiply-adds for one query of `seq_len` tokens ([CLS] and [SEP] included), batch 1."""
    return sum(n.macs for n in count(onnx_path, seq_len))


def count(onnx_path: Path | str, seq_len: int) -> list[NodeMacs]:
    """The nodes that cost anything, with their multiply-adds, in graph order."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, not {seq_len}")
    model = onnx.load(str(onnx_path))
    conditional = inline_conditionals(model.graph)
    fix_inputs(model.graph, seq_len)
    graph = model.graph
    shapes = static_shapes(model)
    costed = [n for n in graph.node if _costs(n)]
    missing = {t for n in costed for t in _needed(n) if t not in shapes}
    if missing:
        shapes.update(probe_shapes(model, missing))
    constants = _constants(graph)
    out = []
    for node in costed:
        unknown = [t for t in _needed(node) if t not in shapes]
        if unknown:
            raise ValueError(f"{node.op_type} node {node.name!r}: no shape for {unknown}")
        macs = _node_macs(node, shapes, constants)
        if macs:
            out.append(NodeMacs(node.name or node.output[0], node.op_type, macs, node.output[0] in conditional))
    return out


def inline_conditionals(graph: onnx.GraphProto) -> set[str]:
    """Replace every If by its then-branch's nodes (and an Identity to the If's output), as if the branch were
    taken; returns the first outputs of the nodes that came from a branch."""
    from onnx import helper

    inlined: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "If":
            nodes.append(node)
            continue
        branch = next(a.g for a in node.attribute if a.name == "then_branch")
        for inner in branch.node:
            nodes.append(inner)
            inlined.add(inner.output[0])
        for src, dest in zip(branch.output, node.output, strict=True):
            nodes.append(helper.make_node("Identity", [src.name], [dest]))
    del graph.node[:]
    graph.node.extend(nodes)
    return inlined


def fix_inputs(graph: onnx.GraphProto, seq_len: int) -> None:
    """Symbolic input dimensions become batch 1 (the first of a rank >= 2 input) and `seq_len` (the others)."""
    initializers = {i.name for i in graph.initializer}
    for value in graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        for i, dim in enumerate(dims):
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = 1 if i == 0 and len(dims) > 1 else seq_len


def static_shapes(model: onnx.ModelProto) -> dict[str, Shape]:
    """Every tensor whose shape ONNX shape inference can pin down to numbers."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - an op it cannot check: the runtime probe covers what is left
        inferred = model
    graph = inferred.graph
    shapes: dict[str, Shape] = {i.name: tuple(i.dims) for i in graph.initializer}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        shape = _concrete(value)
        if shape is not None:
            shapes.setdefault(value.name, shape)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    return shapes


def probe_shapes(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, Shape]:
    """The shapes ONNX Runtime gives `names` in one run of the graph, on zeros (ones for masks), with its
    graph optimizations off so that every node is run as written."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    wanted = sorted(set(names))
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted if n not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {}
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        shape = _concrete(value)
        if shape is None:
            raise ValueError(f"input {value.name!r} has no fixed shape")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feed[value.name] = (np.ones if "mask" in value.name.lower() else np.zeros)(shape, dtype=dtype)
    results = session.run(wanted, feed)
    return {name: tuple(np.shape(r)) for name, r in zip(wanted, results, strict=True)}


def _concrete(value: onnx.ValueInfoProto) -> Shape | None:
    t = value.type.tensor_type
    if not t.HasField("shape") or not all(d.HasField("dim_value") for d in t.shape.dim):
        return None
    return tuple(d.dim_value for d in t.shape.dim)


def _costs(node: onnx.NodeProto) -> bool:
    if node.op_type in POOLING:
        return True
    if node.op_type == "Attention":
        return True  # com.microsoft (with projections) or ai.onnx (without): told apart by domain
    if node.op_type == "Einsum":
        return len(node.input) >= 2
    return node.op_type in MATMULS | PROJECTED_ATTENTION | ATTENTION


def _needed(node: onnx.NodeProto) -> list[str]:
    """The tensors whose shapes the node's cost depends on."""
    if node.op_type in POOLING:
        return [node.input[0], node.output[0]]
    if node.op_type in PROJECTED_ATTENTION and node.domain == CONTRIB:
        return [node.input[0], node.input[1]]
    if node.op_type in ATTENTION or node.op_type == "Attention":
        return [t for t in node.input[:2] if t] + [node.output[0]]
    if node.op_type == "Einsum":
        return [*node.input, node.output[0]]
    return [node.input[0], node.output[0]]


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer if len(i.dims) <= 1}


def _node_macs(node: onnx.NodeProto, shapes: dict[str, Shape], constants: dict[str, np.ndarray]) -> int:
    shape = shapes.__getitem__
    op = node.op_type
    if op in POOLING:
        return _pooling(node, shape(node.input[0]), constants)
    if op in PROJECTED_ATTENTION and node.domain == CONTRIB:
        return _projected_attention(node, shape(node.input[0]), shape(node.input[1]))
    if op in ATTENTION or op == "Attention":
        key = shape(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        return _attention(shape(node.input[0]), key, shape(node.output[0]))
    if op == "Einsum":
        equation = _attr(node, "equation", b"")
        text = equation.decode() if isinstance(equation, bytes) else str(equation)
        return _einsum(text, [shape(i) for i in node.input], shape(node.output[0]))
    a, out = shape(node.input[0]), shape(node.output[0])
    k_attr = _attr(node, "K")
    if op == "MatMulNBits" and isinstance(k_attr, int):
        k = k_attr
    elif op == "Gemm":
        k = a[0] if _attr(node, "transA", 0) else a[-1]
    elif op == "FusedMatMul" and _attr(node, "transA", 0):
        k = a[-2]
    else:
        k = a[-1]
    return math.prod(out) * k


def _projected_attention(node: onnx.NodeProto, x: Shape, weight: Shape) -> int:
    """x [B, S, D_in] through weight [D_in, D_q + D_k + D_v], then softmax(Q Kᵀ) V per head."""
    tokens = math.prod(x[:-1])
    sizes = _attr(node, "qkv_hidden_sizes")
    d_q, _, d_v = (int(s) for s in sizes) if isinstance(sizes, Sequence) and sizes else (weight[-1] // 3,) * 3
    length = x[-2] if len(x) >= 2 else 1  # keys: the same tokens (no past state in a classifier)
    return tokens * x[-1] * weight[-1] + tokens * length * (d_q + d_v)


def _attention(query: Shape, key: Shape | None, out: Shape) -> int:
    """Scores and context: (query elements) x L + (output elements) x L, L being the keys' length."""
    if len(query) == 5:  # packed QKV [B, S, N, 3, H]: the query is a third of it
        q_elements = math.prod(query) // 3
        length = query[1]
    else:
        q_elements = math.prod(query)
        length = query[-2] if len(query) == 4 else query[1]
    if key is not None and len(key) in (3, 4):
        length = key[1] if len(key) == 3 else key[2]
    return (q_elements + math.prod(out)) * length


def _einsum(equation: str, inputs: list[Shape], out: Shape) -> int:
    """(output elements) x (the sizes of the letters summed over)."""
    lhs, _, rhs = equation.replace(" ", "").partition("->")
    sizes: dict[str, int] = {}
    for term, shape in zip(lhs.split(","), inputs, strict=True):
        head, dots, tail = term.partition("...")
        for letter, size in zip(head, shape, strict=False):
            sizes[letter] = size
        if dots and tail:
            for letter, size in zip(tail, shape[-len(tail) :], strict=True):
                sizes[letter] = size
    kept = set(rhs) if "->" in equation else {c for c in sizes if lhs.count(c) == 1}
    return math.prod(out) * math.prod(size for letter, size in sizes.items() if letter not in kept)


def _pooling(node: onnx.NodeProto, x: Shape, constants: dict[str, np.ndarray]) -> int:
    """n·d additions for a mean or sum over tokens; nothing for one over features (a LayerNorm's statistics)."""
    axes = _attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1] in constants:
        axes = constants[node.input[1]].tolist()
    if axes is None or not x:
        return 0  # every axis, the feature axis included
    rank = len(x)
    reduced = {int(a) % rank for a in np.atleast_1d(np.asarray(axes, dtype=np.int64))}
    return 0 if rank - 1 in reduced else math.prod(x)


def by_op(nodes: Iterable[NodeMacs]) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for n in nodes:
        totals[n.op_type] += n.macs
    return dict(totals)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m compression.measure.macs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", type=Path)
    p.add_argument("--tokens", type=int, default=11, help="tokens in the query, [CLS] and [SEP] included")
    p.add_argument("--nodes", action="store_true", help="list every node that costs anything")
    a = p.parse_args(argv)
    nodes = count(a.model, a.tokens)
    if a.nodes:
        for n in nodes:
            print(f"{n.macs:>14,}  {n.op_type:<24} {n.name}")
    for op, macs in sorted(by_op(nodes).items(), key=lambda kv: -kv[1]):
        print(f"{macs:>14,}  {op}")
    total = sum(n.macs for n in nodes)
    print(f"{total:>14,}  multiply-adds for one {a.tokens}-token query ({total / 1e6:.2f} M)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
