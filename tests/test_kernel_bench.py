"""The SkipLayerNormalization micro-benchmark compares two graphs that compute the same thing."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from compression.measure import kernel_bench


def _run(fused: bool, x: np.ndarray, skip: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(kernel_bench._graph(fused, x.shape[-1]), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {"x": x, "skip": skip})[0]
    return out


def test_fused_and_plain_graphs_agree() -> None:
    rng = np.random.default_rng(1)
    x, skip = (rng.standard_normal((1, 7, 32)).astype(np.float32) for _ in range(2))
    expected = (x + skip - (x + skip).mean(-1, keepdims=True)) / np.sqrt((x + skip).var(-1, keepdims=True) + 1e-12)
    np.testing.assert_allclose(_run(True, x, skip), expected, atol=1e-4)
    np.testing.assert_allclose(_run(False, x, skip), expected, atol=1e-4)


def test_cli_prints_one_row_per_length(capsys: pytest.CaptureFixture[str]) -> None:
    assert kernel_bench.main(["--tokens", "1,3", "--runs", "20"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "3"]
    assert all(float(r.split("|")[2]) > 0 and r.rstrip().endswith("x |") for r in rows)
