"""Run in a child process by tests/test_isa_answers.py, under docs/avx2-emulation/: which onnxruntime it imported,
whether that onnxruntime's int8 kernel saturates (it does with the AVX2 kernels) and its uint8 one does not, and
the committed model's decisions on the golden pools. Prints one JSON object."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compression.unsigned_weights import unsigned_weights
from tests.golden.write import decisions
from tests.onnx_graphs import matmul_integer, run_graph


def matmul_is_exact(weight_type: str) -> bool:
    """A MatMulInteger whose pairs of products pass int16 (255 x 127, twice), against numpy's exact product."""
    weights = np.full((64, 4), 127, dtype=np.int8)
    activations = np.full((1, 64), 255, dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        path = matmul_integer(Path(tmp) / "probe.onnx", weights)
        if weight_type == "uint8":
            unsigned_weights(path)
        got = run_graph(path, a=activations)
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
