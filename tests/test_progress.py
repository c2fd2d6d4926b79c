"""compression.progress: the stage in every log line of a factory run, and a training loop's time left."""

from __future__ import annotations

import logging

import pytest

from compression import progress


def test_time_left_is_the_rest_at_the_pace_so_far() -> None:
    assert progress.time_left(10, 40, 20.0) == "1 min 0 s left"  # 2 s a step, 30 steps to go
    assert progress.time_left(30, 40, 15.0) == "5 s left"
    assert progress.time_left(1, 400, 0.5) == "3 min 20 s left"
    assert progress.time_left(40, 40, 99.0) == "0 s left"
    assert progress.time_left(0, 40, 0.0) == "time left unknown"


def test_about_twenty_progress_lines_and_at_most_a_hundred_steps_apart() -> None:
    assert progress.every(10) == 1
    assert progress.every(400) == 20
    assert progress.every(100_000) == 100


def test_log_lines_carry_the_running_stage(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("compression.test_progress")
    caplog.handler.addFilter(progress.StageFilter())
    caplog.handler.setFormatter(logging.Formatter("[%(stage)s] %(message)s"))
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("before")
        with progress.stage("distill", 3, 11):
            log.info("inside")
        log.info("after")
    assert caplog.text.splitlines() == ["[-] before", "[distill 3/11] inside", "[-] after"]
