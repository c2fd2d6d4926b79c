"""The load-test CLIs' shared argument checks (loadtest.cli_args), and `python -m compression bench`'s own: each bad
value is refused in one line before anything is measured."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from compression import cli
from compression.measure import benchmark
from compression.writable import dir_write_problem
from loadtest.cli_args import (
    MAX_SECONDS,
    at_most,
    is_http_url,
    positive_float,
    positive_floats,
    positive_int,
    positive_ints,
    positive_ints_or_none,
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


def test_comma_lists_skip_empty_items() -> None:
    assert positive_floats("100,400,800") == [100.0, 400.0, 800.0]
    assert positive_floats("0.5") == [0.5]
    assert positive_floats("100000") == [100000.0]
    assert positive_ints("8,,16,") == [8, 16]
    assert positive_ints("10000") == [10000]
    assert positive_ints_or_none("") == []  # loadtest.run's `--steps ""`: no saturation phase
    assert positive_ints_or_none("8, 16") == [8, 16]


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (positive_floats, "", "must be comma-separated positive, finite numbers, got none in ''"),
        (positive_floats, " , ", "must be comma-separated positive, finite numbers, got none in ' , '"),
        (positive_ints, "", "must be comma-separated whole numbers of at least 1, got none in ''"),
        (positive_ints, ",", "must be comma-separated whole numbers of at least 1, got none in ','"),
        (
            positive_floats,
            "100,1e308",
            "must be comma-separated positive, finite numbers, each at most 100000, got '1e308' in '100,1e308'",
        ),
        (
            positive_floats,
            "100000.5",
            "must be comma-separated positive, finite numbers, each at most 100000, got '100000.5' in '100000.5'",
        ),
        (
            positive_ints,
            "8," + "9" * 300,
            f"must be comma-separated whole numbers of at least 1, each at most 10000, got {'9' * 300!r} in "
            f"{'8,' + '9' * 300!r}",
        ),
        (
            positive_ints_or_none,
            "10001",
            "must be comma-separated whole numbers of at least 1, each at most 10000, got '10001' in '10001'",
        ),
        (positive_floats, "abc", "must be comma-separated positive, finite numbers, got 'abc' in 'abc'"),
        (positive_floats, "100,0", "must be comma-separated positive, finite numbers, got '0' in '100,0'"),
        (positive_floats, "100,nan", "must be comma-separated positive, finite numbers, got 'nan' in '100,nan'"),
        (positive_ints, "8,x", "must be comma-separated whole numbers of at least 1, got 'x' in '8,x'"),
        (positive_ints, "8,-4", "must be comma-separated whole numbers of at least 1, got '-4' in '8,-4'"),
    ],
)
def test_comma_lists_refuse_nothing_a_huge_item_and_a_bad_one_by_name(parse: Any, text: str, message: str) -> None:
    """`compare --rates ""` had failed only at its end, after all its measuring; a huge rate or step of users became
    a file name (open_1000...0) too long to make, after the server had started."""
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        parse(text)
    assert str(refused.value) == message


def test_a_bounded_number_refuses_what_is_over_its_bound_and_checks_the_rest_as_before() -> None:
    seconds = at_most(positive_int, MAX_SECONDS)
    assert seconds("86400") == 86400
    for text in ("86401", "1" + "0" * 30):
        with pytest.raises(argparse.ArgumentTypeError) as refused:
            seconds(text)
        assert str(refused.value) == f"must be at most 86400, got {text!r}"
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        seconds("0")
    assert str(refused.value) == "must be a whole number of at least 1, got '0'"
    minutes = at_most(positive_float, 10_080)
    assert minutes("10080") == 10080.0
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        minutes("1e308")
    assert str(refused.value) == "must be at most 10080, got '1e308'"


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


def test_a_directory_to_write_is_tried_and_left_as_it_was(tmp_path: Path) -> None:
    """A run refused after the check (or whose server then failed to start) had left an empty directory behind."""
    assert dir_write_problem(tmp_path / "a" / "b") is None
    assert list(tmp_path.iterdir()) == []  # neither the directories it made nor the trial file are left
    (tmp_path / "kept").mkdir()
    assert dir_write_problem(tmp_path / "kept") is None
    assert dir_write_problem(tmp_path / "kept" / "new") is None
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"]
    assert list((tmp_path / "kept").iterdir()) == []
    (tmp_path / "file").write_text("x")
    assert dir_write_problem(tmp_path / "file") == "it is not a directory"
    assert dir_write_problem(tmp_path / "file" / "x") == "Not a directory"
    assert dir_write_problem(Path("/proc/nope/x")) == "No such file or directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "kept"]


# Each of the four load-test CLIs refuses a huge number or an empty list as argparse's usage error (status 2, one
# line), before anything starts: `soak --minutes 1e308` had overflowed after the capacity measurement, and
# `compare --rounds 2 --rates ""` had failed only at its end.


@pytest.fixture
def nothing_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if a server, a measurement or (compare) the baselines' stand-in model would start."""

    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail("a measurement started")

    for module, name in [
        ("run", "measure"),
        ("run", "run_locust"),
        ("compare", "measure"),
        ("compare", "build_stand_in"),
        ("soak", "run"),
        ("stages", "serve"),
    ]:
        monkeypatch.setattr(importlib.import_module(f"loadtest.{module}"), name, fail)


def refused(main: Callable[[list[str]], int], args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one error of an argparse usage error, after checking that nothing was printed before it."""
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""  # not even the CPU line
    return err.splitlines()[-1].split(": error: ", 1)[1]


HUGE = "1" + "0" * 30
BAD_NUMBERS_AND_LISTS = [
    ("soak", ["--minutes", "1e308"], "argument --minutes: must be at most 10080, got '1e308'"),
    ("soak", ["--minutes", "10081"], "argument --minutes: must be at most 10080, got '10081'"),
    ("soak", ["--rate", "1e308"], "argument --rate: must be at most 100000, got '1e308'"),
    ("soak", ["--capacity-seconds", "1e308"], "argument --capacity-seconds: must be at most 86400, got '1e308'"),
    ("stages", ["--seconds", "1e308"], "argument --seconds: must be at most 86400, got '1e308'"),
    ("stages", ["--rates", ""], "argument --rates: must be comma-separated positive, finite numbers, got none in ''"),
    (
        "stages",
        ["--rates", "1e308"],
        "argument --rates: must be comma-separated positive, finite numbers, each at most 100000, got '1e308' in "
        "'1e308'",
    ),
    ("run", ["--seconds", HUGE], f"argument --seconds: must be at most 86400, got '{HUGE}'"),
    ("run", ["--step-seconds", "86401"], "argument --step-seconds: must be at most 86400, got '86401'"),
    ("run", ["--rates", ""], "argument --rates: must be comma-separated positive, finite numbers, got none in ''"),
    (
        "run",
        ["--steps", "8,20000"],
        "argument --steps: must be comma-separated whole numbers of at least 1, each at most 10000, got '20000' in "
        "'8,20000'",
    ),
    ("run", ["--keep-warm-ms", "1e308"], "argument --keep-warm-ms: must be a number from 0 to 60000, got '1e308'"),
    ("run", ["--keep-warm-ms", "nan"], "argument --keep-warm-ms: must be a number from 0 to 60000, got 'nan'"),
    ("run", ["--keep-warm-ms", "-1"], "argument --keep-warm-ms: must be a number from 0 to 60000, got '-1'"),
    ("run", ["--keep-warm-ms", "x"], "argument --keep-warm-ms: must be a number from 0 to 60000, got 'x'"),
    (
        "compare",
        ["--rounds", "2", "--rates", ""],
        "argument --rates: must be comma-separated positive, finite numbers, got none in ''",
    ),
    (
        "compare",
        ["--steps", " , "],
        "argument --steps: must be comma-separated whole numbers of at least 1, got none in ' , '",
    ),
    ("compare", ["--seconds", HUGE], f"argument --seconds: must be at most 86400, got '{HUGE}'"),
    ("compare", ["--keep-warm-ms", "inf"], "argument --keep-warm-ms: must be a number from 0 to 60000, got 'inf'"),
]


@pytest.mark.parametrize(("tool", "args", "message"), BAD_NUMBERS_AND_LISTS)
@pytest.mark.usefixtures("nothing_started")
def test_the_load_test_clis_refuse_huge_numbers_and_empty_lists_before_anything_starts(
    tool: str, args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = {"soak": ["--out-dir", str(tmp_path / "out")], "stages": []}.get(tool, ["--out", str(tmp_path / "out")])
    assert refused(importlib.import_module(f"loadtest.{tool}").main, [*args, *out], capsys) == message
    assert list(tmp_path.iterdir()) == []


def test_the_load_test_clis_take_their_largest_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loadtest import run, soak

    assert run.keep_warm_ms("60000") == 60000.0
    assert run.keep_warm_ms("0") == 0.0
    a = run.parse_args(
        [
            "--rates",
            "100000",
            "--steps",
            "10000",
            "--seconds",
            "86400",
            "--step-seconds",
            "86400",
            "--out",
            str(tmp_path),
        ]
    )
    assert (a.rates, a.steps, a.seconds, a.step_seconds) == ([100000.0], [10000], 86400, 86400)
    asked: list[tuple[Any, ...]] = []

    def stop(*args: Any, **kwargs: Any) -> None:
        asked.append(args)
        raise RuntimeError("stopped here")

    monkeypatch.setattr(soak, "run", stop)
    with pytest.raises(RuntimeError, match="stopped here"):
        soak.main(["--minutes", "10080", "--rate", "100000", "--capacity-seconds", "86400", "--out-dir", str(tmp_path)])
    assert asked == [(10080.0, 0.5, 2, 100000.0, 86400.0)]


@pytest.mark.parametrize("tool", ["run", "compare"])
def test_a_run_that_stops_after_the_check_of_its_out_leaves_no_directory(
    tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run's --out and compare's were made at parse time: a later refusal (a --host not on loopback) or a failure
    (its server not starting) left an empty directory behind."""
    from loadtest import compare, run

    def no_server(*args: object, **kwargs: object) -> None:
        raise RuntimeError("server exited with 2")

    for module, name in [(run, "measure"), (compare, "measure"), (compare, "build_stand_in")]:
        monkeypatch.setattr(module, name, no_server)
    out = tmp_path / "reports" / "new"
    if tool == "run":
        assert run.main(["--host", "http://10.0.0.5:8000", "--out", str(out)]) == 2
    else:
        with pytest.raises(RuntimeError, match="server exited with 2"):
            compare.main(["--out", str(out)])
    assert list(tmp_path.iterdir()) == []


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
