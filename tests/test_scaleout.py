"""`make scaleout`: replicas behind a real HAProxy (Debian's package, installed by the test if missing),
a replica killed and every replica restarted in turn under open-loop load."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from datetime import datetime
from pathlib import Path

import pytest

from loadtest import scaleout


def test_render_puts_this_runs_ports_and_socket_into_the_shipped_config(tmp_path: Path) -> None:
    text = scaleout.render(scaleout.CONFIG.read_text(), 9000, [9101, 9102, 9103, 9104], tmp_path / "s.sock")
    lines = [line.strip() for line in text.splitlines()]
    assert [line for line in lines if line.startswith("server ")] == [
        f"server replica{i} 127.0.0.1:910{i}" for i in range(1, 5)
    ]
    assert "bind 127.0.0.1:9000" in lines
    assert f"stats socket {tmp_path / 's.sock'} mode 600 level admin" in lines
    # Everything else is the shipped file's: health checks on /ready and retries elsewhere.
    assert "option httpchk GET /ready" in lines
    assert "retry-on conn-failure empty-response response-timeout 503" in lines
    with pytest.raises(ValueError, match="no server lines"):
        scaleout.render("frontend f\n    bind :1\n", 1, [2], tmp_path / "s")


@pytest.mark.integration
def test_shipped_and_rendered_configs_are_valid_for_haproxy(tmp_path: Path) -> None:
    binary = scaleout.haproxy_binary()
    rendered = tmp_path / "haproxy.cfg"
    rendered.write_text(scaleout.render(scaleout.CONFIG.read_text(), 9000, [9101, 9102], tmp_path / "s.sock"))
    for config in (scaleout.CONFIG, rendered):
        check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr


def test_the_load_is_a_share_of_the_measured_capacity() -> None:
    replica = {"single_rps": 400.0, f"batch{scaleout.BATCH}_rps": 40.0}
    # One single takes 1/400 of a replica's time, a batch 1/40; batches come at a tenth of the singles' rate.
    per_rate = 1 / 400 + scaleout.BATCH_SHARE / 40
    assert scaleout.mix_rate(replica) == pytest.approx(1 / per_rate)
    rate = scaleout.mix_rate(replica)
    assert rate / 400 + rate * scaleout.BATCH_SHARE / 40 == pytest.approx(1.0)  # exactly one replica's time
    # A pool that scales: half the sum of three replicas.
    roomy = {"single_rps": 1200.0, f"batch{scaleout.BATCH}_rps": 120.0}
    assert scaleout.load_rate(replica, roomy, replicas=3, share=0.5) == pytest.approx(0.5 * 3 / per_rate)
    # Three replicas on two cores: the pool measured through the balancer has less than the sum, and rules.
    shared = {"single_rps": 300.0, f"batch{scaleout.BATCH}_rps": 30.0}
    expected = 0.5 / (1 / 300 + scaleout.BATCH_SHARE / 30)
    assert scaleout.load_rate(replica, shared, replicas=3, share=0.5) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no capacity"):
        scaleout.mix_rate({"single_rps": 0.0, f"batch{scaleout.BATCH}_rps": 10.0})
    with pytest.raises(ValueError, match="no capacity"):
        scaleout.load_rate(replica, {"single_rps": 10.0, f"batch{scaleout.BATCH}_rps": 0.0}, 3, 0.5)


def test_kills_are_summed() -> None:
    kills = [
        {"requests": 100, "failed": 0, "in_flight_on_killed": 3, "killed": "replica1"},
        {"requests": 120, "failed": 2, "in_flight_on_killed": 5, "killed": "replica2"},
    ]
    assert scaleout.total(kills) == {"requests": 220, "failed": 2, "in_flight_on_killed": 8}
    assert scaleout.total([]) == {"requests": 0, "failed": 0, "in_flight_on_killed": 0}


def _stats_socket_after(path: Path, first_miss: threading.Event) -> threading.Thread:
    """A stand-in for HAProxy's stats socket that appears only once a look for it has missed, then answers one
    `show stat` with replica1 UP."""

    def serve() -> None:
        first_miss.wait(30)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(str(path))
            server.listen(1)
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"# pxname,svname,status\nreplicas,replica1,UP\nreplicas,BACKEND,UP\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_waiting_for_a_status_outlasts_a_stats_socket_not_there_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load HAProxy accepts on its frontend before its stats socket exists (5 of 60 starts with the CPU busy)."""
    path, first_miss, misses = tmp_path / "haproxy.sock", threading.Event(), []
    real_show_stat = scaleout.show_stat

    def show_stat(stats_socket: Path) -> dict[str, dict[str, str]]:
        try:
            return real_show_stat(stats_socket)
        except OSError as exc:
            misses.append(type(exc).__name__)
            first_miss.set()
            raise

    monkeypatch.setattr(scaleout, "show_stat", show_stat)
    server = _stats_socket_after(path, first_miss)
    assert scaleout.wait_status(path, "replica1", "UP", timeout=30) > 0
    server.join(5)
    assert misses  # it looked before the socket was there, and went on looking
    assert set(misses) <= {"FileNotFoundError", "ConnectionRefusedError"}
    with pytest.raises(RuntimeError, match="HAProxy did not see replica1 UP within 0 s"):
        scaleout.wait_status(tmp_path / "never.sock", "replica1", "UP", timeout=0.2)


def test_help_and_argument_checks(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        scaleout.main(["--help"])
    assert done.value.code == 0
    assert "--kills" in capsys.readouterr().out
    for bad in (["--replicas", "1"], ["--load-share", "0"], ["--kills", "-1"]):
        with pytest.raises(SystemExit) as refused:
            scaleout.main(bad)
        assert refused.value.code == 2, bad


@pytest.mark.integration
@pytest.mark.slow
def test_kills_and_a_rolling_restart_lose_nothing(tmp_path: Path) -> None:
    out = tmp_path / "scaleout.json"
    result = scaleout.run(replicas_n=3, kills=2, kill_seconds=4.5, capacity_seconds=2.0, out=out)
    print(f"\nscaleout: capacity {result['capacity']}, rate {result['rate_rps']}\nkills {result['kills']}")
    print(f"rolling {result['rolling']}")

    assert json.loads(out.read_text()) == result
    assert result["replicas"] == 3
    assert result["balancer"].startswith("HAProxy version 2.")
    capacity = result["capacity"]
    assert capacity["replica"]["single_rps"] > 0
    assert capacity["pool"]["single_rps"] > 0
    assert result["rate_rps"] == round(scaleout.load_rate(capacity["replica"], capacity["pool"], 3, 0.5), 1)
    assert result["rate_rps"] > 0
    assert [k["killed"] for k in result["kills"]] == ["replica1", "replica2"]
    for kill in result["kills"]:
        assert set(kill) >= {"requests", "failed", "in_flight_on_killed", "marked_down_after_s"}
        assert kill["requests"] > 100
        # The balancer sends what the killed replica did not answer to another: nothing is lost.
        assert kill["failed"] == 0, kill
        assert kill["answers"] == {"200": kill["requests"]}, kill
    assert result["kill"] == scaleout.total(result["kills"])
    rolling = result["rolling"]
    assert rolling["failed"] == 0, rolling
    assert result["passed"] is True
    assert rolling["requests"] > 500
    assert [r["replica"] for r in rolling["restarts"]] == ["replica1", "replica2", "replica3"]


def test_the_balancer_log_counts_retries_and_keeps_unusual_endings(tmp_path: Path) -> None:
    # Lines as Debian's HAProxy 2.6 writes them with the rendered config (`option httplog`, raw to stdout).
    log = tmp_path / "haproxy.log"
    head = "127.0.0.1:1 [02/Dec/2026:04:55:17.640] intent "
    lines = [
        'replicas/replica1 0/0/0/2/2 200 310 - - ---- 3/3/1/1/0 0/0 "POST /predict HTTP/1.1"',
        'replicas/replica2 0/0/1/3/9 200 310 - - ---- 3/3/1/1/+2 0/0 "POST /predict HTTP/1.1"',
        'replicas/<NOSRV> 0/-1/-1/-1/0 503 217 - - SC-- 1/1/0/0/0 0/0 "POST /predict HTTP/1.1"',
        'replicas/replica3 0/0/0/-1/5 502 209 - - SH-- 1/1/0/0/3 0/0 "POST /predict/batch HTTP/1.1"',
    ]
    log.write_text("[NOTICE]   (1) : haproxy version is 2.6.12-1+deb12u3\n" + "".join(head + x + "\n" for x in lines))
    found = scaleout.balancer_log(log)
    assert found["logged"] == 4
    assert found["retried"] == 2
    assert found["unusual"] == lines[2:]
    assert scaleout.balancer_log(tmp_path / "missing.log") == {"logged": 0, "retried": 0, "unusual": []}
    # Requests accepted before `since` (the capacity probe, which overloads on purpose) are left out.
    late = log.read_text().replace("17.640]", "19.000]", 1)
    log.write_text(late)
    assert scaleout.balancer_log(log, datetime(2026, 12, 2, 4, 55, 18)) == {"logged": 1, "retried": 0, "unusual": []}
    # The rendered config asks for those lines.
    rendered = scaleout.render(scaleout.CONFIG.read_text(), 9000, [9101], tmp_path / "s.sock").splitlines()
    assert rendered[rendered.index("global") + 1] == "    log stdout format raw local0"
    assert rendered[rendered.index("defaults") + 1 : rendered.index("defaults") + 3] == [
        "    log global",
        "    option httplog",
    ]


@pytest.mark.parametrize("tool", ["scaleout", "stress"])
def test_a_server_that_does_not_start_is_one_line_with_its_reason(
    tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Their servers' output had gone to /dev/null (stress) or been left unread: "server exited with 2", and a
    traceback."""
    import importlib

    from loadtest.server import ServerExited

    module = importlib.import_module(f"loadtest.{tool}")
    logs: list[object] = []

    def run(*args: object) -> None:
        logs.append(args[-1])
        raise ServerExited("server exited with 2: error: invalid setting INTENT_MAX_QUEUE: too big")

    monkeypatch.setattr(module, "run", run)
    assert module.main(["--out", str(tmp_path / "r.json")]) == 1
    prefix = "a replica did not start: " if tool == "scaleout" else ""
    line = f"error: {prefix}server exited with 2: error: invalid setting INTENT_MAX_QUEUE: too big\n"
    assert capsys.readouterr().err == line
    if tool == "stress":
        assert logs == [tmp_path / "r.log"]  # where its server's output goes
