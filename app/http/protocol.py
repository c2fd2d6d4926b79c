"""uvicorn's httptools protocol, except that a response's head leaves in one write with the body that follows it.

Why: uvicorn writes the status line and headers as soon as the app starts its response, and the body in a second
write. A replica killed between the two leaves the balancer holding a 200 head and no body (HAProxy logs the
request as "SD": the server aborted during the data). It has already passed the head on, so it cannot send the
request to another replica, and the client loses it. `make scaleout` saw this in 2 of 25 kills on two busy cores,
where the scheduler can stop a replica between its two writes for tens of milliseconds. With one write, a
response reaches the balancer whole or not at all, and a small response costs one send instead of two.

The head is held only until the next write or the end of the event loop's current iteration, whichever comes
first, so a streamed response's head is never delayed behind a slow body, and the order of bytes never changes.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class CoalescingTransport:
    """A transport that holds a write that looks like a response head (`HTTP/...` up to the blank line) and
    sends it together with the next write; everything else passes through to the wrapped transport."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            head, self._held = self._held, None
            self._transport.write(head + bytes(data))
        elif isinstance(data, bytes) and data.startswith(b"HTTP/") and data.endswith(b"\r\n\r\n"):
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Send a held head on its own: no body followed it within this iteration of the loop."""
        if self._held is not None:
            head, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def __getattr__(self, name: str) -> Any:
        # Everything else (is_closing, pause_reading, get_extra_info, set_protocol, abort, ...) is the transport's.
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """The service's HTTP protocol for uvicorn (`http=`): httptools over a CoalescingTransport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
