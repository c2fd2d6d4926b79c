"""`make soak`'s bookkeeping on made-up samples: per-minute rows, the bar, the windows of a short run, the plot,
and the driver's own loop lag; and the readings of the machine beside them (loadtest.host)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest import soak
from loadtest.driver import Report, Result, closed_loop, http_target, model_path_ms, server_timings
from loadtest.host import Canary, ServerCpu, Steal
from loadtest.procs import cpu_seconds
from loadtest.soak import Tick
from tests.test_loadtest import usage_error


def ticks(
    duration_s: float,
    every_s: float,
    rss=lambda t: 300.0,
    p99=lambda t: 10.0,
    errors=lambda t: 0,
    lag=lambda t: 0.5,
) -> list[Tick]:
    """One tick every `every_s`: 100 answers, 98 at 1 ms and 2 at the given p99 level, so the tick's p99 is that."""
    out = []
    for i in range(1, int(duration_s / every_s) + 1):
        t = i * every_s
        lat = np.array([1.0] * 98 + [p99(t)] * 2, dtype=np.float32)
        out.append(Tick(t, rss(t), 100 + errors(t), errors(t), lat, lag(t)))
    return out


def test_phases_keep_the_hour_and_scale_a_short_run_down() -> None:
    assert soak.phases(3600) == (300, 600)
    assert soak.phases(1500) == (300, 600)
    warmup, compare = soak.phases(60)
    assert (warmup, compare) == pytest.approx((12.0, 24.0))  # 60 s is 1/25 of 5 + 2 x 10 minutes


def test_rows_per_minute() -> None:
    rows = soak.minute_rows(ticks(150, 5, rss=lambda t: 300 + t, errors=lambda t: 1 if t == 65 else 0))
    assert [r["minute"] for r in rows] == [1, 2, 3]
    assert [r["requests"] for r in rows] == [1200, 1201, 600]  # the last minute is half done
    assert [r["errors"] for r in rows] == [0, 1, 0]
    assert [r["rss_mb"] for r in rows] == [360.0, 420.0, 450.0]  # at each minute's end
    assert rows[0]["p50_ms"] == 1.0
    assert rows[0]["mean_ms"] == round((98 * 1.0 + 2 * 10.0) / 100, 3)  # every tick of the minute alike: 1.18


def test_each_minute_is_summarised_once_when_it_has_ended() -> None:
    """What the soak prints as it runs: at each tick, only the minutes that ended since the last print. The
    rows are the ones the whole run gives, and no tick is read twice (a tick that is read again would be one
    whose minute is summarised again, which is what held the driver's loop longer as the hour went on)."""
    run = ticks(150, 5, rss=lambda t: 300 + t, lag=lambda t: t / 10)
    printed: list[dict[str, Any]] = []
    read: list[int] = []
    start = 0
    for seen in range(1, len(run) + 1):
        rows, end = soak.finished_minutes(run[:seen], start)
        read.extend(range(start, end))
        printed.extend(rows)
        start = end
    assert start == 24  # minutes 1 and 2 ended (24 ticks); minute 3's 6 ticks wait for the run's end
    assert read == list(range(24))
    assert printed == soak.minute_rows(run)[:2]
    assert [r["driver_lag_max_ms"] for r in printed] == [6.0, 12.0]  # the worst tick of each minute
    assert soak.finished_minutes([], 0) == ([], 0)


def test_the_windows_report_the_drivers_loop_lag_without_checking_it() -> None:
    verdict = soak.evaluate(ticks(3600, 5, lag=lambda t: 100.0 if t > 3000 else 2.0), 3600)
    assert (verdict["driver_lag_max_first_ms"], verdict["driver_lag_max_last_ms"]) == (2.0, 100.0)
    assert verdict["passed"]  # the lag is there to read a rise by, not a bar


def test_loop_lag_sees_the_loop_held() -> None:
    """A coroutine that holds the loop for 50 ms without awaiting: the sleeper wakes at least that late, and
    `take_ms` starts the next interval from nothing."""

    async def hold_the_loop() -> tuple[float, float]:
        lag = soak.LoopLag(period_s=0.001)
        watcher = asyncio.create_task(lag.run())
        await asyncio.sleep(0.005)  # let it start sleeping
        held_until = time.perf_counter() + 0.05
        while time.perf_counter() < held_until:
            pass
        await asyncio.sleep(0.005)  # let it wake and record
        first = lag.take_ms()
        watcher.cancel()
        return first, lag.worst_s

    first, after_take = asyncio.run(hold_the_loop())
    assert first >= 50 - 1  # held 50 ms; the sleeper asked for 1 ms of it
    assert after_take == 0.0


def test_a_steady_hour_passes() -> None:
    verdict = soak.evaluate(ticks(3600, 5), 3600)
    assert verdict["passed"], verdict
    assert (verdict["warmup_s"], verdict["compare_s"]) == (300, 600)
    assert verdict["rss_growth"] == 0.0
    assert verdict["p99_rise"] == pytest.approx(0.0)


def test_memory_growth_during_warm_up_is_allowed_and_after_it_is_not() -> None:
    warm_growth = ticks(3600, 5, rss=lambda t: 200 + min(t, 300) / 3)  # +100 MB, all in the first 5 minutes
    assert soak.evaluate(warm_growth, 3600)["checks"]["rss_flat"]
    leak = ticks(3600, 5, rss=lambda t: 300 + t / 3600 * 18)  # +6% over the hour
    verdict = soak.evaluate(leak, 3600)
    assert not verdict["checks"]["rss_flat"]
    assert not verdict["passed"]
    assert verdict["rss_growth"] == pytest.approx((318 - 301.5) / 301.5, abs=1e-4)  # from the end of warm-up


def test_p99_may_rise_20_percent_between_the_first_and_last_ten_minutes() -> None:
    def slower_at_the_end(factor: float):
        return lambda t: 10.0 * factor if t > 3000 else 10.0

    assert soak.evaluate(ticks(3600, 5, p99=slower_at_the_end(1.19)), 3600)["checks"]["p99_steady"]
    verdict = soak.evaluate(ticks(3600, 5, p99=slower_at_the_end(1.25)), 3600)
    assert not verdict["checks"]["p99_steady"]
    assert verdict["p99_rise"] == pytest.approx(0.25, abs=0.01)
    # A slow warm-up does not count: the first window starts after it.
    assert soak.evaluate(ticks(3600, 5, p99=lambda t: 50.0 if t <= 300 else 10.0), 3600)["checks"]["p99_steady"]


def test_any_error_fails_the_run() -> None:
    verdict = soak.evaluate(ticks(60, 5, errors=lambda t: 1 if t == 30 else 0), 60)
    assert verdict["errors"] == 1
    assert verdict["checks"] == {"no_errors": False, "rss_flat": True, "p99_steady": True}


def test_plot_writes_a_png(tmp_path: Path) -> None:
    samples = ticks(180, 5)
    verdict = soak.evaluate(samples, 180)
    out = tmp_path / "soak.png"
    soak.plot(samples, soak.minute_rows(samples), verdict, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_steal_is_the_hypervisors_share_of_all_cpu_time_since_the_last_reading(tmp_path: Path) -> None:
    stat = tmp_path / "stat"

    def write(user: int, idle: int, steal: int) -> None:
        # user nice system idle iowait irq softirq steal guest guest_nice, then a CPU's own line
        stat.write_text(f"cpu  {user} 0 10 {idle} 0 0 0 {steal} 0 0\ncpu0 1 0 0 0 0 0 0 0 0 0\n")

    write(100, 1000, 5)
    steal = Steal(stat)
    write(150, 1120, 35)  # 50 + 120 + 30 = 200 jiffies passed, 30 of them stolen
    assert steal.take() == 30 / 200
    assert steal.take() is None  # no time passed since
    write(250, 1220, 35)
    assert steal.take() == 0.0
    stat.unlink()
    assert steal.take() is None  # a kernel without /proc/stat
    assert Steal(tmp_path / "nowhere").take() is None


def test_each_minute_reports_its_mean_steal_and_none_without_readings() -> None:
    run = ticks(120, 30)
    for tick, share in zip(run, [0.0, 0.1, 0.2, None], strict=True):
        tick.steal = share
    assert [r["steal"] for r in soak.minute_rows(run)] == [0.05, 0.2]  # minute 2's second tick has no reading
    assert soak.minute_rows(ticks(60, 30))[0]["steal"] is None


def test_the_server_timing_header_gives_each_duration_by_name_and_the_model_path() -> None:
    ours = 'tokenize;dur=0.041, inference;dur=0.250;desc="first", service;dur=0.412'
    assert server_timings(ours) == pytest.approx({"tokenize": 0.041, "inference": 0.25, "service": 0.412})
    assert model_path_ms(server_timings(ours)) == pytest.approx(0.291)  # the service's own time is not in it
    assert model_path_ms(server_timings("inference;dur=2")) == 2.0
    assert server_timings("service;dur=0.3") == {"service": 0.3}
    assert model_path_ms(server_timings("service;dur=0.3")) is None
    for unusable in (None, "", "inference", 'inference;desc="first"', "inference;dur=fast"):
        assert server_timings(unusable) == {}
        assert model_path_ms(server_timings(unusable)) is None
    # An entry without a number is skipped, not the header.
    assert server_timings("tokenize;dur=x, inference;dur=0.5") == {"inference": 0.5}


def test_each_minute_splits_its_p99_into_the_services_time_and_the_time_outside_it() -> None:
    run = ticks(120, 30)
    for i, tick in enumerate(run):
        tick.service_ms = np.array([0.3] * 98 + [1.0 + i] * 2, dtype=np.float32)
        tick.outside_ms = tick.latencies_ms - tick.service_ms
        tick.send_wait_ms = np.array([0.01] * 99 + [0.2 * i], dtype=np.float32)
    rows = soak.minute_rows(run)
    for row, pair in zip(rows, (run[:2], run[2:]), strict=True):
        for column, arrays in (
            ("service_p99_ms", [t.service_ms for t in pair]),
            ("outside_p99_ms", [t.outside_ms for t in pair]),
            ("send_wait_p99_ms", [t.send_wait_ms for t in pair]),
        ):
            joined = np.concatenate([a for a in arrays if a is not None])
            assert row[column] == round(float(np.percentile(joined, 99)), 3)
    assert rows[1]["service_p99_ms"] > rows[0]["service_p99_ms"]
    plain = soak.minute_rows(ticks(60, 30))[0]  # a server that sends no service time, and no wait was read
    assert (plain["service_p99_ms"], plain["outside_p99_ms"], plain["send_wait_p99_ms"]) == (None, None, None)
    verdict = soak.evaluate(run, 120)  # the windows of a 2-minute run: 24-72 s and 72-120 s
    first = [t for t in run if 24 < t.t_s <= 72]
    assert verdict["service_p99_first_ms"] == soak.tail_p99(first, "service_ms")
    assert verdict["outside_p99_last_ms"] == soak.tail_p99([t for t in run if t.t_s > 72], "outside_ms")
    assert verdict["send_wait_p99_last_ms"] == soak.tail_p99([t for t in run if t.t_s > 72], "send_wait_ms")
    assert verdict["passed"]  # reported, not checked


def test_each_minute_reports_the_model_paths_p99_and_the_services_cpu_per_request() -> None:
    run = ticks(120, 30)  # 100 requests a tick
    for i, tick in enumerate(run):
        tick.model_ms = np.array([0.2] * 98 + [0.5 + i] * 2, dtype=np.float32)
        tick.server_cpu_s = [0.05, 0.07, 0.1, None][i]
    rows = soak.minute_rows(run)
    assert [r["model_p99_ms"] for r in rows] == [
        round(float(np.percentile(np.concatenate([run[0].model_ms, run[1].model_ms]), 99)), 3),
        round(float(np.percentile(np.concatenate([run[2].model_ms, run[3].model_ms]), 99)), 3),
    ]
    # 120 ms over 200 requests; then 100 ms over the 100 requests of the one tick whose CPU was read
    assert [r["server_cpu_ms_per_request"] for r in rows] == [0.6, 1.0]
    plain = soak.minute_rows(ticks(60, 30))[0]  # a server that sends no timing, and no CPU read
    assert (plain["model_p99_ms"], plain["server_cpu_ms_per_request"]) == (None, None)
    verdict = soak.evaluate(run, 120)
    assert verdict["model_p99_first_ms"] == rows[0]["model_p99_ms"]  # the first window, 24-72 s: minute 1's ticks
    assert verdict["passed"]  # reported, not checked


BURN = """
import sys, time
started = time.process_time()
while time.process_time() - started < 0.3:
    pass
print("burnt", flush=True)
sys.stdin.read()  # stay alive, so that its time is still in the tree when it is read
"""


def test_server_cpu_counts_the_trees_cpu_seconds_since_the_last_reading() -> None:
    """A child that burns 0.3 s of CPU and waits: the tree's reading includes all of it (it started after the
    first reading, so it counts from zero), and the next reading, once it has exited, does not."""
    cpu = ServerCpu(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", BURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "burnt\n"
        assert child.pid in cpu_seconds(os.getpid())
        burnt = cpu.take()
        assert burnt >= 0.3 - 0.02  # the kernel counts in 10 ms ticks
        assert cpu_seconds(os.getpid())[child.pid] >= 0.3 - 0.02
    finally:
        child.communicate("")
    assert cpu.take() < burnt  # the child is gone: its time is not counted again, nor taken away


def test_each_minute_reports_the_canarys_median_and_the_windows_report_theirs() -> None:
    run = ticks(120, 30)
    for tick, reading in zip(run, [2.0, 2.2, 3.0, None], strict=True):
        tick.canary_ms = reading
    assert [r["canary_ms"] for r in soak.minute_rows(run)] == [2.1, 3.0]
    assert soak.minute_rows(ticks(60, 30))[0]["canary_ms"] is None
    verdict = soak.evaluate(run, 120)  # windows of 48 s after 24 s of warm-up: 30 and 60 s, then 90 and 120
    assert (verdict["canary_first_ms"], verdict["canary_last_ms"]) == (2.1, 3.0)
    assert verdict["passed"]  # reported, not checked


def test_the_canary_reads_a_cpu_time_that_grows_with_its_work() -> None:
    small, large = Canary(megabytes=1, steps=0), Canary(megabytes=1, steps=2_000_000)
    assert 0 < small.take_ms() < large.take_ms()  # two million interpreter steps: tens of ms, on any machine


def test_commas_and_semicolons_inside_a_quoted_description_do_not_split_the_header() -> None:
    header = r'db;dur=1.5;desc="a, b; c", cache;desc="say \"hi\", then;";dur=2, edge;dur=3'
    assert server_timings(header) == {"db": 1.5, "cache": 2.0, "edge": 3.0}
    # An unterminated quoted string runs to the header's end: nothing in it is read as an entry.
    assert server_timings('app;dur=1;desc="open, x;dur=9') == {"app": 1.0}


def test_a_fixed_rate_starts_on_a_service_warmed_as_the_capacity_phase_warms_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With `--rate` there is no capacity phase; the open loop still starts after the same closed-loop warm-up."""
    calls: list[tuple[str, float]] = []

    class Proc:
        pid = 4242

    async def closed_loop(base: str, seconds: float, *args: object, **kwargs: object) -> Report:
        calls.append(("closed_loop", seconds))
        return Report(results=[Result(200, 0.001, False, b"{}")] * int(40 * seconds))  # 40 answers a second

    async def drive(base: str, rate: float, *args: object) -> tuple[list[Tick], list[dict[str, Any]]]:
        calls.append(("drive", rate))
        return [], []

    monkeypatch.setattr(subprocess, "Popen", lambda *args, **kwargs: Proc())
    monkeypatch.setattr(soak, "wait_ready", lambda *args: None)
    monkeypatch.setattr(soak, "stop", lambda proc: calls.append(("stop", 0.0)))
    monkeypatch.setattr(soak, "load_queries", lambda: ["hi"])
    monkeypatch.setattr(soak, "closed_loop", closed_loop)
    monkeypatch.setattr(soak, "drive", drive)
    monkeypatch.setattr(soak, "evaluate", lambda *args: {"passed": True})
    soak.run(1, 0.5, 2, 250.0, 5.0)
    assert calls == [("closed_loop", 2.0), ("drive", 250.0), ("stop", 0.0)]
    calls.clear()
    soak.run(1, 0.5, 2, None, 5.0)  # the capacity phase: the warm-up, its 5 s, then half of what it read
    assert calls == [("closed_loop", 2.0), ("closed_loop", 5.0), ("drive", 20.0), ("stop", 0.0)]


def test_a_metrics_sum_adds_every_label_set_of_one_metric_and_no_other() -> None:
    from loadtest.service_readings import metric_sum

    text = (
        "# HELP intent_worker_resident_bytes Resident memory\n"
        "# TYPE intent_worker_resident_bytes gauge\n"
        'intent_worker_resident_bytes{pid="11"} 1.5e+08\n'
        'intent_worker_resident_bytes{pid="12"} 5.0e+07\n'
        "intent_worker_resident_bytes_other 9\n"
        "intent_worker_cpu_seconds_total 12.5\n"
        "intent_worker_cpu_seconds_created 1.7e+09\n"
    )
    assert metric_sum(text, "intent_worker_resident_bytes") == 2.0e8
    assert metric_sum(text, "intent_worker_cpu_seconds_total") == 12.5
    assert metric_sum(text, "intent_ready") is None
    assert metric_sum("intent_ready NaNx\n", "intent_ready") is None  # unreadable: as if absent


def test_a_service_whose_metrics_do_not_answer_reads_as_nothing() -> None:
    from loadtest.server import free_port
    from loadtest.service_readings import Reading, ScrapedService

    reader = ScrapedService(f"http://127.0.0.1:{free_port()}", timeout_s=1.0)  # nothing listens there
    assert reader.take() == Reading(None, None)


def test_ticks_keep_to_a_fixed_grid_however_long_each_takes() -> None:
    assert soak.next_tick(5.0, 5.0, now=5.04) == 10.0  # 40 ms spent reading the service: the next is still at 10 s
    due, times = 5.0, []
    for _ in range(24):  # two minutes of ticks, each 30 ms late
        times.append(due)
        due = soak.next_tick(due, 5.0, now=due + 0.03)
    assert times == [5.0 * k for k in range(1, 25)]
    assert soak.next_tick(5.0, 5.0, now=12.0) == 17.0  # a reading that outlasted a tick: the grid restarts from now


# `python -m loadtest.soak`'s arguments: each bad one is argparse's usage error (status 2, one line) before the
# service starts or the capacity is measured; a nan had started both and ended in a traceback.

SOAK_USAGE_ERROR = "python -m loadtest.soak: error: "


@pytest.fixture
def no_soak(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail("the soak started")

    monkeypatch.setattr(soak, "run", fail)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "0"], "argument --rate: must be a positive, finite number, got '0'"),
        (["--rate", "-5"], "argument --rate: must be a positive, finite number, got '-5'"),
        (["--rate", "nan"], "argument --rate: must be a positive, finite number, got 'nan'"),
        (["--capacity-seconds", "0"], "argument --capacity-seconds: must be a positive, finite number, got '0'"),
        (["--capacity-seconds", "-1"], "argument --capacity-seconds: must be a positive, finite number, got '-1'"),
        (["--workers", "0"], "argument --workers: must be a whole number of at least 1, got '0'"),
        (["--workers", "-2"], "argument --workers: must be a whole number of at least 1, got '-2'"),
        (["--minutes", "0"], "argument --minutes: must be a positive, finite number, got '0'"),
        (["--minutes", "inf"], "argument --minutes: must be a positive, finite number, got 'inf'"),
        (["--minutes", "nan"], "argument --minutes: must be a positive, finite number, got 'nan'"),
        (["--share", "nan"], "--share must be in (0, 1]"),
        (["--host", "http://"], "--host must be a URL, such as http://10.0.0.5:8000, got 'http://'"),
        (["--host", "10.0.0.5:8000"], "--host must be a URL, such as http://10.0.0.5:8000, got '10.0.0.5:8000'"),
    ],
)
@pytest.mark.usefixtures("no_soak")
def test_a_soak_refuses_bad_arguments_before_it_starts(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        soak.main([*args, "--out-dir", str(tmp_path / "out")])
    assert stopped.value.code == 2
    assert usage_error(capsys, "python -m loadtest.soak") == message  # and not even the CPU line on stdout


@pytest.mark.parametrize("place", ["proc", "under_a_file"])
@pytest.mark.usefixtures("no_soak")
def test_a_soak_refuses_an_out_dir_it_cannot_write_before_the_hour(
    place: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    out_dir, reason = {
        "proc": (Path("/proc/nope/x"), "No such file or directory"),
        "under_a_file": (tmp_path / "file" / "soak", "Not a directory"),
    }[place]
    with pytest.raises(SystemExit) as stopped:
        soak.main(["--minutes", "1", "--out-dir", str(out_dir)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"{SOAK_USAGE_ERROR}--out-dir {out_dir} cannot be written: {reason}"


def test_a_soak_leaves_no_out_dir_behind_before_its_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its writability was checked at parse time, and the check's directories removed: a run that stops before its
    # results (here, at once) leaves none.
    out_dir = tmp_path / "new" / "reports"

    def run(*args: object, **kwargs: object) -> None:
        assert not (tmp_path / "new").exists()
        raise RuntimeError("stopped here")  # what the run would do is not this test's

    monkeypatch.setattr(soak, "run", run)
    with pytest.raises(RuntimeError, match="stopped here"):
        soak.main(["--minutes", "0.5", "--rate", "10", "--out-dir", str(out_dir)])


@pytest.mark.parametrize("rate", [None, 250.0])
def test_a_soak_of_a_service_that_answers_no_request_stops_before_it_starts(
    rate: float | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A service that refuses every request (401 with INTENT_API_KEY set) had read as a capacity of 0, and the soak
    then offered 0 requests/s for its whole length."""
    stopped: list[bool] = []

    class Proc:
        pid = 4242

    async def closed_loop(*args: object, **kwargs: object) -> Report:
        return Report(results=[Result(401, 0.001, False, b"{}")] * 30, connect_errors=2)

    async def drive(*args: object) -> None:
        pytest.fail("the soak ran")

    monkeypatch.setattr(subprocess, "Popen", lambda *args, **kwargs: Proc())
    monkeypatch.setattr(soak, "wait_ready", lambda *args: None)
    monkeypatch.setattr(soak, "stop", lambda proc: stopped.append(True))
    monkeypatch.setattr(soak, "load_queries", lambda: ["hi"])
    monkeypatch.setattr(soak, "free_port", lambda: 18200)
    monkeypatch.setattr(soak, "closed_loop", closed_loop)
    monkeypatch.setattr(soak, "drive", drive)
    args = ["--minutes", "1", "--capacity-seconds", "1", "--out-dir", str(tmp_path)]
    assert soak.main([*args, *(["--rate", str(rate)] if rate else [])]) == 1
    assert stopped == [True]  # the service it started is stopped
    line = "error: http://127.0.0.1:18200 answered no request with 200 before the soak (answers: 401: 30, refused: 2)"
    assert capsys.readouterr().err == line + "\n"
    assert list(tmp_path.iterdir()) == []


def test_the_driver_drives_a_host_that_is_not_loopback() -> None:
    """`soak --host` on another machine had failed in the driver: "the load driver targets loopback addresses only".
    127.0.0.2 is not one of the names it took, and answers here."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-l"))
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def drive() -> Report:
        server = await asyncio.start_server(answer, "127.0.0.2", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await closed_loop(f"http://127.0.0.2:{port}", 0.2, ["hi"], connections=2)

    report = asyncio.run(drive())
    assert report.classes()["200"] > 0
    assert set(report.classes()) == {"200"}
    assert http_target("http://intent.example:8000") == ("intent.example", 8000)
    assert http_target("http://10.0.0.5") == ("10.0.0.5", 80)
    with pytest.raises(ValueError, match="the load driver speaks plain HTTP only, got 'https://10.0.0.5'"):
        http_target("https://10.0.0.5")


@pytest.mark.usefixtures("no_soak")
def test_a_soak_refuses_a_host_it_cannot_drive_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for host, message in [
        (
            "https://10.0.0.5:8443",
            "--host must be an http:// URL: the load driver speaks plain HTTP, got 'https://10.0.0.5:8443'",
        ),
        (
            "http://10.0.0.5:8000/v1",
            "--host must be a URL with no path, query or fragment, such as http://10.0.0.5:8000, got 'http://10.0.0.5:8000/v1'",
        ),
    ]:
        with pytest.raises(SystemExit) as stopped:
            soak.main(["--host", host])
        assert stopped.value.code == 2
        assert usage_error(capsys, "python -m loadtest.soak") == message


def test_a_soak_drives_a_remote_host_given_with_a_trailing_slash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def run(*args: object, host: str) -> None:
        asked.append(host)
        raise RuntimeError("stopped here")

    monkeypatch.setattr(soak, "ready_problem", lambda base: asked.append(base))
    monkeypatch.setattr(soak, "run", run)
    with pytest.raises(RuntimeError, match="stopped here"):
        soak.main(["--host", "http://10.0.0.5:8000/", "--minutes", "1", "--out-dir", str(tmp_path)])
    assert asked == ["http://10.0.0.5:8000", "http://10.0.0.5:8000"]


@pytest.mark.usefixtures("no_soak")
def test_a_soak_of_a_host_that_is_down_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It had waited two minutes, then ended in a traceback."""
    import functools

    from loadtest.server import free_port, ready_problem

    monkeypatch.setattr(soak, "ready_problem", functools.partial(ready_problem, within_s=0.3))
    host = f"http://127.0.0.1:{free_port()}"
    assert soak.main(["--host", host, "--minutes", "1", "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {host} is not ready: [Errno 111] Connection refused\n"


def test_a_soak_whose_server_does_not_start_says_why_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its server's output went nowhere: a setting the service refuses read "server exited with 2", a traceback."""
    monkeypatch.setenv("INTENT_MAX_TOP_K", "0")  # the service refuses it at start-up
    assert soak.main(["--minutes", "1", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: server exited with 2: ")
    assert "INTENT_MAX_TOP_K" in err
    assert list(tmp_path.iterdir()) == []  # nothing written: no run took place
