"""Run in a child process by tests/test_isa_answers.py, under docs/avx2-emulation/: which onnxruntime it imported,
whether that onnxruntime's int8 kernel saturates (it does with the AVX2 kernels) and its uint8 one does not, what
the engine's own probe said (app.engine.signed_weights), and either the committed model's decisions on the golden
pools or (`outputs`) whether each committed graph flipped to int8 gives the stored graph's outputs, bit for bit.
Prints one JSON object."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.engine.signed_weights import signed_products_exact
from compression.unsigned_weights import unsigned_weights
from tests.conftest import MODEL_DIR
from tests.golden.write import decisions, golden_texts
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


def flipped_outputs(texts: list[str]) -> dict[str, Any]:
    """What the engine loaded (its `weights`) and, per committed graph, on how many of `texts` its graph gives
    the stored file's every output bit for bit, of how many."""
    from app.engine.engine import Engine
    from app.engine.onnx import session_options
    from app.engine.spec import TransformerStage

    engine = Engine.open(MODEL_DIR)
    encodings = engine.encode(texts)
    counts: dict[str, Any] = {"weights": engine.weights}
    for stage, model in zip(engine.spec.stages, engine.models, strict=True):
        disabled = stage.ort_disabled_optimizers if isinstance(stage, TransformerStage) else []
        stored = ort.InferenceSession(str(MODEL_DIR / stage.file), session_options(1, 1), disabled_optimizers=disabled)
        same = 0
        for encoding in encodings:
            feed = model.feed(encoding.ids)
            ours, theirs = model.session.run(model.outputs, feed), stored.run(model.outputs, feed)
            same += all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True))
        counts[stage.file] = [same, len(encodings)]
    return counts


def main() -> None:
    report = {
        "onnxruntime": ort.__file__,
        "int8_exact": matmul_is_exact("int8"),
        "uint8_exact": matmul_is_exact("uint8"),
        "signed_products_exact": signed_products_exact(),
    }
    if sys.argv[1:] == ["outputs"]:
        report["flipped_outputs"] = flipped_outputs(golden_texts()[::18])  # 298 across the three pools
    else:
        report["decisions"] = decisions()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
