"""Multiply-adds counted from the ONNX graph agree with the architecture's formula."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compression.measure.macs import by_op, count, macs_per_query, main
from tests.conftest import MODEL_DIR


def committed_formula(n: int) -> int:
    """The committed transformer: MiniLM-L6 pruned (6 layers of hidden 384; 8 of 12 heads of 32, so attention
    256 wide; FFN 384 of 1536), the classifier with 151 labels, and the geometry head (384 -> 384)."""
    layers, hidden, width, ffn, labels = 6, 384, 8 * 32, 384, 151
    per_layer = (
        3 * n * hidden * width  # Q, K and V projections, to the kept heads
        + 2 * n * n * width  # scores Q·Kᵀ and context A·V, over the kept heads
        + n * width * hidden  # the output projection, back to the hidden size
        + 2 * n * hidden * ffn  # FFN up and down
    )
    heads = hidden * hidden + hidden * labels + hidden * hidden  # pooler, classifier, geometry head: one row each
    mean = n * hidden + n  # the embedding's masked sum over tokens, and the mask's count
    return layers * per_layer + heads + mean


@pytest.mark.parametrize("n", [11, 32])
def test_transformer_macs_match_the_formula(n: int) -> None:
    counted = macs_per_query(MODEL_DIR / "model.onnx", n)
    assert counted == pytest.approx(committed_formula(n), rel=0.01)


def test_committed_transformer_breakdown() -> None:
    nodes = count(MODEL_DIR / "model.onnx", 11)
    ops = by_op(nodes)
    # The quantized, fused graph (shapes came from the probe), and the embedding's mean over tokens.
    assert set(ops) == {"QAttention", "MatMulInteger", "ReduceSum"}
    n, hidden, width = 11, 384, 256
    assert ops["QAttention"] == 6 * (3 * n * hidden * width + 2 * n * n * width)
    assert ops["ReduceSum"] == n * hidden + n
    assert sum(ops.values()) == 46_145_291 == committed_formula(11)
    # One graph, nothing gated: the geometry head runs wherever the transformer does.
    assert not any(x.conditional for x in nodes)


def test_first_stage_macs_are_a_mean_and_a_one_hidden_layer_head() -> None:
    assert macs_per_query(MODEL_DIR / "static.onnx", 11) == 11 * 384 + 384 * 1024 + 1024 * 151


def save(
    tmp_path: Path,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[TensorProto],
    opset: int = 18,
) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def tensor(name: str, *shape: int, dtype: type = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.zeros(shape, dtype=dtype), name)


def ids_input(name: str = "input_ids") -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])


@pytest.mark.parametrize("opset", [13, 18])  # axes as an attribute, then as an input
def test_embedding_bag(tmp_path: Path, opset: int) -> None:
    vocab, d, labels = 50, 16, 7
    mean = (
        helper.make_node("ReduceMean", ["rows", "axis"], ["pooled"], keepdims=0)
        if opset >= 18
        else helper.make_node("ReduceMean", ["rows"], ["pooled"], axes=[1], keepdims=0)
    )
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["rows"]),
        mean,
        helper.make_node("MatMul", ["pooled", "weight"], ["scores"]),
        helper.make_node("Add", ["scores", "bias"], ["logits"]),
    ]
    inits = [tensor("table", vocab, d), tensor("weight", d, labels), tensor("bias", labels)]
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis"))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", labels])
    path = save(tmp_path, nodes, [ids_input()], [out], inits, opset)
    for n in (1, 11, 32):
        assert macs_per_query(path, n) == n * d + d * labels


def test_feature_axis_means_are_not_pooling(tmp_path: Path) -> None:
    """A decomposed LayerNorm's mean over features costs nothing, like a fused LayerNormalization."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("ReduceMean", ["x", "last"], ["mu"], keepdims=1),
        helper.make_node("Sub", ["x", "mu"], ["y"]),
    ]
    last = numpy_helper.from_array(np.array([-1], dtype=np.int64), "last")
    assert macs_per_query(save(tmp_path, nodes, [x], [y], [last]), 11) == 0


def test_gemm_and_batched_matmul(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),  # [1, n, 8] x [8, 4]: n·8·4
        helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),  # [1, 4, n]
        helper.make_node("MatMul", ["h", "ht"], ["scores"]),  # [1, n, 4] x [1, 4, n]: n·n·4
        helper.make_node("Gemm", ["w2", "w3"], ["y"], transA=1),  # [3, 2]ᵀ x [3, 5]: 2·5·3
    ]
    inits = [tensor("w1", 8, 4), tensor("w2", 3, 2), tensor("w3", 3, 5)]
    path = save(tmp_path, nodes, [x], [scores, y], inits)
    n = 5
    assert macs_per_query(path, n) == n * 8 * 4 + n * n * 4 + 2 * 5 * 3


def test_einsum_counts_the_contracted_letters(tmp_path: Path) -> None:
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", "sequence", 2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Einsum", ["q", "q"], ["y"], equation="bqhd,bkhd->bhqk")]
    n = 6
    assert macs_per_query(save(tmp_path, nodes, [q], [y], []), n) == 2 * n * n * 4


def test_fused_contrib_attention(tmp_path: Path) -> None:
    """com.microsoft Attention: ONNX shape inference cannot follow it, so ONNX Runtime's run gives the shapes."""
    hidden, heads = 8, 2
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", hidden])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Attention", ["x", "w", "b"], ["a"], domain="com.microsoft", num_heads=heads),
        helper.make_node("MatMul", ["a", "wo"], ["y"]),  # the output projection, after the fused op
    ]
    inits = [tensor("w", hidden, 3 * hidden), tensor("b", 3 * hidden), tensor("wo", hidden, hidden)]
    path = save(tmp_path, nodes, [x], [y], inits)
    n = 7
    assert macs_per_query(path, n) == 4 * n * hidden**2 + 2 * n * n * hidden


def test_cli_prints_the_total(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(MODEL_DIR / "model.onnx"), "--tokens", "11"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "46,145,291" in last
    assert "11-token" in last


def test_rejects_an_empty_query() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        macs_per_query(MODEL_DIR / "static.onnx", 0)
