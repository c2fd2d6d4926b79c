"""The service's HTTP/1.1 connections: uvicorn's httptools protocol, with one write per response and limits on
what a client may send before the app sees it.

One write: uvicorn writes the status line and headers as soon as the app starts its response, and the body in a
second write. A replica killed between the two leaves the balancer holding a 200 head and no body (HAProxy logs
the request as "SD": the server aborted during the data). It has already passed the head on, so it cannot send
the request to another replica, and the client loses it. `make scaleout` saw this in 2 of 25 kills on two busy
cores, where the scheduler can stop a replica between its two writes for tens of milliseconds. With one write, a
response reaches the balancer whole or not at all, and a small response costs one send instead of two. The head
is held only until the next write or the end of the event loop's current iteration, whichever comes first, so a
streamed response's head is never delayed behind a slow body, and the order of bytes never changes.

Draining: once the worker drains (SIGTERM; uvicorn's SIGHUP stops old workers the same way), every answer says
`Connection: close` and its connection closes after it. Otherwise a client that kept sending on a kept-alive
connection lost the request it sent as the worker closed that connection idle at the end of the drain: with
SIGHUP under 4 keep-alive connections, 4 requests in each of three runs.

A connection's last request: the answer to its INTENT_KEEPALIVE_REQUESTS-th request (1,000, nginx's default) says
`Connection: close` too. The workers share one listening socket, and a connection stays with the worker that
accepted it; when a client opens its pool at once, the worker that happens to be awake accepts all of it (8 of 8
in 15 of 24 trials), and keeps it for good. A reopened connection goes to whichever worker accepts it first, so
the placement is dealt again, about as evenly as coin flips would deal it (docs/architecture.md#connections-and-
workers), and one that leaves a worker all the load does not last. It costs one TCP handshake per 1,000 answers.

Limits, each answered in the service's error body, after which the connection closes:
- a request's head (request line and headers) over INTENT_MAX_HEAD_BYTES (64 KiB): 431, as nginx, HAProxy and
  Node refuse at 8-64 KiB. httptools sets no limit and grows a header value by copying it at every read, so
  without the cap a 60 MB header held the event loop for about 4 s (a health check waited 1.6 s behind it), for
  every client of the worker;
- a request not whole, head and body, within INTENT_READ_TIMEOUT_S (10 s) of the connection opening or of its
  first byte: 408.
  uvicorn times out only idle keep-alive connections, so a client that sent nothing, part of a head or part of a
  body held its connection (a file descriptor, a task, a slot in the balancer's `maxconn`) for ever;
- bytes the parser refuses (not HTTP/1.1, or a request-smuggling shape such as Content-Length with chunked):
  400 `invalid_http`, where uvicorn answered in plain text; so too a head the parser takes that RFC 9112 says a
  server must refuse (3.2: an HTTP/1.1 request with no Host or with two, or a Host that is not a host), and a
  version other than HTTP/1.0 and 1.1 (a request line with none reads as HTTP/0.9), which uvicorn answered.
A refusal that comes while requests read before it are still being answered (pipelined, or the rest of a body
longer than its Content-Length) waits for their answers and follows them, so that every request the app saw is
answered and the client reads each answer for its own request; nothing more is read meanwhile. The read deadline
does not run while the server itself has stopped reading (a pipelined request waits for the one ahead of it, or a
body the app has not taken yet): a request sent whole and on time had been refused 408 behind a slow one.

Pipelining: at most PIPELINE_DEPTH requests of a connection are read and not yet answered. The one that reaches it
is answered with `Connection: close`, and nothing after it is read, as after any answer that closes its connection
(RFC 9112 9.3.2: the client sends its unanswered requests again on a new connection). uvicorn parses every request
in a read at once and reads again after each answer, so a client that pipelined requests without reading the
answers had a worker queue all of them: 262,607 requests (8 MB) took a worker from 142 to 460 MB.

A refusal carries what the app's answers carry: a fresh `x-request-id`, also on the 408's and 431's warnings in
the log (the 400's is uvicorn's own, logged before it calls here; refused bytes may not hold a whole head, so the
client's own id is not trusted from them), and `server-timing:
service;dur=`, the ms from the refused request's first byte (a connection's first request: from its opening) to
the refusal.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.config import Settings
from app.http.errors import HeadersTooLarge, InvalidHTTP, RequestTimeout, ServiceError, render
from app.http.metrics import Metrics
from app.http.middleware import new_request_id, service_time


@dataclass(frozen=True)
class HttpLimits:
    """What a connection is allowed (INTENT_MAX_HEAD_BYTES, INTENT_READ_TIMEOUT_S, INTENT_KEEPALIVE_REQUESTS; their
    defaults are Settings')."""

    max_head_bytes: int
    read_timeout_s: float
    keepalive_requests: int  # 0: no limit

    @classmethod
    def of(cls, settings: Settings) -> HttpLimits:
        return cls(settings.max_head_bytes, settings.read_timeout_s, settings.keepalive_requests)


DEFAULT_LIMITS = HttpLimits(
    *(Settings.model_fields[name].default for name in ("max_head_bytes", "read_timeout_s", "keepalive_requests"))
)
# The keys under which the app's lifespan state holds its Metrics, so that refusals are counted with the app's
# own (`intent_rejected_total{reason=...}`), and its HttpLimits; before start-up nothing is counted and the
# limits are the defaults.
PROTOCOL_METRICS = "intent_metrics"
PROTOCOL_LIMITS = "intent_http_limits"
# What a head holds beyond what the cap counts (its URL and header lines): the request line's method (11 bytes at
# most), two spaces and version, and the CRLF of each line and of the blank one, with room to spare.
HEAD_SLACK = 64
# Requests of one connection read and not yet answered, the one running included (see the module's doc). Clients that
# pipeline send a few ahead; each queued request holds about 1.2 KB.
PIPELINE_DEPTH = 64
PROTOCOL_DRAIN = "intent_drain"  # an asyncio.Event, set once the worker drains (SIGTERM, or uvicorn's SIGHUP)
# A Host value: a name, an IPv4 or a bracketed IPv6 address, and a port (RFC 3986's reg-name characters); empty is
# allowed (RFC 9112 3.2). No space, slash, `@` or `?`.
_HOST = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=%:\[\]]*")


def head_fault(version: str, headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a head the parser took must still be refused with 400, or None. `headers` as uvicorn keeps them (names
    in lower case)."""
    if version not in ("1.1", "1.0"):
        return f"HTTP/{version} is not served: send HTTP/1.1"
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) > 1 or (version == "1.1" and not hosts):
        return "an HTTP/1.1 request needs one Host header"
    if hosts and not _HOST.fullmatch(hosts[0]):
        return "the Host header is not a host"
    return None


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


class ReadPauses(FlowControl):
    """uvicorn's flow control, telling the connection when the server stops reading and starts again, so that its
    read deadline does not run meanwhile."""

    def __init__(self, transport: asyncio.Transport, on_change: Callable[[bool], None]) -> None:
        super().__init__(transport)
        self._on_change = on_change

    def pause_reading(self) -> None:
        if not self.read_paused:
            self._on_change(True)
        super().pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self._on_change(False)
        super().resume_reading()


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """The service's HTTP protocol for uvicorn (`http=`): httptools over a CoalescingTransport, with the limits
    above."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
        self.flow = ReadPauses(self.transport, self._reading_paused)  # before any request: each cycle takes this one
        self._paused_at: float | None = None  # the loop's time when the server stopped reading, while it has
        self._limits: HttpLimits = self.app_state.get(PROTOCOL_LIMITS, DEFAULT_LIMITS)
        self._drain: asyncio.Event | None = self.app_state.get(PROTOCOL_DRAIN)
        self._head_bytes: int | None = None  # of the request head being read; None between heads
        self._head_fields = 0  # bytes of the head's URL and header lines, as the parser hands them over
        self._head_over = False  # the head just parsed is refused: nothing more is parsed or dispatched
        self._read_all = False  # the request whose answer closes the connection is read: nothing more is
        self._began_in_read = False  # a request began in the read being parsed
        self._head_fault: str | None = None  # why, when not for its size (head_fault)
        # When the request being read must be whole (head and body); None between requests. Checked by one timer
        # per connection that re-arms itself, so a request costs no timer of its own.
        self._read_deadline: float | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        # To send once the requests read before it are answered: the refusal, its request id and its request's start.
        self._refusal: tuple[ServiceError, str, float] | None = None
        # perf_counter at the first byte of the request being read, or at the connection's opening. Not the loop's
        # clock: uvloop's is read once per iteration, in ms, and a refusal in the same iteration read 0.000.
        self._read_began = 0.0
        self._owed = 0  # requests whose heads were read (running or queued behind one) and not yet answered
        self._requests = 0  # whose heads were read on this connection
        self._start_read_deadline()  # the first request is due from the moment the connection opens

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        super().connection_lost(exc)

    # The parser's callbacks. Once a head is found over the cap, every later callback of the same read (its body,
    # a pipelined request behind it) is dropped: uvicorn's own would act on a request that has no cycle.
    def on_message_begin(self) -> None:
        if self._head_over or self._read_all:
            return
        self._began_in_read = True
        super().on_message_begin()
        self._head_bytes, self._head_fields = 0, 0
        if self._read_deadline is None:  # a later request on a kept-alive connection is due from its first byte
            self._start_read_deadline()

    def on_url(self, url: bytes) -> None:
        if not (self._head_over or self._read_all):
            super().on_url(url)
            self._head_fields += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not (self._head_over or self._read_all):
            super().on_header(name, value)
            self._head_fields += len(name) + len(value) + 4  # ": " and CRLF

    def on_headers_complete(self) -> None:
        if self._head_over or self._read_all:
            return
        # Either is refused by data_received once the parser returns; the app never sees it.
        if self._head_fields > self._limits.max_head_bytes:
            self._head_over = True
            return
        self._head_fault = head_fault(self.parser.get_http_version(), self.headers)
        if self._head_fault is not None:
            self._head_over = True
            return
        self._head_bytes = None
        before = self.cycle
        super().on_headers_complete()
        if self.cycle is not before:  # a request to answer: run now, or queued behind the one running
            self._owed += 1
            self._requests += 1
            draining = self._drain is not None and self._drain.is_set()
            last = self._requests == self._limits.keepalive_requests or self._owed >= PIPELINE_DEPTH
            if draining or last:
                # Answered with Connection: close, then closed, so the client's next request goes out on a new
                # connection: while draining, instead of on this one as the worker closes it idle (which loses that
                # request); at the connection's last request, to place it on the workers again; and at the
                # deepest pipeline allowed (the module's doc).
                self.cycle.keep_alive = False

    def on_body(self, body: bytes) -> None:
        if not (self._head_over or self._read_all):
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._head_over or self._read_all:
            return
        self._read_deadline = None
        super().on_message_complete()
        if self.cycle is not None and not self.cycle.keep_alive:
            # Its answer closes the connection (said so by either side, or HTTP/1.0): what follows in this read is
            # dropped, and nothing more is read, rather than parsed into requests that will never be answered.
            self._read_all = True
            self.transport.pause_reading()

    def _start_read_deadline(self) -> None:
        timeout = self._limits.read_timeout_s
        self._read_began = time.perf_counter()
        self._read_deadline = self.loop.time() + timeout
        if self._deadline_timer is None:
            self._deadline_timer = self.loop.call_later(timeout, self._check_read_deadline)

    def _reading_paused(self, paused: bool) -> None:
        """The server stopped reading (`paused`) or started again: the read deadline moves on by the pause."""
        now = self.loop.time()
        if paused:
            self._paused_at = now
        elif self._paused_at is not None:
            if self._read_deadline is not None:
                self._read_deadline += now - self._paused_at
            self._paused_at = None

    def _check_read_deadline(self) -> None:
        self._deadline_timer = None
        if self._read_deadline is None or self.transport.is_closing():
            return  # between requests: uvicorn's keep-alive timeout closes an idle connection
        if self._paused_at is not None:  # the server is not reading: look again after a whole timeout
            self._deadline_timer = self.loop.call_later(self._limits.read_timeout_s, self._check_read_deadline)
            return
        left = self._read_deadline - self.loop.time()
        if left > 0:
            self._deadline_timer = self.loop.call_later(left, self._check_read_deadline)
        elif self._head_bytes is None and self.cycle is not None and self.cycle.response_started:
            # This request's head is in and its answer has begun (a route that reads no body): nothing to add.
            self.transport.close()
        else:
            timeout = self._limits.read_timeout_s
            self._refuse(
                RequestTimeout(f"the request did not arrive whole within {timeout:g} s"),
                f"closed a connection whose request did not arrive whole in {timeout:g} s",
            )

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None or self._read_all:
            return  # the connection ends with that refusal, or that answer: nothing after either is a request
        # A head is over the cap by either of two counts. (1) The reads that find a head already begun and leave it
        # unfinished: every byte of those is the head's, its request line's method and version and its line ends
        # too, which the cap does not count, so (1) refuses only past the cap by HEAD_SLACK: a head under the cap
        # is not refused however its bytes arrive (unless its lines are padded with whitespace). This one stops a
        # head that never ends, which the parser would grow for ever. (2) Once the head is parsed, its URL and
        # header lines, as the cap counts them: this one holds a head to the cap to the byte.
        # (1) counts a read only when the head it ends unfinished is the one it began with: a read in which the head
        # being read ended and another began (pipelined requests) is not all the new head's, and counted whole it had
        # refused small pipelined requests with 431.
        counting = self._head_bytes is not None
        self._began_in_read = False
        super().data_received(data)
        if self._head_bytes is None or self.transport.is_closing():
            return
        if counting and not self._began_in_read:
            self._head_bytes += len(data)
        cap = self._limits.max_head_bytes
        if self._head_fault is not None:
            self._refuse(InvalidHTTP(self._head_fault), None)
        elif self._head_over or self._head_bytes > cap + HEAD_SLACK:
            self._refuse(
                HeadersTooLarge(f"the request line and headers are over {cap} bytes"),
                f"refused a request whose head is over {cap} bytes",
            )

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn would warn that no WebSocket library is installed and suggest one. The service has no WebSocket
        # routes and runs with ws="none", so an Upgrade header (websocket, h2c) is ignored and the request is
        # answered as plain HTTP/1.1, as RFC 9110 lets a server do.
        self.logger.debug("ignored an Upgrade header: the service answers HTTP/1.1")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser refuses (it has logged them), in the service's error body; none for
        bytes after the connection's last request, which are not read as requests."""
        if not self._read_all:
            self._refuse(InvalidHTTP(msg.strip()), None)

    def _owed_before_refused(self) -> int:
        """How many answers are owed for requests read before the refused bytes. When the bytes are in the body of
        the last request, which is queued behind one still running (pipelining), that request is taken out of
        the queue, never to run: the refusal is its answer."""
        cycle = self.cycle
        if cycle is None or not cycle.more_body or cycle.response_complete:
            return self._owed  # the bytes come after every request read
        queued = next((entry for entry in self.pipeline if entry[0] is cycle), None)
        if queued is None:
            return self._owed - 1  # it is the one running: it gets the refusal, and its app the disconnect
        self.pipeline.remove(queued)
        self._owed -= 1
        return self._owed

    def _refuse(self, error: ServiceError, warning: str | None) -> None:
        """Answer bytes the app never saw as a request with the service's error body, and close the connection;
        `warning`, if any, is logged with the refusal's request id. If requests read before them are still being
        answered, an answer now would be taken for the first of theirs: it is sent after theirs
        (`on_response_complete`), and nothing more is read meanwhile."""
        metrics: Metrics | None = self.app_state.get(PROTOCOL_METRICS)
        if metrics is not None:
            metrics.rejected.labels(error.kind).inc()
        # Between requests (bytes that begin no request) the refused bytes are the request, and they just came.
        began = self._read_began if self._read_deadline is not None else time.perf_counter()
        refusal = (error, new_request_id(), began)
        if warning is not None:
            self.logger.warning(warning, extra={"request_id": refusal[1]})
        self._head_bytes = None
        self._head_over = False
        self._head_fault = None
        self._read_deadline = None
        if self._owed_before_refused() > 0:
            self._refusal = refusal
            self.transport.pause_reading()
            return
        self._send_refusal(*refusal)

    def on_response_complete(self) -> None:
        self._owed -= 1
        super().on_response_complete()
        if self._refusal is not None and self._owed == 0 and not self.transport.is_closing():
            refusal, self._refusal = self._refusal, None
            self._send_refusal(*refusal)

    def _send_refusal(self, error: ServiceError, request_id: str, began: float) -> None:
        status, headers, body = render(error)
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
        headers = [
            *self.server_state.default_headers,
            *headers,
            (b"x-request-id", request_id.encode()),
            (b"server-timing", service_time(began)),
            (b"connection", b"close"),
        ]
        lines += [name + b": " + value + b"\r\n" for name, value in headers]
        self.transport.write(b"".join(lines) + b"\r\n" + body)
        self.transport.close()
