"""The cascade's first stage as the factory writes it: the ONNX graph computes the head that was trained."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from app.engine.onnx import OnnxModel
from compression.errors import FactoryError
from compression.stages.static import (
    TABLE_TYPES,
    Config,
    Dense,
    _gelu,
    head_logits,
    quantize_rows,
    stored_table,
    write_onnx,
)


def _layers(rng: np.random.Generator, sizes: list[int]) -> list[Dense]:
    return [
        Dense(rng.normal(size=(a, b)).astype(np.float32), rng.normal(size=b).astype(np.float32))
        for a, b in itertools.pairwise(sizes)
    ]


@pytest.mark.parametrize("table_type", TABLE_TYPES)
@pytest.mark.parametrize("sizes", [[8, 5], [8, 16, 5]], ids=["linear", "gelu-hidden"])
def test_graph_is_the_mean_of_token_rows_through_the_head(tmp_path: Path, sizes: list[int], table_type: str) -> None:
    rng = np.random.default_rng(0)
    table = rng.normal(size=(30, sizes[0])).astype(np.float32)
    table[4] = 0.0  # an all-zero row (a token never trained) quantises to zeros
    dense = _layers(rng, sizes)
    path = tmp_path / "static.onnx"
    write_onnx(path, table, dense, table_type)
    session = OnnxModel(path, ["logits"])
    stored = stored_table(table, table_type)  # what the graph holds, in fp32
    for ids in ([3], [1, 2, 29], [7, 7, 0, 12, 5], [4]):
        expected = head_logits(stored[ids].mean(0, keepdims=True), dense)[0]
        np.testing.assert_allclose(session.run(ids)[0], expected, rtol=1e-5, atol=1e-5)


def _dynamic_int8_head(pooled: np.ndarray, dense: list[Dense]) -> np.ndarray:
    """The int8 head recomputed: per query, the activations quantised to uint8 over [min(0, x), max(0, x)]
    (ONNX's DynamicQuantizeLinear); the weights symmetric int8 per output column (scale max|w| / 127); the integer
    product scaled back, then the bias; GELU between layers as in fp32."""
    x = pooled.astype(np.float32)
    for i, layer in enumerate(dense):
        lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
        sx = np.float32((hi - lo) / 255.0)
        zx = np.clip(np.round(-lo / sx), 0, 255)
        xq = np.clip(np.round(x / sx) + zx, 0, 255)
        sw = (np.abs(layer.weight).max(axis=0) / 127.0).astype(np.float32)
        wq = np.clip(np.round(layer.weight / sw), -127, 127)
        x = ((xq - zx) @ wq).astype(np.float32) * (sx * sw) + layer.bias
        if i < len(dense) - 1:
            x = _gelu(x)
    return x


@pytest.mark.parametrize("table_type", TABLE_TYPES)
@pytest.mark.parametrize("sizes", [[8, 5], [8, 16, 5]], ids=["linear", "gelu-hidden"])
def test_an_int8_head_computes_the_dynamically_quantised_products(
    tmp_path: Path, sizes: list[int], table_type: str
) -> None:
    rng = np.random.default_rng(1)
    table = rng.normal(size=(30, sizes[0])).astype(np.float32)
    dense = _layers(rng, sizes)
    write_onnx(tmp_path / "int8.onnx", table, dense, table_type, "int8")
    session = OnnxModel(tmp_path / "int8.onnx", ["logits"])
    stored = stored_table(table, table_type)
    for ids in ([3], [1, 2, 29], [7, 7, 0, 12, 5]):
        pooled = stored[ids].mean(0, keepdims=True)
        got = session.run(ids)[0]
        np.testing.assert_allclose(got, _dynamic_int8_head(pooled, dense)[0], rtol=1e-4, atol=1e-4)
        assert not np.allclose(got, head_logits(pooled, dense)[0], rtol=1e-5, atol=1e-5)  # it is not the fp32 head
    # Every weight matrix is stored in 8 bits (a quarter of its fp32 bytes), as uint8 (compression.unsigned_weights),
    # and nothing else was quantised: the table's row scales stay fp32.
    import onnx
    from onnx import numpy_helper

    stored_dtypes = {
        i.name: numpy_helper.to_array(i).dtype for i in onnx.load(str(tmp_path / "int8.onnx")).graph.initializer
    }
    for i in range(len(dense)):
        assert (stored_dtypes[f"weight{i}_quantized"], f"weight{i}" in stored_dtypes) == (np.uint8, False)
    if table_type == "int8":
        assert (stored_dtypes["scales"], stored_dtypes["table"]) == (np.float32, np.int8)
    else:
        assert stored_dtypes["table"] == np.float16


def test_unknown_table_and_head_types_fail_before_any_training() -> None:
    with pytest.raises(FactoryError, match=r"^--static-table must be one of int8, float16, got 'int4'$"):
        Config(static_table="int4")
    with pytest.raises(FactoryError, match=r"^--static-head must be one of int8, fp32, got 'fp16'$"):
        Config(static_head="fp16")
    assert (Config().static_table, Config().static_head) == ("int8", "int8")


def test_int8_rows_by_hand() -> None:
    table = np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-2.54, 1.27, 0.0]], dtype=np.float32)
    q, scale = quantize_rows(table)
    np.testing.assert_allclose(scale[:, 0], [1 / 127, 1.0, 0.02], rtol=1e-6)
    assert q.tolist() == [[127, -64, 32], [0, 0, 0], [-127, 64, 0]]  # -63.5 and 31.75 round away, to even
    # Each row is within half a step of its scale.
    assert np.all(np.abs(stored_table(table, "int8") - table) <= scale / 2 + 1e-7)


def test_an_unknown_table_type_is_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(FactoryError, match="table type must be one of int8, float16"):
        write_onnx(tmp_path / "s.onnx", np.zeros((3, 2), np.float32), _layers(rng, [2, 2]), "int4")


def test_numpy_gelu_is_the_exact_gelu_torch_trains_with() -> None:
    torch = pytest.importorskip("torch")
    x = np.linspace(-6, 6, 101, dtype=np.float32)[None]
    identity = [Dense(np.eye(101, dtype=np.float32), np.zeros(101, np.float32))]
    ours = head_logits(x, [*identity, *identity])  # identity, GELU, identity
    np.testing.assert_allclose(ours, torch.nn.GELU()(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6)


def test_net_harm_counts_in_scope_answers_against_the_transformer_by_hand() -> None:
    from compression.stages.static import net_harm

    oos = 2
    confident, unsure = [9.0, 0.0, 0.0], [0.0, 0.1, 0.0]  # answers intent 0 at 0.6 / too close to call
    wrong_for_1 = [0.0, 0.0, 9.0]  # confident in `oos`: the first stage never answers that
    first = np.array([confident, confident, confident, unsure, wrong_for_1, confident])
    gold = np.array([0, 1, 1, 1, 1, oos])
    transformer = np.array([0, 1, 0, 0, 0, oos])
    # Row 1: wrong where the transformer is right (+1); row 2: both wrong (0); row 0: both right (0); row 3 is not
    # answered; row 4 answers `oos`, which the first stage leaves to the transformer; row 5 is out of scope.
    assert net_harm(first, transformer, gold, oos, 0.6) == 1
    transformer[0] = 1  # now the first stage is right where the transformer is wrong: one back
    assert net_harm(first, transformer, gold, oos, 0.6) == 0
    assert net_harm(first, transformer, gold, oos, 1.0) == 0  # it answers nothing
