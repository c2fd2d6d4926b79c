"""The load-test CLIs' shared argument checks (loadtest.cli_args), and `python -m compression bench`'s own: each bad
value is refused in one line before anything is measured."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from compression import cli
from compression.measure import benchmark
from loadtest.cli_args import (
    is_http_url,
    positive_float,
    positive_floats,
    positive_int,
    positive_ints,
    writable_dir_problem,
)


@pytest.mark.parametrize(("text", "value"), [("1", 1.0), ("0.25", 0.25), ("1e3", 1000.0), (" 2 ", 2.0)])
def test_a_positive_float_takes_any_positive_finite_number(text: str, value: float) -> None:
    assert positive_float(text) == value


@pytest.mark.parametrize("text", ["0", "-1", "-0.5", "nan", "NaN", "inf", "-inf", "abc", ""])
def test_a_positive_float_refuses_zero_negatives_nan_infinity_and_words(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        positive_float(text)
    assert str(refused.value) == f"must be a positive, finite number, got {text!r}"


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "x", ""])
def test_a_positive_int_refuses_what_is_not_a_whole_number_of_at_least_1(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        positive_int(text)
    assert str(refused.value) == f"must be a whole number of at least 1, got {text!r}"
    assert positive_int("3") == 3


def test_comma_lists_skip_empty_items_so_that_an_empty_list_is_none() -> None:
    assert positive_floats("100,400,800") == [100.0, 400.0, 800.0]
    assert positive_floats("0.5") == [0.5]
    assert positive_ints("8,,16,") == [8, 16]
    assert positive_ints("") == []  # `--steps ""`: no saturation phase
    assert positive_floats("") == []


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (positive_floats, "abc", "must be comma-separated positive, finite numbers, got 'abc' in 'abc'"),
        (positive_floats, "100,0", "must be comma-separated positive, finite numbers, got '0' in '100,0'"),
        (positive_floats, "100,nan", "must be comma-separated positive, finite numbers, got 'nan' in '100,nan'"),
        (positive_ints, "8,x", "must be comma-separated whole numbers of at least 1, got 'x' in '8,x'"),
        (positive_ints, "8,-4", "must be comma-separated whole numbers of at least 1, got '-4' in '8,-4'"),
    ],
)
def test_comma_lists_name_the_bad_item(parse: Any, text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parse(text)
    assert str(refused.value) == message


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://localhost:8748/", True),
        ("https://[::1]:443", True),
        ("localhost:8748", False),
        ("not-a-url", False),
        ("http://", False),
        ("http://:8000", False),
        ("ftp://127.0.0.1", False),
        ("http://127.0.0.1:99999", False),
        ("http://127.0.0.1:port", False),
    ],
)
def test_a_url_is_http_or_https_with_a_host(text: str, ok: bool) -> None:
    assert is_http_url(text) is ok


def test_a_directory_to_write_is_made_and_tried(tmp_path: Path) -> None:
    assert writable_dir_problem(tmp_path / "a" / "b") is None
    assert (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the trial file is gone
    (tmp_path / "file").write_text("x")
    assert writable_dir_problem(tmp_path / "file") == "it is not a directory"
    assert writable_dir_problem(tmp_path / "file" / "x") == "Not a directory"
    assert writable_dir_problem(Path("/proc/nope/x")) == "No such file or directory"


# `python -m compression bench`: the pipeline's one-line errors (compression.errors.FactoryError), exit status 2.


def bench(data_path: Path, tmp_path: Path, *args: str) -> list[str]:
    """The bench stage's command line, its artifacts under `tmp_path` (the pipeline records its data there)."""
    return ["bench", "--data", str(data_path), "--artifacts", str(tmp_path / "artifacts"), *args]


@pytest.fixture
def no_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any) -> None:
        pytest.fail("the benchmark ran")

    monkeypatch.setattr(benchmark, "run_stage", fail)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "error: --latency-queries must be at least 1, got -1"),
        ("0", "error: --latency-queries must be at least 1, got 0"),
    ],
)
@pytest.mark.usefixtures("no_benchmark")
def test_bench_refuses_fewer_than_one_latency_query_before_it_runs(
    value: str, message: str, tmp_path: Path, data_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = bench(data_path, tmp_path, "--reports", str(tmp_path / "reports"), "--latency-queries", value)
    assert cli.main(args) == 2
    assert capsys.readouterr().err.splitlines() == [message]
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("place", ["proc", "under_a_file"])
@pytest.mark.usefixtures("no_benchmark")
def test_bench_refuses_reports_it_cannot_write_before_it_runs(
    place: str, tmp_path: Path, data_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    reports, reason = {
        "proc": (Path("/proc/nope/x"), "No such file or directory"),
        "under_a_file": (tmp_path / "file" / "reports", "Not a directory"),
    }[place]
    assert cli.main(bench(data_path, tmp_path, "--reports", str(reports))) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --reports {reports} cannot be written: {reason}"]


def test_bench_makes_its_reports_directory_before_it_runs(
    tmp_path: Path, data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[bool] = []
    monkeypatch.setattr(benchmark, "run_stage", lambda ctx, cfg: made.append(Path(ctx.reports).is_dir()))
    reports = tmp_path / "new" / "reports"
    assert cli.main(bench(data_path, tmp_path, "--reports", str(reports), "--latency-queries", "5")) == 0
    assert made == [True]
