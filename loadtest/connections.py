"""Which process holds each established connection to a local port: how a load generator's keep-alive connections
fell on a server's workers. The workers share one listening socket, and whichever wakes first accepts every
connection waiting, so a step of 8 users can land all 8 on one worker, until each connection's
INTENT_KEEPALIVE_REQUESTS-th answer closes it and the client's next one is placed again
(docs/architecture.md#connections-and-workers). Read from /proc (Linux); elsewhere there is nothing to report."""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
ESTABLISHED = "01"  # the `st` column of /proc/net/tcp


def established_inodes(port: int, proc: Path = PROC) -> set[int]:
    """The socket inodes of TCP connections, IPv4 or IPv6, established with `port` as their local port."""
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (proc / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != ESTABLISHED:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port:
                inodes.add(int(fields[9]))
    return inodes


def by_process(port: int, proc: Path = PROC) -> dict[int, int]:
    """Each process that holds an established connection on local port `port`: how many it holds. Processes of
    other users, and those gone while being read, are skipped."""
    inodes = established_inodes(port, proc)
    counts: dict[int, int] = {}
    if not inodes:
        return counts
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:  # another user's process, or one that has exited
            continue
        held = 0
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:  # closed since the listing
                continue
            held += link.startswith("socket:[") and int(link[8:-1]) in inodes
        if held:
            counts[int(entry.name)] = held
    return counts


def split(port: int, proc: Path = PROC) -> list[int]:
    """The connections each holding process has, largest first: [4, 4], or [8] when one worker holds them all."""
    return sorted(by_process(port, proc).values(), reverse=True)
