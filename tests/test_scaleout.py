"""`make scaleout`: replicas behind a real HAProxy (Debian's package, installed by the test if missing),
a replica killed and every replica restarted in turn under open-loop load."""

from __future__ import annotations

import json
import subprocess
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


@pytest.mark.integration
@pytest.mark.slow
def test_kill_fails_at_most_the_in_flight_and_a_rolling_restart_fails_nothing(tmp_path: Path) -> None:
    out = tmp_path / "scaleout.json"
    result = scaleout.run(replicas_n=3, rate=150.0, kill_seconds=4.5, out=out)
    print(f"\nscaleout: kill {result['kill']}\nrolling {result['rolling']}")

    assert json.loads(out.read_text()) == result
    assert result["replicas"] == 3
    assert result["balancer"].startswith("HAProxy version 2.")
    kill, rolling = result["kill"], result["rolling"]
    assert set(kill) >= {"requests", "failed", "in_flight_on_killed"}
    assert set(rolling) >= {"requests", "failed"}
    assert kill["requests"] > 500
    assert kill["failed"] <= kill["in_flight_on_killed"]
    assert rolling["failed"] == 0
    assert rolling["requests"] > 500
    assert [r["replica"] for r in rolling["restarts"]] == ["replica1", "replica2", "replica3"]
