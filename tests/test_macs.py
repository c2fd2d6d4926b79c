"""Multiply-adds counted from the ONNX graph agree with the architecture's formula."""

from __future__ import annotations

import pytest

from compression.macs import macs_per_query
from tests.conftest import MODEL_DIR


@pytest.mark.parametrize("n", [11, 32])
def test_transformer_macs_match_the_formula(n: int) -> None:
    layers, hidden, ffn, labels = 3, 384, 1152, 151  # the committed student: 3 layers, 75% of 1536 FFN kept
    per_layer = 4 * n * hidden**2 + 2 * n * n * hidden + 2 * n * hidden * ffn  # QKV+O, scores+context, FFN
    pooled = hidden * hidden + hidden * labels  # pooler and classifier see the [CLS] row only
    assert macs_per_query(MODEL_DIR / "model.onnx", n) == layers * per_layer + pooled


def test_first_stage_macs_are_a_mean_and_one_product() -> None:
    assert macs_per_query(MODEL_DIR / "static.onnx", 11) == 11 * 384 + 384 * 151
