"""The Locust suite runs headless against a started server and reports exact percentiles."""

from __future__ import annotations

import importlib
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.run import run_locust
from loadtest.stats import histogram_quantile, quantile_interval
from tests.servers import running_server

# Marked one by one: the load tests start servers; the compare-model tests at the bottom need none.


@pytest.mark.integration
@pytest.mark.slow
def test_locust_open_loop_and_closed_loop(tmp_path: Path, data_path: Path) -> None:
    with running_server() as (base, _):
        open_loop = run_locust(base, tmp_path / "open", "open", users=4, seconds=4, rate=50, data=str(data_path))
        closed = run_locust(base, tmp_path / "closed", "closed", users=4, seconds=3, batch_share=0.2)
    for summary in (open_loop, closed):
        assert summary["errors"] == 0, summary["error_kinds"]
        assert summary["requests"] > 50
        for key in ("mean", "p50", "p90", "p99", "p99_9"):
            assert isinstance(summary["latency_ms"][key], float)
        assert summary["latency_ms"]["p50"] <= summary["latency_ms"]["p99"]
        assert summary["server_latency_ms"]["p50"] is not None
        assert summary["throughput_rps"] > 0
        # 4 users, 4 keep-alive connections, halfway through the run; the test server has one worker.
        assert summary["connections_by_process"] == [4]
        # Locust's own CPU over the window it measured: one process, so at most every core of the machine.
        used = summary["load_generator"]
        assert used["cpu_s"] > 0
        assert used["cores"] == pytest.approx(used["cpu_s"] / summary["duration_s"], rel=0.02, abs=0.002)
        assert 0 < used["cores"] <= (os.cpu_count() or 1)
        per_request = used["cpu_s"] / summary["requests"] * 1e6
        assert used["cpu_us_per_request"] == pytest.approx(per_request, abs=0.0005 / summary["requests"] * 1e6 + 0.05)
    # The open loop holds its arrival rate (50/s over 4 users), judged over the time the locustfile measured (from
    # its test_start to its test_stop), which can be shorter than -t: a fresh-clone CI run measured 1.46 s of the 4,
    # at 47.9/s. A closed loop would run hundreds a second.
    assert open_loop["duration_s"] >= 1.0
    assert 0.7 * 50 <= open_loop["requests"] / open_loop["duration_s"] <= 1.3 * 50
    assert closed["batch_latency_ms"]["p50"] is not None  # /predict/batch was in the mix
    on_disk = json.loads((tmp_path / "open" / "summary.json").read_text())
    assert on_disk["latency_from_schedule_ms"]["p99"] is not None
    # ~200 responses: too few for the p99's interval (it needs n * 0.99 * 0.01 >= 4, n >= 405).
    assert (open_loop["latency_p99_interval_ms"] is None) == (open_loop["requests"] < 405)
    assert (tmp_path / "open" / "report.html").stat().st_size > 1000
    assert (tmp_path / "open" / "locust_stats.csv").is_file()


@pytest.mark.integration
@pytest.mark.slow
def test_histogram_quantile_matches_prometheus_rules() -> None:
    before = {0.001: 0.0, 0.002: 0.0, float("inf"): 0.0}
    after = {0.001: 50.0, 0.002: 100.0, float("inf"): 100.0}
    assert histogram_quantile(0.5, before, after) == pytest.approx(0.001)
    assert histogram_quantile(0.75, before, after) == pytest.approx(0.0015)
    assert histogram_quantile(0.99, before, {0.001: 0.0, 0.002: 0.0, float("inf"): 0.0}) is None


def test_p99_interval_is_the_order_statistics_at_the_binomial_ranks() -> None:
    values = [float(v) for v in range(1000)]  # the k-th smallest is k
    spread = math.sqrt(1000 * 0.99 * 0.01)
    assert quantile_interval(values[::-1], 0.99) == [
        float(math.floor(990 - 1.96 * spread)),
        float(math.ceil(990 + 1.96 * spread)),
    ]
    assert quantile_interval(values[:404], 0.99) is None  # a rank spread under 2 samples
    assert quantile_interval(values[:405], 0.99) is not None


def test_p99_interval_covers_the_true_p99_about_95_times_in_100() -> None:
    rng = np.random.default_rng(0)
    true_p99 = math.log(100.0)  # of the unit exponential
    trials = 400
    covered = 0
    for _ in range(trials):
        bounds = quantile_interval(list(rng.exponential(size=1000)), 0.99)
        assert bounds is not None
        covered += bounds[0] <= true_p99 <= bounds[1]
    assert 0.92 <= covered / trials <= 0.99


def test_the_latency_summary_gives_the_mean_beside_the_percentiles() -> None:
    """A cascade's median is its early stage's time: 98 fast rows and 2 slow ones have a p50 of 0.2 ms and a mean
    of 0.796 ms, which only the mean shows."""
    from loadtest.stats import percentiles_ms

    times = [0.2] * 98 + [50.0, 10.0]
    summary = percentiles_ms(times)
    assert summary["mean"] == round(sum(times) / len(times), 4) == 0.796
    assert summary["p50"] == 0.2
    assert summary["p99"] == round(10.0 + 0.01 * (50.0 - 10.0), 4)  # numpy's linear interpolation between ranks
    assert percentiles_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None, "p99_9": None}


def test_compare_table_shows_the_p99_interval_where_there_is_one() -> None:
    from loadtest.compare import markdown

    def result(interval: list[float] | None) -> dict[str, object]:
        rate = {"latency_ms": {"p50": 1.0, "mean": 1.25, "p99": 2.5}, "latency_p99_interval_ms": interval, "errors": 0}
        return {
            "open_loop": [rate],
            "saturation_steps": [{"throughput_rps": 100.0, "errors": 0}],
            "saturation": {"throughput_rps": 100.0},
        }

    table = markdown({"ours": result([2.25, 3.0]), "theirs": result(None)}, [100.0], cpu="a CPU")
    rows = table.splitlines()
    assert "p50 / mean / p99 [95%] ms @ 100/s" in rows[2]
    # Nothing recorded of Locust's CPU or connections: empty cells.
    assert rows[4] == "| ours | 1.00 / 1.25 / 2.50 [2.25, 3.00] | 100.0 | 100 | 1.0x |  |  |"
    assert rows[5] == "| theirs | 1.00 / 1.25 / 2.50 | 100.0 | 100 | 1.0x |  |  |"


def test_compare_table_gives_locusts_cpu_at_the_peak_step() -> None:
    from loadtest.compare import markdown, peak_step

    def step(rps: float, errors: int, cores: float, per_request: float, held: list[int] | None = None) -> dict:
        used = {"cpu_s": cores * 5, "cores": cores, "cpu_us_per_request": per_request}
        return {"throughput_rps": rps, "errors": errors, "load_generator": used, "connections_by_process": held}

    rate = {"latency_ms": {"p50": 1.0, "mean": 1.5, "p99": 2.0}, "latency_p99_interval_ms": None, "errors": 0}
    # The fastest step had errors; the peak is the fastest clean one, whatever its latency.
    ours_steps = [step(900.0, 0, 0.31, 344.4, [8]), step(1800.0, 0, 0.62, 344.4, [9, 7]), step(1900.0, 3, 0.66, 347.0)]
    ours = {"open_loop": [rate], "saturation_steps": ours_steps, "saturation": {"throughput_rps": 900.0}}
    theirs_steps = [step(120.0, 0, 0.04, 333.3)]
    theirs = {"open_loop": [rate], "saturation_steps": theirs_steps, "saturation": {"throughput_rps": 120.0}}
    assert peak_step(ours) is ours_steps[1]
    assert peak_step({"saturation_steps": [step(5.0, 1, 0.1, 1.0)]}) is None
    rows = markdown({"ours": ours, "theirs": theirs}, [100.0], cpu="a CPU").splitlines()
    assert rows[2].endswith(
        "| ours / this, peak | Locust's own CPU at the peak: cores; per request "
        "| its connections by server process at the peak |"
    )
    assert rows[3] == "|" + "---|" * 7
    assert rows[4] == "| ours | 1.00 / 1.50 / 2.00 | 900.0 | 1800 | 1.0x | 0.62; 344 µs | 9 / 7 |"
    assert rows[5] == "| theirs | 1.00 / 1.50 / 2.00 | 120.0 | 120 | 15.0x | 0.04; 333 µs |  |"
    floor_steps = [step(4000.0, 0, 0.97, 240.0)]
    floor = {"open_loop": [rate], "saturation_steps": floor_steps, "saturation": {"throughput_rps": 4000.0}}
    rows = markdown({"ours": ours, "floor": floor}, [100.0], cpu="a CPU").splitlines()
    assert (
        rows[5]
        == "| floor | 1.00 / 1.50 / 2.00 | 4000.0 | 4000 | 0.5x | 0.97; 240 µs (Locust's limit, not the server's) |  |"
    )


@pytest.mark.integration
@pytest.mark.slow
def test_make_loadtest_runs_both_phases_with_its_own_servers(tmp_path: Path, data_path: Path) -> None:
    from loadtest.run import main

    args = ["--rates", "40", "--steps", "4", "--seconds", "3", "--step-seconds", "3", "--data", str(data_path)]
    assert main([*args, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["placement"]["latency"] == {"workers": 1, "server_cpus": "0", "locust_cpus": "1"}
    assert summary["placement"]["throughput"] == {"workers": 2, "server_cpus": "0,1", "locust_cpus": "0,1"}
    (rate,) = summary["open_loop"]
    (step,) = summary["saturation_steps"]
    for s in (rate, step):
        assert s["errors"] == 0
        assert s["latency_ms"]["p50"] is not None
    within_limit = step["latency_ms"]["p99"] <= 50.0
    assert summary["saturation"]["throughput_rps"] == (step["throughput_rps"] if within_limit else None)
    assert (tmp_path / "server_latency.log").is_file()
    assert (tmp_path / "server_throughput.log").is_file()


@pytest.mark.integration
@pytest.mark.slow
def test_loadtest_refuses_non_loopback_targets(tmp_path: Path) -> None:
    from loadtest.run import main

    assert main(["--host", "http://example.com:8000", "--out", str(tmp_path)]) == 2


@pytest.mark.integration
@pytest.mark.slow
def test_stage_means_come_from_histogram_deltas() -> None:
    from loadtest.stages import mean_ms

    before = {("inference", "sum"): 0.5, ("inference", "count"): 1000.0}
    after = {("inference", "sum"): 0.56, ("inference", "count"): 1100.0}
    assert mean_ms(before, after, "inference") == pytest.approx(0.6)
    assert mean_ms(before, before, "inference") is None
    assert mean_ms({}, {("queue", "sum"): 0.0, ("queue", "count"): 10.0}, "queue") == 0.0


@pytest.mark.integration
@pytest.mark.slow
def test_framework_overhead_benchmark_times_every_case() -> None:
    import asyncio

    from loadtest.overhead import measure

    results = asyncio.run(measure(n=50, rounds=2))
    assert set(results) == {
        "POST /predict, direct path",
        "POST /predict, FastAPI route (CORS on)",
        "GET /health, FastAPI route",
    }
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in results.values())


def test_compare_baselines_serve_the_teacher_when_it_exists(tmp_path: Path) -> None:
    from loadtest.compare import FINE_TUNED, choose_baseline_model

    teacher = tmp_path / "artifacts" / "teacher"
    teacher.mkdir(parents=True)
    (teacher / "config.json").write_text("{}")
    model = choose_baseline_model(tmp_path, tmp_path / "reports" / "compare")
    assert model.path == teacher
    assert model.kind == FINE_TUNED == "fine-tuned teacher"
    assert model.trained
    assert model.row_name("transformers pipeline (PyTorch fp32)") == "transformers pipeline (PyTorch fp32)"


def test_compare_baselines_fall_back_to_an_untrained_stand_in(tmp_path: Path) -> None:
    from loadtest.compare import STAND_IN, baseline_cmd, choose_baseline_model

    (tmp_path / "artifacts" / "teacher").mkdir(parents=True)  # a directory without config.json is not a teacher
    out = tmp_path / "reports" / "compare"
    model = choose_baseline_model(tmp_path, out)
    assert model.path == out / "baseline-model"
    assert model.kind == STAND_IN == "pretrained encoder, untrained head (timing only)"
    assert not model.trained
    assert model.row_name("Optimum ORT pipeline (fp32 ONNX)").endswith("(untrained head: timing only)")
    _, env = baseline_cmd("optimum_server", 8000, 2, Path("python"), model.path)
    assert env["BASELINE_MODEL"] == str(out / "baseline-model")


@pytest.mark.slow
def test_stand_in_is_the_pretrained_encoder_with_a_fresh_clinc_head(tmp_path: Path) -> None:
    from loadtest.compare import LABELS, STAND_IN_DONE, build_stand_in

    path = tmp_path / "baseline-model"
    (tmp_path / "baseline-model.partial").mkdir()  # left by an interrupted build: replaced
    build_stand_in(path)
    config = json.loads((path / "config.json").read_text())
    labels = json.loads(LABELS.read_text())
    assert list(config["id2label"].values()) == labels
    assert len(labels) == 151
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (384, 6, 12)
    assert (path / "tokenizer.json").is_file()
    assert not (tmp_path / "baseline-model.partial").exists()
    done = (path / STAND_IN_DONE).stat().st_mtime_ns
    build_stand_in(path)  # complete and for the same labels: kept
    assert (path / STAND_IN_DONE).stat().st_mtime_ns == done


def test_free_ports_are_outside_the_ephemeral_range_and_never_handed_out_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loadtest import server

    ephemeral = server.ephemeral_ports()
    ports = [server.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    for port in ports:
        assert port not in ephemeral
        assert 10000 <= port < 65536
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free
    custom = tmp_path / "range"
    custom.write_text("20000\t40000\n")
    assert server.ephemeral_ports(custom) == range(20000, 40001)
    assert server.ephemeral_ports(tmp_path / "missing") == range(32768, 61000)
    custom.write_text("garbage")
    assert server.ephemeral_ports(custom) == range(32768, 61000)
    # Where the kernel hands out nearly every port, it picks one itself.
    monkeypatch.setattr(server, "ephemeral_ports", lambda: range(10500, 65000))
    with socket.socket() as s:
        s.bind(("127.0.0.1", server.free_port()))


def test_the_baselines_app_answers_the_routes_the_load_test_calls() -> None:
    from fastapi.testclient import TestClient

    from loadtest.baselines.pipeline_app import pipeline_app

    seen: list[str] = []

    def classifier(text: str) -> list[dict[str, object]]:
        seen.append(text)
        return [{"label": "greeting", "score": 0.75}, {"label": "oos", "score": 0.25}]

    with TestClient(pipeline_app("baseline: fake", classifier, ["greeting", "oos"])) as client:
        answer = client.post("/predict", json={"text": "hello there"})
        assert (answer.status_code, answer.json()) == (200, {"intent": "greeting", "confidence": 0.75})
        assert seen == ["hello there"]
        assert client.post("/predict", json={"txt": "hello"}).status_code == 422
        assert client.get("/ready").json() == {"status": "ready"}
        assert client.get("/model").json() == {"labels": ["greeting", "oos"]}
        assert client.get("/openapi.json").json()["info"]["title"] == "baseline: fake"


def test_the_floor_is_the_service_around_a_model_that_does_no_work() -> None:
    from fastapi.testclient import TestClient

    from loadtest.floor import InstantModel, create_floor_app

    labels = json.loads((Path("models/clinc150") / "labels.json").read_text())
    with TestClient(create_floor_app()) as client:
        assert client.get("/ready").status_code == 200
        answer = client.post("/predict", json={"text": "what is my balance"})
        assert answer.status_code == 200
        assert answer.json() == {"intent": "oos", "confidence": 1.0, "model_version": "floor"}
        assert answer.headers["server-timing"].split(", ")[1].endswith('desc="none"')  # on inference
        ranked = client.post("/predict", json={"text": "hi", "top_k": 3}).json()["top_k"]
        assert ranked == [{"intent": label, "confidence": 0.0} for label in labels if label != "oos"][:3]
        card = client.get("/model").json()
        assert (card["version"], card["labels"], card["serving"]["weights"]) == ("floor", labels, "none")
        # Everything around the model is the service's own: its errors, its limits, its metrics.
        empty = client.post("/predict", json={"text": "   "})
        assert (empty.status_code, empty.json()["error"]["type"]) == (422, "empty_text")
        assert client.post("/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 400
        assert 'intent_requests_total{method="POST",route="/predict",status="200"} 2.0' in client.get("/metrics").text
    with pytest.raises(ValueError, match="'oos'"):
        InstantModel(["greeting"], "oos")
    # A team's model names its own OOS label in its card; the floor answers that one.
    other = InstantModel(["greeting", "none", "bye"], "none").predict("hi", top_k=5)
    assert (other.intent, other.top_k) == ("none", [("greeting", 0.0), ("bye", 0.0)])


def test_compare_runs_the_floor_last_on_our_interpreter_and_settings() -> None:
    from loadtest.compare import FLOOR, STAND_IN, BaselineModel, servers
    from loadtest.server import floor_server, our_server

    model = BaselineModel(Path("baseline-model"), STAND_IN)
    names = [name for name, _ in servers(False, model)]
    assert len(names) == 3
    assert names[0].startswith("ours")
    assert names[-1] == FLOOR
    assert [name for name, _ in servers(False, model, include_floor=False)] == names[:-1]
    ours_cmd, ours_env = our_server(9000, 2)
    cmd, env = floor_server(9000, 2)
    assert cmd == [ours_cmd[0], "-m", "loadtest.floor"]
    assert env == ours_env


@pytest.mark.integration
@pytest.mark.slow
def test_the_floor_serves_with_the_services_workers_and_stops_on_sigterm(tmp_path: Path) -> None:
    from loadtest.server import floor_server, free_port, serve
    from tests.servers import get, post

    port = free_port()
    cmd, env = floor_server(port, 2)
    with serve(cmd, env, port, None, log=tmp_path / "floor.log") as base:
        assert post(base + "/predict", {"text": "book a flight"}) == (
            200,
            {"intent": "oos", "confidence": 1.0, "model_version": "floor"},
        )
        status, body = get(base + "/metrics")
        assert status == 200
        assert b"intent_requests_total" in body
    assert "Traceback" not in (tmp_path / "floor.log").read_text()


@pytest.mark.parametrize(
    ("setting", "labels", "code", "line"),
    [
        (
            "INTENT_WORKERS",
            None,
            2,
            "error: invalid setting INTENT_WORKERS: Input should be greater than or equal to 0",
        ),
        (
            "INTENT_OPEN_PATHS",
            None,
            2,
            'error: invalid setting INTENT_OPEN_PATHS: not JSON; write a list as ["a", "b"]',
        ),
        ("INTENT_MODEL_DIR", None, 1, "error: no labels for the floor in {dir}: missing {dir}/card.json"),
        (
            "INTENT_MODEL_DIR",
            b'{"oos": 1}',
            1,
            "error: no labels for the floor in {dir}: labels.json must be a non-empty JSON list of strings",
        ),
        (
            "INTENT_MODEL_DIR",
            b'["greeting"]',
            1,
            "error: no labels for the floor in {dir}: the OOS label 'oos' is not in labels.json",
        ),
        (
            "INTENT_MODEL_DIR",
            b'["greeting", "oos"]',
            1,
            "error: no labels for the floor in {dir}: the spec says 151 labels but labels.json has 2",
        ),
        ("INTENT_MODEL_DIR", b"[", 1, "error: no labels for the floor in {dir}: unreadable labels.json: "),
    ],
)
def test_the_floor_refuses_bad_settings_and_labels_in_one_line(
    tmp_path: Path, setting: str, labels: bytes | None, code: int, line: str
) -> None:
    """As `python -m app` does: exit 2 for a setting, 1 for what it serves; one line, before any worker starts."""
    import os
    import shutil
    import subprocess

    from tests.conftest import ROOT
    from tests.servers import SERVE_PYTHON, free_port

    value = {"INTENT_WORKERS": "-1", "INTENT_OPEN_PATHS": "/health"}.get(setting, str(tmp_path))
    if labels is not None:  # beside the served model's card, which names 151 labels and 'oos'
        shutil.copy(ROOT / "models/clinc150/card.json", tmp_path / "card.json")
        (tmp_path / "labels.json").write_bytes(labels)
    # Were it to start anyway, it would serve until the timeout below, and the test would fail on it.
    env = {**os.environ, setting: value, "INTENT_PORT": str(free_port())}
    r = subprocess.run(
        [str(SERVE_PYTHON), "-m", "loadtest.floor"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == code
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(line.format(dir=tmp_path))


def _load_result(peak_rps: float, p99_ms: float) -> dict[str, object]:
    rate = {
        "latency_ms": {"p50": 1.0, "mean": 1.5, "p99": p99_ms},
        "latency_p99_interval_ms": None,
        "errors": 0,
        "throughput_rps": 99.0,
    }
    return {
        "open_loop": [rate],
        "saturation_steps": [
            {"throughput_rps": peak_rps / 2, "errors": 0, "latency_ms": {"p99": 10.0}},
            {"throughput_rps": peak_rps, "errors": 0, "latency_ms": {"p99": 40.0}},
            {"throughput_rps": peak_rps * 2, "errors": 3, "latency_ms": {"p99": 90.0}},  # errors: never a peak
        ],
        "saturation": {"throughput_rps": peak_rps},
    }


def test_compare_rounds_rotate_the_order_and_report_each_ratio_with_its_median(tmp_path: Path) -> None:
    from loadtest.compare import markdown, plot, rotated, rounds_table

    assert rotated(["ours", "a", "b"], 0) == ["ours", "a", "b"]
    assert rotated(["ours", "a", "b"], 1) == ["a", "b", "ours"]
    assert rotated(["ours", "a", "b"], 5) == ["b", "ours", "a"]
    # Three rounds; the host drifts, so ours' peak moves more than the baseline's.
    rounds = [
        {"ours": _load_result(2000, 5.0), "theirs": _load_result(100, 80.0)},
        {"ours": _load_result(1200, 7.0), "theirs": _load_result(120, 90.0)},
        {"ours": _load_result(1800, 4.0), "theirs": _load_result(110, 70.0)},
    ]
    rows = rounds_table(rounds, [100.0]).splitlines()
    assert rows[0] == "# each of 3 rounds, and the median"
    # Ratios per round: 2000/100, 1200/120, 1800/110 = 20.0, 10.0, 16.4; their median, not the ratio of medians.
    assert rows[4] == "| ours | 2000, 1200, 1800 | 1800 | 1.0, 1.0, 1.0 | 1.0 | 5.00, 7.00, 4.00 | 5.00 |"
    assert rows[5] == "| theirs | 100, 120, 110 | 110 | 20.0, 10.0, 16.4 | 16.4 | 80.00, 90.00, 70.00 | 80.00 |"
    assert markdown(rounds[1], [100.0], cpu="a CPU", label="round 2 of 3").splitlines()[0] == (
        "# ours against the baselines on a CPU (round 2 of 3)"
    )
    plot(rounds, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_compare_refuses_fewer_than_one_round(capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest.compare import main

    with pytest.raises(SystemExit) as stopped:
        main(["--rounds", "0"])
    assert stopped.value.code == 2
    assert "--rounds must be at least 1" in capsys.readouterr().err


# `python -m loadtest.run` and `python -m loadtest.compare`: each bad argument is argparse's usage error (status 2,
# one line) before a server, Locust or (compare) the baselines' stand-in model starts.

BAD_SCENARIOS = [
    (["--seconds", "0"], "argument --seconds: must be a whole number of at least 1, got '0'"),
    (["--seconds", "-3"], "argument --seconds: must be a whole number of at least 1, got '-3'"),
    (["--step-seconds", "0"], "argument --step-seconds: must be a whole number of at least 1, got '0'"),
    (["--rates", "100,0"], "argument --rates: must be comma-separated positive, finite numbers, got '0' in '100,0'"),
    (["--rates=-5"], "argument --rates: must be comma-separated positive, finite numbers, got '-5' in '-5'"),
    (["--rates", "abc"], "argument --rates: must be comma-separated positive, finite numbers, got 'abc' in 'abc'"),
    (["--steps", "8,x"], "argument --steps: must be comma-separated whole numbers of at least 1, got 'x' in '8,x'"),
    (["--steps", "8,0"], "argument --steps: must be comma-separated whole numbers of at least 1, got '0' in '8,0'"),
    (["--workers", "-1"], "argument --workers: must be a whole number of at least 1, got '-1'"),
    (["--latency-workers", "0"], "argument --latency-workers: must be a whole number of at least 1, got '0'"),
]


@pytest.fixture
def nothing_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails the test if a server or Locust would start, or compare would build its stand-in model."""
    from loadtest import compare, run

    def fail(*args: object, **kwargs: object) -> None:
        pytest.fail("a measurement started")

    for module, name in [(run, "measure"), (run, "run_locust"), (compare, "measure"), (compare, "build_stand_in")]:
        monkeypatch.setattr(module, name, fail)


def usage_error(capsys: pytest.CaptureFixture[str], prog: str) -> str:
    """The one error line of an argparse usage error, after checking nothing was printed before it."""
    out, err = capsys.readouterr()
    assert out == ""  # not even the CPU line
    assert err.startswith(f"usage: {prog} ")
    last = err.splitlines()[-1]
    assert last.startswith(f"{prog}: error: ")
    return last.removeprefix(f"{prog}: error: ")


@pytest.mark.parametrize(
    ("tool", "args", "message"),
    [
        *(("run", args, message) for args, message in BAD_SCENARIOS),
        (
            "run",
            ["--host", "localhost:8748"],
            "--host must be a URL, such as http://127.0.0.1:8000, got 'localhost:8748'",
        ),
        ("run", ["--host", "not-a-url"], "--host must be a URL, such as http://127.0.0.1:8000, got 'not-a-url'"),
        ("run", ["--host", "http://"], "--host must be a URL, such as http://127.0.0.1:8000, got 'http://'"),
        # compare: before it builds its stand-in model
        *(("compare", *BAD_SCENARIOS[i]) for i in (0, 3, 5, 6, 8)),
    ],
)
@pytest.mark.usefixtures("nothing_started")
def test_loadtest_and_compare_refuse_bad_arguments_before_anything_starts(
    tool: str, args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = importlib.import_module(f"loadtest.{tool}").main
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    assert usage_error(capsys, f"python -m loadtest.{tool}") == message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", ["run", "compare"])
@pytest.mark.usefixtures("nothing_started")
def test_loadtest_and_compare_refuse_an_out_they_cannot_write_before_they_start(
    tool: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib

    main = importlib.import_module(f"loadtest.{tool}").main
    (tmp_path / "file").write_text("x")
    for out, reason in [
        (Path("/proc/nope/x"), "No such file or directory"),
        (tmp_path / "file" / "x", "Not a directory"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            main(["--out", str(out)])
        assert stopped.value.code == 2
        assert usage_error(capsys, f"python -m loadtest.{tool}") == f"--out {out} cannot be written: {reason}"


def test_loadtest_passes_its_parsed_scenario_on_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Valid arguments read as before: rates as floats, steps as ints, an empty list as none."""
    from loadtest import run

    seen: list[run.Scenario] = []

    def measure(make: object, host: object, out: Path, scenario: run.Scenario, **kwargs: object) -> None:
        seen.append(scenario)
        raise RuntimeError("stopped here")

    monkeypatch.setattr(run, "measure", measure)
    with pytest.raises(RuntimeError, match="stopped here"):
        run.main(["--rates", "40,0.5", "--steps", "", "--seconds", "3", "--workers", "1", "--out", str(tmp_path)])
    (scenario,) = seen
    assert scenario.rates == [40.0, 0.5]
    assert scenario.steps == []
    assert scenario.seconds == 3
    assert scenario.step_seconds == 10
    assert scenario.throughput == run.Placement(1, "0,1", "0,1")
    assert run.scenario_from_args(run.parse_args(["--out", str(tmp_path)])).rates == [100.0, 400.0, 800.0]
    assert run.scenario_from_args(run.parse_args(["--out", str(tmp_path)])).steps == [8, 16, 32, 64]


def _phase(mode: str, requests: int, errors: int = 0) -> dict[str, Any]:
    """A Locust phase's summary (loadtest.locustfile), with what the table reads."""
    lat = {"p50": 1.0, "mean": 1.0, "p90": 1.0, "p99": 2.0, "p99_9": 3.0}
    return {
        "mode": mode,
        "target_rate": 10.0 if mode == "open" else None,
        "users": 8,
        "requests": requests,
        "errors": errors,
        "throughput_rps": requests / 2,
        "latency_ms": lat if requests else dict.fromkeys(lat),
        "server_latency_ms": {"p50": 1.0, "p99": 2.0},
        "load_generator": {"cores": 0.1},
    }


def _measured(open_requests: int, closed_requests: int, errors: int = 0) -> Any:
    def measure(*args: object, **kwargs: object) -> dict[str, Any]:
        return {
            "open_loop": [_phase("open", open_requests, errors)],
            "saturation_steps": [_phase("closed", closed_requests, errors)],
            "saturation": {"throughput_rps": None, "p99_ms": None, "rule": "r"},
        }

    return measure


@pytest.mark.parametrize(
    ("open_requests", "closed_requests", "errors", "code", "line"),
    [
        (20, 40, 0, 0, None),
        (0, 40, 0, 1, "error: no request succeeded in open 10/s"),  # '//predict': no request, no error
        (0, 0, 20, 1, "error: no request succeeded in open 10/s, closed, 8 users"),  # every one failed
    ],
)
def test_loadtest_fails_naming_each_phase_in_which_no_request_succeeded(
    open_requests: int,
    closed_requests: int,
    errors: int,
    code: int,
    line: str | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from loadtest import run
    from loadtest.queries import read_queries

    monkeypatch.setattr(run, "measure", _measured(open_requests, closed_requests, errors))
    assert run.main(["--out", str(tmp_path)]) == code
    err = capsys.readouterr().err.strip()
    assert err == (line or "")
    summary = json.loads((tmp_path / "summary.json").read_text())  # written either way
    texts, source = read_queries()
    assert summary["setup"]["queries"] == {"source": source, "count": len(texts)}


class _Ready:
    """A server on loopback answering GET /ready with `status`."""

    def __init__(self, status: int) -> None:
        import http.server
        import threading

        answer = status

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(answer)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_target_is_ready_only_when_its_ready_answers_200() -> None:
    import contextlib
    import threading

    from loadtest.server import free_port, ready_problem

    for status, problem in [(200, None), (503, "/ready answered 503")]:
        server = _Ready(status)
        try:
            assert ready_problem(server.url, within_s=0.3) == problem
        finally:
            server.close()
    assert ready_problem(f"http://127.0.0.1:{free_port()}", within_s=0.3) == "[Errno 111] Connection refused"
    with socket.socket() as other:  # listening, but not speaking HTTP
        other.bind(("127.0.0.1", 0))
        other.listen()

        def garbage() -> None:
            with contextlib.suppress(OSError):  # the socket closed at the test's end
                while True:
                    conn, _ = other.accept()
                    conn.recv(1024)
                    conn.sendall(b"garbage\r\n\r\n")
                    conn.close()

        threading.Thread(target=garbage, daemon=True).start()
        url = f"http://127.0.0.1:{other.getsockname()[1]}"
        assert ready_problem(url, within_s=0.3) == "not an HTTP answer (BadStatusLine: garbage)"
    assert ready_problem("http://no-such-host.invalid:8000", within_s=0.3) is not None  # a name that does not resolve


@pytest.mark.usefixtures("nothing_started")
def test_loadtest_refuses_a_host_that_is_down_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It had measured errors alone, and exited 0."""
    import functools

    from loadtest import run
    from loadtest.server import free_port, ready_problem

    monkeypatch.setattr(run, "ready_problem", functools.partial(ready_problem, within_s=0.3))
    host = f"http://127.0.0.1:{free_port()}"
    assert run.main(["--host", host + "/", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {host} is not ready: [Errno 111] Connection refused\n"


def test_a_server_that_exits_at_start_says_why(tmp_path: Path) -> None:
    """stress had sent its server's output to /dev/null: `--max-queue 0` ended in "server exited with 2" alone."""
    import subprocess
    import sys

    from loadtest.server import ServerExited, wait_ready

    log = tmp_path / "server.log"
    with log.open("wb") as out:
        script = "import sys; print('starting'); sys.exit('error: invalid setting INTENT_MAX_QUEUE')"
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=out, stderr=out)
    proc.wait(30)
    with pytest.raises(ServerExited) as exited:
        wait_ready("http://127.0.0.1:9", proc, "/ready", 30, log)
    assert str(exited.value) == "server exited with 1: starting | error: invalid setting INTENT_MAX_QUEUE"


# Queries: a --data (or LOADTEST_DATA) given that cannot be read is an error; only the default path, where ../shared
# is absent, falls back to the built-in sentences.


def test_an_explicit_query_file_that_cannot_be_read_is_an_error(
    tmp_path: Path, data_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loadtest import queries

    monkeypatch.delenv("LOADTEST_DATA", raising=False)
    (tmp_path / "bad.json").write_text('{"val": 1}')
    (tmp_path / "empty.json").write_text('{"val": [], "oos_val": []}')
    for path, reason in [
        (tmp_path / "typo.json", "No such file or directory"),
        (tmp_path / "bad.json", "not CLINC150 JSON with val and oos_val"),
        (tmp_path / "empty.json", "no validation texts"),
        (tmp_path, "Is a directory"),
    ]:
        with pytest.raises(queries.QueryError) as refused:
            queries.load_queries(path)
        assert str(refused.value) == f"cannot read queries from {path}: {reason}"
    monkeypatch.setenv("LOADTEST_DATA", str(tmp_path / "typo.json"))  # how run.py hands --data to Locust
    with pytest.raises(queries.QueryError):
        queries.load_queries()
    monkeypatch.delenv("LOADTEST_DATA")
    assert queries.read_queries(data_path) == (queries.load_queries(data_path), str(data_path))
    monkeypatch.setattr(queries, "DEFAULT_DATA", tmp_path / "no-shared" / "clinc150.json")
    assert queries.read_queries() == (queries.BUILTIN, "built-in")


@pytest.mark.usefixtures("nothing_started")
def test_loadtest_refuses_a_data_file_it_cannot_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from loadtest import run

    with pytest.raises(SystemExit) as stopped:
        run.main(["--data", str(tmp_path / "typo.json"), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    message = f"cannot read queries from {tmp_path / 'typo.json'}: No such file or directory"
    assert usage_error(capsys, "python -m loadtest.run") == message


def test_the_floor_parses_its_arguments_and_refuses_a_busy_port_before_it_serves(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--help had started a server on port 8000; a busy port had logged `ready`, then errno 98."""
    from loadtest import floor

    def fail(*args: object) -> int:
        pytest.fail("the floor served")

    monkeypatch.setattr(floor, "run_workers", fail)
    with pytest.raises(SystemExit) as done:
        floor.main(["--help"])
    assert done.value.code == 0
    assert "usage: python -m loadtest.floor" in capsys.readouterr().out
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("INTENT_HOST", "127.0.0.1")
        monkeypatch.setenv("INTENT_PORT", str(port))
        assert floor.main([]) == 2
    line = f"error: cannot listen on INTENT_HOST 127.0.0.1 INTENT_PORT {port}: Address already in use\n"
    assert capsys.readouterr().err == line


@pytest.mark.parametrize(("max_queue", "batch"), [(64, 8), (512, 100), (2048, 1000)])
def test_stress_starts_the_service_with_limits_it_accepts(
    max_queue: int, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch over 87 texts needs a body limit over the default, which the service checks at start-up."""
    from app.config import Settings
    from loadtest.stress import limits_env

    for name, value in limits_env(max_queue, batch).items():
        monkeypatch.setenv(name, value)
    assert Settings().max_batch == min(batch, max_queue)
