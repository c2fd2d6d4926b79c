"""`python -m loadtest.batching`: single calls against one padded batch, on the committed model's transformer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.engine.engine import Engine
from loadtest.batching import main, padded, passed_on, time_batches
from tests.conftest import MODEL_DIR


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    opened = Engine.open(MODEL_DIR)
    yield opened
    opened.close()


def test_padded_puts_each_text_left_with_its_mask() -> None:
    feed = padded([[101, 7, 102], [101, 102]])
    assert feed["input_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert feed["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert feed["input_ids"].dtype == feed["attention_mask"].dtype == np.int64


def test_the_texts_timed_are_those_the_first_stage_passes_on(engine: Engine) -> None:
    texts = ["what's the balance on my checking account", "tell me something about the byzantine empire"]
    assert engine.run(texts).stage.tolist() == [0, 1]  # the first stage answers the first, passes on the second
    assert passed_on(engine, texts) == [engine.encode([texts[1]])[0].ids]


def test_a_batch_of_one_is_the_single_call_and_larger_ones_are_measured(engine: Engine) -> None:
    ids = [engine.encode([t])[0].ids for t in ["play some jazz", "is my flight to boston on time", "set an alarm"]]
    one = time_batches(engine.models[-1], ids, 1, 3)
    assert (one.size, one.max_logit_diff, one.top_moved, one.texts) == (1, 0.0, 0, 3)
    three = time_batches(engine.models[-1], ids, 3, 2)
    assert three.texts == 6
    assert three.single_us > 0
    assert three.batched_us > 0
    # Dynamic quantisation scales each activation over the whole batch, so padding moves the logits a little.
    assert 0.0 <= three.max_logit_diff < 5.0
    with pytest.raises(ValueError, match="batch size 4 needs 1 to 3 texts"):
        time_batches(engine.models[-1], ids, 4, 1)


def test_the_command_prints_one_row_per_size(data_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rounds", "2", "--sizes", "1,2", "--data", str(data_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("CPU: ")
    assert "model.onnx, " in out[0]
    rows = [line for line in out if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2
    assert "top intent moved for 0 of 2)" in rows[0]  # a batch of one moves nothing
    assert rows[1].endswith("of 4) |")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "1,x"], "--sizes takes whole numbers separated by commas, not '1,x'"),
        (["--sizes", "0"], "--rounds and every batch size must be at least 1"),
        (["--rounds", "0"], "--rounds and every batch size must be at least 1"),
    ],
)
def test_the_command_refuses_bad_arguments_in_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")
