"""loadtest.connections: which process holds each established connection to a port, from /proc."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from loadtest.connections import by_process, established_inodes, split

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def row(local: str, remote: str, state: str, inode: int) -> str:
    return f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000  1000        0 {inode} 1 0\n"


@pytest.fixture
def fake_proc(tmp_path: Path) -> Path:
    """Port 8000 (0x1F40): three connections established on it (two IPv4, one IPv6), one closing, its listening
    socket, and the client's end of one of them (local port 50000, remote 8000), held by three processes."""
    net = tmp_path / "net"
    net.mkdir()
    (net / "tcp").write_text(
        HEADER
        + row("0100007F:1F40", "00000000:0000", "0A", 100)  # listening
        + row("0100007F:1F40", "0100007F:C350", "01", 101)
        + row("0100007F:1F40", "0100007F:C351", "01", 102)
        + row("0100007F:1F40", "0100007F:C352", "06", 103)  # TIME_WAIT
        + row("0100007F:C350", "0100007F:1F40", "01", 104)  # the client's end
    )
    (net / "tcp6").write_text(
        HEADER + row("00000000000000000000000001000000:1F40", "00000000000000000000000001000000:C353", "01", 105)
    )
    holders = {"201": [100, 101, 102], "202": [100, 105], "203": [104], "204": [999]}
    for pid, inodes in holders.items():
        fd = tmp_path / pid / "fd"
        fd.mkdir(parents=True)
        for n, inode in enumerate(inodes, 3):
            (fd / str(n)).symlink_to(f"socket:[{inode}]")
        (fd / "2").symlink_to("/dev/null")
    (tmp_path / "self").mkdir()  # not a process number: skipped
    return tmp_path


def test_only_connections_established_on_the_port_count(fake_proc: Path) -> None:
    assert established_inodes(8000, fake_proc) == {101, 102, 105}
    assert established_inodes(50000, fake_proc) == {104}
    assert established_inodes(9000, fake_proc) == set()


def test_each_process_gets_the_connections_it_holds(fake_proc: Path) -> None:
    assert by_process(8000, fake_proc) == {201: 2, 202: 1}
    assert split(8000, fake_proc) == [2, 1]
    assert split(9000, fake_proc) == []


def test_no_proc_means_nothing_to_report(tmp_path: Path) -> None:
    assert split(8000, tmp_path / "missing") == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_real_proc_sees_this_process_holding_its_accepted_connections() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        accepted = [server.accept()[0] for _ in clients]
        try:
            # The accepted ends have the server's port as their local port; the clients' ends do not count.
            assert by_process(port) == {os.getpid(): 3}
        finally:
            for s in clients + accepted:
                s.close()
