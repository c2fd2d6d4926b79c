"""Reliability under real uvicorn: graceful shutdown under load, overload (scaled down), and a short soak."""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import socket
import time
from pathlib import Path

import pytest

from loadtest import soak, stress
from loadtest.driver import closed_loop
from loadtest.queries import BUILTIN
from tests.servers import get, post, running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sigterm_drains_without_losing_accepted_requests() -> None:
    """SIGTERM under load: /ready turns 503 at once; traffic is still served during the shutdown delay;
    a long request that is in flight when the listeners close still completes; nothing accepted is lost.
    Ordered by cause, not by the clock: /ready is 503 while /health is still served; the 3 s delay leaves a
    busy machine room for every step before the listeners close."""
    delay = 3.0
    env = {
        "INTENT_SHUTDOWN_DELAY_S": str(delay),
        "INTENT_WORKERS": "1",
        "INTENT_MAX_BATCH": "1000",
        "INTENT_MAX_QUEUE": "2000",
        "INTENT_MAX_BODY_BYTES": str(8 << 20),  # to hold 1,000 texts (app.config.batch_body_bytes)
    }
    long_batch = {"texts": [f"please move {i} dollars from my savings account to checking " * 3 for i in range(1000)]}
    with running_server(env=env) as (base, proc):

        async def scenario() -> tuple:
            stop = asyncio.Event()
            # One connection per request, so a refused connection means "not accepted", never "lost".
            load = asyncio.create_task(closed_loop(base, 30, list(BUILTIN), connections=8, close_each=True, stop=stop))
            await asyncio.sleep(1.0)
            proc.send_signal(signal.SIGTERM)
            t0 = time.perf_counter()
            ready_after = None
            while time.perf_counter() - t0 < delay - 1.0:
                if await asyncio.to_thread(lambda: get(base + "/ready", 2.0)[0]) == 503:
                    ready_after = time.perf_counter() - t0
                    break
            # Asked after /ready turned 503: the service still serves while load balancers catch up.
            health = await asyncio.to_thread(lambda: get(base + "/health", 2.0)[0])
            await asyncio.sleep(1.0 - (time.perf_counter() - t0))
            stop.set()  # what a load balancer does once it has seen /ready fail
            await asyncio.sleep(delay - 0.5 - (time.perf_counter() - t0))
            # Accepted before the listeners close at `delay`, and still running well after that.
            batch_task = asyncio.create_task(
                asyncio.to_thread(lambda: post(base + "/predict/batch", long_batch, timeout=30))
            )
            await asyncio.sleep(delay + 0.5 - (time.perf_counter() - t0))
            try:  # listeners are closed now, while the long batch is still being answered
                refused_after_close = await asyncio.to_thread(lambda: get(base + "/health", 1.0)) and False
            except OSError:
                refused_after_close = True
            batch = await batch_task
            return await load, ready_after, health, batch, time.perf_counter() - t0, refused_after_close

        report, ready_after, health, (batch_status, batch_body), batch_done, refused = asyncio.run(scenario())
        proc.wait(30)
    answers = report.classes()
    print(
        f"\nSIGTERM under load: {answers}; /ready 503 after {ready_after} s; "
        f"long batch answered {batch_status} at +{batch_done:.2f} s (listeners closed at +{delay} s); "
        f"lost {report.lost}"
    )
    assert ready_after is not None  # /ready turned 503 within the drain window, before the listeners closed
    assert health == 200  # and the service still served after that
    assert batch_status == 200
    assert len(batch_body["predictions"]) == 1000
    assert batch_done > delay + 0.5  # it really was in flight when the listeners closed
    assert refused  # new connections are refused once the delay is over
    assert report.lost == 0
    assert set(answers) == {"200"}
    assert answers["200"] > 100
    assert proc.returncode == 0  # a drained stop, as the supervisor of several workers reports it


def test_sighup_stops_a_single_worker_as_sigterm_does(tmp_path: Path) -> None:
    """SIGHUP, which uvicorn handles only as the supervisor of several workers, had ended a single worker at once:
    killed by the signal, with no drain and no log line, and its temporary directories left behind."""
    # With an admin key, `python -m app` makes the model pointer's directory, under TMPDIR.
    env = {"INTENT_ADMIN_KEY": "k", "TMPDIR": str(tmp_path)}
    # SIGHUP's default in the child, whatever the runner's: one started under `nohup` ignores it, and so, by design,
    # would the service (the next test).
    with running_server(env=env, preexec=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL)) as (_, proc):
        assert len(list(tmp_path.glob("intent-model-*"))) == 1
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert b"SIGTERM: not ready" in err  # drained, as on SIGTERM
    assert b'"stopped"' in err
    assert list(tmp_path.glob("intent-model-*")) == []


def test_sighup_ignored_at_start_stays_ignored() -> None:
    """`nohup python -m app`: a SIGHUP ignored when the service started must not stop it when the terminal goes."""
    with running_server(preexec=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) as (base, proc):
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)  # a stop would begin at once; a slow machine can only make this pass late, never fail
        assert proc.poll() is None
        assert get(base + "/health")[0] == 200


def _ask(sock: socket.socket, text: str) -> bytes:
    """One POST /predict on an open connection; returns the response head, lower-cased, once the body is read."""
    body = json.dumps({"text": text}).encode()
    head = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    sock.sendall(head % len(body) + body)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    response_head, rest = data.split(b"\r\n\r\n", 1)
    length = int(
        next(h for h in response_head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1]
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return response_head.lower()


def test_while_draining_each_answer_closes_its_kept_alive_connection() -> None:
    """A client that keeps sending on a kept-alive connection through the drain lost the request it sent as the
    worker closed that connection idle (with SIGHUP, 4 in each of three runs of 4 connections). From the SIGTERM
    on, each answer says Connection: close and ends its connection, so the next request goes out on a new one."""
    env = {"INTENT_SHUTDOWN_DELAY_S": "5", "INTENT_WORKERS": "1"}
    with running_server(env=env) as (base, proc):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            head = _ask(sock, "what is my account balance")
            assert head.startswith(b"http/1.1 200")
            assert b"connection: close" not in head
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 4  # /ready turns 503 at once; this only catches one that never does
            while get(base + "/ready", 1.0)[0] != 503:
                assert time.monotonic() < deadline, "/ready did not turn 503"
                time.sleep(0.05)
            head = _ask(sock, "what is my account balance")  # the same connection, still served
            assert head.startswith(b"http/1.1 200")
            assert b"\r\nconnection: close" in head
            sock.settimeout(5)
            assert sock.recv(1) == b""  # and then closed by the server
        with socket.create_connection(("127.0.0.1", port), timeout=5) as fresh:  # a new one is served, and closed
            head = _ask(fresh, "book a flight to paris")
            assert head.startswith(b"http/1.1 200")
            assert b"\r\nconnection: close" in head


def test_a_kept_alive_connections_last_allowed_answer_closes_it() -> None:
    """`python -m app` with INTENT_KEEPALIVE_REQUESTS=3: the third answer on a connection says Connection: close and
    the server closes it, so that a client's connections are placed on the workers again now and then (a pool
    opened at once all lands on one worker more often than not); the client's next connection is served."""
    env = {"INTENT_KEEPALIVE_REQUESTS": "3", "INTENT_WORKERS": "2"}
    with running_server(env=env) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        for _ in range(2):  # a reopened connection gets its own count
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                heads = [_ask(sock, "what is my account balance") for _ in range(3)]
                assert [head.startswith(b"http/1.1 200") for head in heads] == [True] * 3
                assert [b"\r\nconnection: close" in head for head in heads] == [False, False, True]
                assert sock.recv(1) == b""  # closed by the server


def test_a_worker_started_under_a_low_soft_limit_on_open_files_still_takes_connections() -> None:
    """Started with a soft limit of 256 open files (systemd's and containerd 2's default is 1,024), `python -m app`
    raises it to the hard limit, so a worker holding 400 idle connections still answers a health check and a
    query. Under 256 the worker took no more connections: both were reset."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1024 or soft < 512:
        pytest.skip(f"this process may open only {soft} files (hard limit {hard})")

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    with running_server(preexec=lower) as (base, proc):
        limits = Path(f"/proc/{proc.pid}/limits").read_text().splitlines()
        row = next(line for line in limits if line.startswith("Max open files")).split()
        assert (row[3], row[4]) == (str(hard), str(hard))  # soft, hard
        port = int(base.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(400)]
        try:
            assert get(base + "/health", timeout=5) == (200, b'{"status":"ok"}')
            status, body = post(base + "/predict", {"text": "what is my account balance"}, timeout=10)
            assert status == 200
            assert body["intent"] == "balance"
        finally:
            for sock in idle:
                sock.close()


def test_overload_scaled_down() -> None:
    result = stress.run(seconds=6, factor=3.0, workers=1, max_queue=32, cpus=None, batch=8)
    print(f"\noverload: {result}")
    assert result["checks"]["only_200_429_503"], result["answers"]
    assert result["checks"]["shed_has_retry_after"]
    assert result["answers"].get("429", 0) > 0  # the queue did fill: load really exceeded capacity
    assert result["checks"]["accepted_p99_within_bound"], result["accepted_latency_ms"]
    assert result["checks"]["memory_flat"], result["rss_mb"]
    # Recovered: no errors, and answering again. The tool's own check (p99 within 2x + 5 ms of before the
    # overload) compares two noisy p99s of 150 requests, which one scheduler stall on a loaded machine
    # breaks; it stays in `make stress`. Here a generous bound catches a server that does not come back.
    assert result["after_errors"] == 0, result["after_ms"]
    assert result["after_ms"]["p99"] is not None
    assert result["after_ms"]["p99"] < 5000, (result["before_ms"], result["after_ms"])


def test_short_soak(tmp_path: Path) -> None:
    """`make soak` for half a minute (its windows scale down): measures capacity, drives half of it, writes the
    per-minute rows, the JSON and the plot. Asserted: no errors and memory; not the p99 comparison, which a
    few seconds of a busy machine decide (the hour-long run is where it means something)."""
    args = ["--minutes", "0.5", "--workers", "1", "--capacity-seconds", "2", "--out-dir", str(tmp_path)]
    assert soak.main(args) in (0, 1)  # 1 only says the bar was missed: the figures below decide
    result = json.loads((tmp_path / "soak.json").read_text())
    print("\nsoak:", {k: v for k, v in result.items() if k not in ("per_minute", "rss_samples")})
    assert (tmp_path / "soak.png").read_bytes()[:4] == b"\x89PNG"
    assert result["capacity_rps"] > 0
    assert result["rate_rps"] == pytest.approx(result["capacity_rps"] * 0.5, abs=0.1)
    assert result["errors"] == 0
    assert result["requests"] == pytest.approx(result["rate_rps"] * 30, abs=3)  # every scheduled request came back
    assert [row["minute"] for row in result["per_minute"]] == [1]
    minute = result["per_minute"][0]
    assert minute["errors"] == 0
    # Every answer's model path is part of the service's time for it, and that is part of its latency, so the
    # p99s keep that order (the header rounds to a microsecond); and the service spent CPU on what it answered.
    assert 0 < minute["model_p99_ms"] <= minute["service_p99_ms"] + 0.002
    assert minute["service_p99_ms"] <= minute["p99_ms"]
    assert 0 < minute["outside_p99_ms"] <= minute["p99_ms"]
    assert 0 <= minute["send_wait_p99_ms"] <= minute["p99_ms"]  # the wait before writing is part of the latency
    assert minute["server_cpu_ms_per_request"] > 0
    assert 0 < result["model_p99_first_ms"] <= result["p99_first_ms"]
    assert result["rss_growth"] <= 0.10
    assert set(result["checks"]) == {"no_errors", "rss_flat", "p99_steady"}


def test_a_service_read_through_its_metrics_matches_its_process_tree() -> None:
    """ScrapedService (what `make soak --host` reads) against ProcessTree (what it reads for a service it starts),
    on one running service: the workers' RSS is the tree's less the supervisor's, and the CPU they used over a
    burst of requests is the tree's, give or take the second the workers' samples may lag."""
    from loadtest.procs import children, rss_mb
    from loadtest.service_readings import ProcessTree, ScrapedService

    with running_server(env={"INTENT_WORKERS": "2"}) as (base, proc):
        time.sleep(1.5)  # both workers loaded and sampled
        tree, scraped = ProcessTree(proc.pid), ScrapedService(base)
        asyncio.run(closed_loop(base, 3, list(BUILTIN), connections=4))
        time.sleep(1.5)  # every worker has sampled since the burst
        by_tree, by_metrics = tree.take(), scraped.take()
        workers_rss = sum(rss_mb(pid) for pid in children(proc.pid))  # the resource tracker too: a few MB
    assert by_tree.rss_mb is not None
    assert by_metrics.rss_mb is not None
    assert by_metrics.rss_mb < by_tree.rss_mb  # the supervisor is not in /metrics
    assert 0.85 * workers_rss <= by_metrics.rss_mb <= 1.15 * workers_rss
    assert by_tree.cpu_s is not None
    assert by_metrics.cpu_s is not None
    assert 0.5 * by_tree.cpu_s <= by_metrics.cpu_s <= by_tree.cpu_s + 0.05


def test_a_short_soak_of_a_service_it_did_not_start(tmp_path: Path) -> None:
    """`make soak SOAK_ARGS="--host URL"`: the service runs apart (here on this machine, started by the test), and
    the soak reads its memory and CPU through /metrics."""
    with running_server(env={"INTENT_WORKERS": "2"}) as (base, proc):
        args = ["--minutes", "0.25", "--rate", "150", "--capacity-seconds", "1", "--out-dir", str(tmp_path)]
        assert soak.main([*args, "--host", base]) in (0, 1)  # 1 only says the bar was missed
        assert proc.poll() is None  # the soak leaves a service it did not start running
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["host"] == base
    assert result["workers"] is None
    assert "/metrics" in result["rss_of"]
    assert result["errors"] == 0
    assert result["requests"] == pytest.approx(150 * 15, abs=3)
    (minute,) = result["per_minute"]
    assert minute["rss_mb"] > 50  # two workers with the served model
    assert minute["server_cpu_ms_per_request"] > 0


def test_a_soak_of_an_address_that_is_not_a_url_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        soak.main(["--host", "10.0.0.5:8000"])
    assert exit_.value.code == 2
    assert "--host must be a URL, such as http://10.0.0.5:8000" in capsys.readouterr().err
