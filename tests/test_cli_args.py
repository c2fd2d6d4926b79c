"""The load-test CLIs' shared argument checks (loadtest.cli_args), and `python -m compression bench`'s own: each bad
value is refused in one line before anything is measured."""

from __future__ import annotations

import argparse
import importlib
import os
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
    cpu_list,
    is_http_url,
    path_arg,
    positive_float,
    positive_floats,
    positive_int,
    positive_ints,
    positive_ints_or_none,
    require_url,
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
        ("stress", "run"),
        ("scaleout", "run"),
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


# Base URLs, paths and CPU lists: normalised or refused in one line at parse time, for every load-test CLI.


def url_or_error(value: str) -> str | None:
    """require_url's value, or its usage error's message."""
    parser = argparse.ArgumentParser()

    def error(message: str) -> None:
        raise ValueError(message)

    parser.error = error  # type: ignore[method-assign,assignment]
    try:
        return require_url(parser, "--host", value, "http://127.0.0.1:8000")
    except ValueError as exc:
        return str(exc)


@pytest.mark.parametrize(
    ("value", "result"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),  # had made every request '//predict'
        ("http://127.0.0.1:8000//", "http://127.0.0.1:8000"),
        ("https://[::1]:443/", "https://[::1]:443"),
        ("http://10.0.0.5:8000/api", "--host must be a URL with no path, query or fragment"),
        ("http://10.0.0.5:8000/?x=1", "--host must be a URL with no path, query or fragment"),
        ("http://10.0.0.5:8000#top", "--host must be a URL with no path, query or fragment"),
    ],
)
def test_a_host_is_a_base_url_without_trailing_slashes_path_query_or_fragment(value: str, result: str) -> None:
    got = url_or_error(value)
    if result.startswith("--host"):
        assert got == f"{result}, such as http://127.0.0.1:8000, got {value!r}"
    else:
        assert got == result


def test_a_path_is_made_absolute_and_an_empty_one_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert path_arg("reports/x") == tmp_path / "reports" / "x"
    assert path_arg(str(tmp_path / "y")) == tmp_path / "y"
    for text in ("", "  "):
        with pytest.raises(argparse.ArgumentTypeError) as refused:
            path_arg(text)
        assert str(refused.value) == "must be a path, got ''"


@pytest.mark.parametrize(("text", "value"), [("0", "0"), ("0-1", "0-1"), ("0,1", "0,1"), (" 1 ", "1"), ("", "")])
def test_a_cpu_list_takes_tasksets_syntax_for_cpus_it_may_use(
    text: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu_list(text) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5", "must list only CPUs this process may use (0-1,3), got '5'"),
        ("0-2", "must list only CPUs this process may use (0-1,3), got '0-2'"),
        ("0-x", "must be a CPU list such as 0, 0-1 or 0,2, got '0-x'"),
        ("1-0", "must be a CPU list such as 0, 0-1 or 0,2, got '1-0'"),
        ("-1", "must be a CPU list such as 0, 0-1 or 0,2, got '-1'"),
        ("0,,1", "must be a CPU list such as 0, 0-1 or 0,2, got '0,,1'"),
    ],
)
def test_a_cpu_list_refuses_cpus_it_may_not_use_and_what_taskset_cannot_read(
    text: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 3})
    with pytest.raises(argparse.ArgumentTypeError) as refused:
        cpu_list(text)
    assert str(refused.value) == message


PATHS_CPUS_AND_WORKERS = [
    ("run", ["--out", ""], "argument --out: must be a path, got ''"),
    ("run", ["--data", ""], "argument --data: must be a path, got ''"),
    ("compare", ["--out", ""], "argument --out: must be a path, got ''"),
    ("soak", ["--out-dir", ""], "argument --out-dir: must be a path, got ''"),
    ("stress", ["--out", ""], "argument --out: must be a path, got ''"),
    ("scaleout", ["--out", ""], "argument --out: must be a path, got ''"),
    (
        "run",
        ["--latency-locust-cpus", "5"],
        "argument --latency-locust-cpus: must list only CPUs this process may use (0-1), got '5'",
    ),
    (
        "run",
        ["--latency-server-cpus", "0-x"],
        "argument --latency-server-cpus: must be a CPU list such as 0, 0-1 or 0,2, got '0-x'",
    ),
    (
        "compare",
        ["--server-cpus", "2"],
        "argument --server-cpus: must list only CPUs this process may use (0-1), got '2'",
    ),
    ("stress", ["--cpus", "9"], "argument --cpus: must list only CPUs this process may use (0-1), got '9'"),
    ("run", ["--workers", "65"], "argument --workers: must be at most 64, got '65'"),
    ("run", ["--latency-workers", "1000"], "argument --latency-workers: must be at most 64, got '1000'"),
    ("soak", ["--workers", "65"], "argument --workers: must be at most 64, got '65'"),
    # stress and scaleout took any number: nan, inf, 0 and negatives had reached the run.
    ("stress", ["--seconds", "nan"], "argument --seconds: must be a positive, finite number, got 'nan'"),
    ("stress", ["--factor", "0"], "argument --factor: must be a positive, finite number, got '0'"),
    ("stress", ["--workers", "-4"], "argument --workers: must be a whole number of at least 1, got '-4'"),
    ("stress", ["--max-queue", "0"], "argument --max-queue: must be a whole number of at least 1, got '0'"),
    ("stress", ["--batch", "0"], "argument --batch: must be a whole number of at least 1, got '0'"),
    ("scaleout", ["--replicas", "500"], "argument --replicas: must be at most 64, got '500'"),
    ("scaleout", ["--rate", "nan"], "argument --rate: must be a positive, finite number, got 'nan'"),
    ("scaleout", ["--kill-seconds", "-3"], "argument --kill-seconds: must be a positive, finite number, got '-3'"),
    (
        "scaleout",
        ["--capacity-seconds", "inf"],
        "argument --capacity-seconds: must be a positive, finite number, got 'inf'",
    ),
]


@pytest.mark.parametrize(("tool", "args", "message"), PATHS_CPUS_AND_WORKERS)
@pytest.mark.usefixtures("nothing_started")
def test_the_load_test_clis_refuse_empty_paths_cpus_they_may_not_use_and_too_many_workers(
    tool: str,
    args: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.chdir(tmp_path)  # an empty path had meant here
    out = {"soak": ["--out-dir", str(tmp_path / "out")]}.get(tool, ["--out", str(tmp_path / "out" / "r.json")])
    assert refused(importlib.import_module(f"loadtest.{tool}").main, [*out, *args], capsys) == message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tool", ["stress", "scaleout"])
@pytest.mark.usefixtures("nothing_started")
def test_stress_and_scaleout_refuse_an_out_they_cannot_write_before_they_start(
    tool: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "r.json"
    message = refused(importlib.import_module(f"loadtest.{tool}").main, ["--out", str(out)], capsys)
    assert message == f"--out {out.parent} cannot be written: it is not a directory"


def test_a_relative_out_and_data_are_resolved_against_the_callers_directory(
    tmp_path: Path, data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Locust runs from the repository's root: a relative --out had put its reports there, and the run then did not
    find them where it looked."""
    from loadtest import run

    (tmp_path / "data.json").write_bytes(data_path.read_bytes())
    monkeypatch.chdir(tmp_path)
    a = run.parse_args(["--out", "reports", "--data", "data.json"])
    assert (a.out, a.data) == (tmp_path / "reports", tmp_path / "data.json")
    assert (a.queries, a.query_count) == (str(tmp_path / "data.json"), 3100)
