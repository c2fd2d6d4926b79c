"""The cascade's first stage as the factory writes it: the ONNX graph computes the head that was trained."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from app.runtime import LogitsSession
from compression.static import Dense, head_logits, write_onnx


def _layers(rng: np.random.Generator, sizes: list[int]) -> list[Dense]:
    return [
        Dense(rng.normal(size=(a, b)).astype(np.float32), rng.normal(size=b).astype(np.float32))
        for a, b in itertools.pairwise(sizes)
    ]


@pytest.mark.parametrize("sizes", [[8, 5], [8, 16, 5]], ids=["linear", "gelu-hidden"])
def test_graph_is_the_mean_of_token_rows_through_the_head(tmp_path: Path, sizes: list[int]) -> None:
    rng = np.random.default_rng(0)
    # fp16-exact table values: the graph stores the table in fp16, the reference reads it in fp32.
    table = rng.normal(size=(30, sizes[0])).astype(np.float16).astype(np.float32)
    dense = _layers(rng, sizes)
    path = tmp_path / "static.onnx"
    write_onnx(path, table, dense)
    session = LogitsSession(path, 1, 1, ())
    for ids in ([3], [1, 2, 29], [7, 7, 0, 12, 5]):
        expected = head_logits(table[ids].mean(0, keepdims=True), dense)[0]
        np.testing.assert_allclose(session.run(ids), expected, rtol=1e-5, atol=1e-5)


def test_numpy_gelu_is_the_exact_gelu_torch_trains_with() -> None:
    torch = pytest.importorskip("torch")
    x = np.linspace(-6, 6, 101, dtype=np.float32)[None]
    identity = [Dense(np.eye(101, dtype=np.float32), np.zeros(101, np.float32))]
    ours = head_logits(x, [*identity, *identity])  # identity, GELU, identity
    np.testing.assert_allclose(ours, torch.nn.GELU()(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6)
