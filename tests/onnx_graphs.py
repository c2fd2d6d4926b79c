"""Small ONNX graphs the tests build by hand, and one way to run them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper, numpy_helper

from compression.unsigned_weights import SHIFT, WEIGHT_INPUTS


def save_graph(path: Path, nodes: list, inits: list, inputs: list, outputs: list) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _matmul(weights: np.ndarray, zero: np.ndarray | None) -> tuple[list, list]:
    """A MatMulInteger of input `a` by the initializer `weights` ("w"), with its zero point ("wz") if given."""
    inits = [numpy_helper.from_array(weights, "w")]
    inputs = ["a", "w"]
    if zero is not None:
        inits.append(numpy_helper.from_array(zero, "wz"))
        inputs += ["", "wz"]
    return [helper.make_node("MatMulInteger", inputs, ["y"])], inits


def matmul_integer(path: Path, weights: np.ndarray, zero: np.ndarray | None = None) -> Path:
    """One MatMulInteger: uint8 input `a` [n, K] times the int8 initializer `weights` [K, N], with its zero point."""
    nodes, inits = _matmul(weights, zero)
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [None, weights.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [None, weights.shape[1]])
    return save_graph(path, nodes, inits, [a], [y])


def shared_table(path: Path, weights: np.ndarray, zero: np.ndarray | None = None) -> Path:
    """A weight table read twice: by a MatMulInteger (with its zero point, if given) and by a Gather."""
    nodes, inits = _matmul(weights, zero)
    nodes.append(helper.make_node("Gather", ["w", "i"], ["g"]))
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.UINT8, [1, weights.shape[0]]),
        helper.make_tensor_value_info("i", TensorProto.INT64, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.INT32, [1, weights.shape[1]]),
        helper.make_tensor_value_info("g", helper.np_dtype_to_tensor_dtype(weights.dtype), [1, weights.shape[1]]),
    ]
    return save_graph(path, nodes, inits, inputs, outputs)


def run_graph(path: Path, **feeds: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def signed_weights(model: ModelProto) -> ModelProto:
    """The inverse of compression.unsigned_weights, with the onnx package: each uint8 weight an op in its
    WEIGHT_INPUTS multiplies by, and its zero point, back to int8 (what the factory wrote before it stored uint8)."""
    for node in model.graph.node:
        if node.op_type in WEIGHT_INPUTS:
            for name in (node.input[i] for i in WEIGHT_INPUTS[node.op_type]):
                tensor = next(t for t in model.graph.initializer if t.name == name)
                if tensor.data_type == TensorProto.UINT8:
                    values = numpy_helper.to_array(tensor).astype(np.int16) - SHIFT
                    tensor.CopyFrom(numpy_helper.from_array(values.astype(np.int8), name))
    return model
