"""int8 weights stored as uint8 (compression.unsigned_weights): exact integer products on every CPU, the same
numbers as before, and a served directory rewritten whole or not at all."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.engine.artifact import load_artifact, sha256_file
from compression.unsigned_weights import SHIFT, WEIGHT_INPUTS, main, rewrite_served, unsigned_weights
from tests.conftest import MODEL_DIR
from tests.onnx_graphs import matmul_integer, run_graph, save_graph, shared_table, signed_weights


@pytest.mark.parametrize("zero", [None, np.array(3, dtype=np.int8), np.arange(-2, 6, dtype=np.int8)])
def test_products_are_exact_where_int8_ones_saturate(tmp_path: Path, zero: np.ndarray | None) -> None:
    """Activations of 255 against weights of 127 in pairs: 2 x 255 x 127 = 64,770 passes int16, which is where
    vpmaddubsw (CPUs without VNNI) clips. The rewritten graph gives numpy's exact int32 product on this CPU."""
    rng = np.random.default_rng(0)
    weights = rng.integers(-127, 128, size=(64, 8)).astype(np.int8)
    weights[:, 0] = 127
    a = rng.integers(0, 256, size=(5, 64)).astype(np.uint8)
    a[0] = 255
    path = matmul_integer(tmp_path / "m.onnx", weights, zero)
    assert unsigned_weights(path) == 1
    z = np.zeros(8, np.int32) if zero is None else zero.astype(np.int32)
    exact = a.astype(np.int32) @ (weights.astype(np.int32) - z)
    assert exact[0, 0] > 2 * 32767  # the case that saturates, not only its neighbours
    assert np.array_equal(run_graph(path, a=a), exact)
    graph = onnx.load(str(path)).graph
    stored = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert stored["w"].dtype == np.uint8
    assert np.array_equal(stored["w"].astype(np.int32) - SHIFT, weights)
    zero_name = graph.node[0].input[WEIGHT_INPUTS["MatMulInteger"][1]]
    assert stored[zero_name].dtype == np.uint8
    assert np.array_equal(stored[zero_name].astype(np.int32) - SHIFT, z if zero is not None else 0)


def test_a_per_axis_dequantize_without_zero_point_keeps_its_values(tmp_path: Path) -> None:
    weights = np.array([[-128, 127, 0], [5, -5, 64]], dtype=np.int8)
    scale = np.array([0.5, 0.25, 2.0], dtype=np.float32)
    node = helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=1)
    inits = [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(scale, "s")]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    path = save_graph(tmp_path / "dq.onnx", [node], inits, [], [y])
    before = run_graph(path)
    assert unsigned_weights(path) == 1
    assert np.array_equal(run_graph(path), before)
    assert np.array_equal(before, weights.astype(np.float32) * scale)


def test_a_table_read_by_another_op_is_refused_and_the_file_is_untouched(tmp_path: Path) -> None:
    path = shared_table(tmp_path / "mixed.onnx", np.ones((4, 4), dtype=np.int8))
    before = path.read_bytes()
    with pytest.raises(ValueError, match="read both as weights and otherwise"):
        unsigned_weights(path)
    assert path.read_bytes() == before


def test_the_committed_graphs_multiply_by_uint8_weights_only() -> None:
    """Every weight input of every op in WEIGHT_INPUTS in the served files is uint8, and none is int8."""
    spec = load_artifact(MODEL_DIR).card.spec
    seen = 0
    for stage in spec.stages:
        graph = onnx.load(str(MODEL_DIR / stage.file)).graph
        types = {t.name: t.data_type for t in graph.initializer}
        for node in graph.node:
            if node.op_type in WEIGHT_INPUTS:
                weight = node.input[WEIGHT_INPUTS[node.op_type][0]]
                assert types[weight] == TensorProto.UINT8, (stage.file, node.name)
                seen += 1
    assert seen == 29  # the transformer's 6 QAttention and 21 MatMulInteger, the first stage's 2 MatMulInteger
    assert unsigned_weights(MODEL_DIR / spec.stages[0].file) == 0  # and nothing is left to rewrite


def test_a_signed_served_model_is_rewritten_into_the_committed_files(tmp_path: Path) -> None:
    """The committed model's graphs made signed again, then rewritten: byte for byte the committed files, and a
    card with their hashes, a new version and the change in its history."""
    model = tmp_path / "model"
    shutil.copytree(MODEL_DIR, model)
    for name in ("model.onnx", "static.onnx"):
        onnx.save(signed_weights(onnx.load(str(model / name))), str(model / name))
    card = json.loads((model / "card.json").read_text())
    for name in ("model.onnx", "static.onnx"):
        card["files"][name]["sha256"] = sha256_file(model / name)
        card["files"][name]["bytes"] = (model / name).stat().st_size
    old_version = card["version"] = "2026.01.01-signed00"
    (model / "card.json").write_text(json.dumps(card))

    assert rewrite_served(model) == {"static.onnx": 2, "model.onnx": 27}
    for name in ("model.onnx", "static.onnx"):
        assert (model / name).read_bytes() == (MODEL_DIR / name).read_bytes()
    rewritten = load_artifact(model).card  # verifies every file against the new card
    committed = load_artifact(MODEL_DIR).card
    assert rewritten.files == committed.files
    assert rewritten.version.endswith(committed.version.split("-")[1])
    change = rewritten.provenance.history[-1]
    assert change["from_version"] == old_version
    assert change["weights_rewritten"] == {"static.onnx": 2, "model.onnx": 27}
    assert rewritten.benchmark == {}
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in MODEL_DIR.iterdir())
    assert rewrite_served(model) == {}  # a second run finds nothing to do


def test_the_command_reports_a_bad_directory_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: model directory not found: {tmp_path / 'absent'}\n"
