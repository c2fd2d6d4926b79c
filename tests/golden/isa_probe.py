"""Run in a child process by tests/test_isa_answers.py, under docs/avx2-emulation/: which onnxruntime it imported,
whether that onnxruntime's int8 kernel saturates (it does with the AVX2 kernels) and its uint8 one does not, and
the committed model's decisions on the golden pools. Prints one JSON object."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compression.unsigned_weights import unsigned_weights
from tests.golden.write import decisions


def matmul_is_exact(weight_type: str) -> bool:
    """A MatMulInteger whose pairs of products pass int16 (255 x 127, twice), against numpy's exact product."""
    weights = np.full((64, 4), 127, dtype=np.int8)
    activations = np.full((1, 64), 255, dtype=np.uint8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 4])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save(model, str(path))
        if weight_type == "uint8":
            unsigned_weights(path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"a": activations})[0]
    return bool(np.array_equal(got, activations.astype(np.int32) @ weights.astype(np.int32)))


def main() -> None:
    report = {
        "onnxruntime": ort.__file__,
        "int8_exact": matmul_is_exact("int8"),
        "uint8_exact": matmul_is_exact("uint8"),
        "decisions": decisions(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
