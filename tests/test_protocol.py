"""app.http.protocol: a response's head leaves in one write with its body, so that a replica killed mid-response
cannot leave the balancer a head without a body (which it cannot retry elsewhere)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.config import Settings
from app.http.main import create_app
from app.http.protocol import (
    DEFAULT_LIMITS,
    PIPELINE_DEPTH,
    PROTOCOL_LIMITS,
    PROTOCOL_METRICS,
    CoalescingHttpToolsProtocol,
    CoalescingTransport,
    HttpLimits,
)
from tests.fakes import FakeClassifier, fake_factory

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class FakeTransport:
    """Records what reaches the socket, write by write. `on_close`, if set, is called on close, as a real
    transport schedules its protocol's `connection_lost`."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.eof = False
        self.paused = False  # reading, as the protocol last set it
        self.on_close: Callable[[], object] | None = None

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True
        if self.on_close is not None:
            self.on_close()

    def write_eof(self) -> None:
        self.eof = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def test_a_head_goes_out_with_the_body_that_follows_it() -> None:
    async def scenario() -> list[bytes]:
        fake = FakeTransport()
        transport = CoalescingTransport(fake, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(HEAD)
        assert fake.writes == []  # held
        transport.write(b"{}")
        await asyncio.sleep(0)  # the flush scheduled for the head finds nothing left to send
        return fake.writes

    assert asyncio.run(scenario()) == [HEAD + b"{}"]


def test_a_head_alone_leaves_at_the_end_of_the_loop_iteration_and_order_is_kept() -> None:
    async def scenario() -> FakeTransport:
        fake = FakeTransport()
        transport = CoalescingTransport(fake, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0)
        assert fake.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
        transport.write(b"not a head")  # passes straight through
        transport.write(HEAD)
        transport.close()  # a held head is sent before the close
        assert fake.closed
        return fake

    fake = asyncio.run(scenario())
    assert fake.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", b"not a head", HEAD]


def test_write_eof_sends_a_held_head_first_and_the_rest_is_the_transports() -> None:
    async def scenario() -> FakeTransport:
        fake = FakeTransport()
        transport = CoalescingTransport(fake, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(HEAD)
        transport.write_eof()
        assert transport.get_extra_info("peername") == ("127.0.0.1", 5000)
        assert transport.is_closing() is False
        return fake

    fake = asyncio.run(scenario())
    assert (fake.writes, fake.eof) == ([HEAD], True)


RECEIVED: list[str] = []  # what `receive` gave `_app`, in order


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads the whole body before it answers, as the service does; records what `receive` gave it."""
    if scope["type"] != "http":
        return
    while True:
        message = await receive()
        RECEIVED.append(message["type"])
        if message["type"] == "http.disconnect":
            return
        if not message.get("more_body", False):
            break
    body = b'{"ok":true}'
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


POST = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"


def _connect(
    reads: list[bytes],
    app: Any = _app,
    wait_s: float = 0.0,
    state: dict[str, Any] | None = None,
    protocol_class: type[HttpToolsProtocol] = CoalescingHttpToolsProtocol,
) -> FakeTransport:
    """`reads` delivered one loop turn apart to a fresh connection (one keep-alive request at a time, as a client
    waits for each answer), then up to `wait_s` of waiting, ended by the connection's close (so a test that
    expects the close passes a generous one, and a busy machine only makes it slower); `state` is the lifespan
    state uvicorn would hand the protocol. A closed transport gets no more reads and, as a real one does, calls
    `connection_lost`."""

    async def scenario() -> FakeTransport:
        RECEIVED.clear()
        # As app/__main__.py runs it: no WebSocket protocol.
        config = Config(app=app, http=protocol_class, ws="none", lifespan="off", log_config=None)
        config.load()
        loop = asyncio.get_running_loop()
        protocol = protocol_class(config, ServerState(), state or {}, loop)
        fake = FakeTransport()
        fake.on_close = lambda: loop.call_soon(protocol.connection_lost, None)
        protocol.connection_made(fake)  # type: ignore[arg-type]
        for raw in reads:
            if fake.closed:
                break
            protocol.data_received(raw)
            for _ in range(20):
                await asyncio.sleep(0)
        deadline = loop.time() + wait_s
        while not fake.closed and loop.time() < deadline:
            await asyncio.sleep(0.005)
        for _ in range(20):
            await asyncio.sleep(0)
        apps = asyncio.all_tasks() - {asyncio.current_task()}
        if apps:  # an app still running after the close finishes (as a server would let it), not cancelled
            await asyncio.wait(apps, timeout=max(deadline - loop.time(), 1.0))
        return fake

    return asyncio.run(scenario())


def test_plain_uvicorn_writes_the_head_and_the_body_apart() -> None:
    """The reason for the protocol: if uvicorn ever writes them together, it is no longer needed."""
    writes = _connect([POST], protocol_class=HttpToolsProtocol).writes
    assert len(writes) == 2
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert writes[1] == b'{"ok":true}'


@pytest.mark.parametrize("requests", [1, 3])
def test_uvicorn_with_the_protocol_writes_each_response_once(requests: int) -> None:
    writes = _connect([POST] * requests).writes
    assert len(writes) == requests
    for write in writes:
        head, _, body = write.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert body == b'{"ok":true}'


def test_a_head_request_gets_the_head_alone_and_the_connection_goes_on() -> None:
    """uvicorn drops the body of a HEAD's answer, so the protocol's held head leaves alone at the end of the loop
    iteration; the next request on the connection is answered as usual."""
    writes = _connect([b"HEAD /ready HTTP/1.1\r\nhost: x\r\n\r\n", POST]).writes
    assert len(writes) == 2
    head, _, body = writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 11" in head.lower().split(b"\r\n")
    assert body == b""
    assert writes[1].partition(b"\r\n\r\n")[2] == b'{"ok":true}'


def _head_refused(writes: list[bytes]) -> dict[str, Any] | None:
    """The 431 error body if the one write is the protocol's refusal, else None."""
    if len(writes) != 1 or not writes[0].startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"):
        return None
    head, _, body = writes[0].partition(b"\r\n\r\n")
    assert b"connection: close" in head.split(b"\r\n")
    assert b"content-length: %d" % len(body) in head.split(b"\r\n")
    return json.loads(body)


def _chunks(header_bytes: int, read: int = 16 * 1024) -> list[bytes]:
    """A request whose one header value is `header_bytes` long, as the reads a socket would deliver it in."""
    raw = b"POST /predict HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * header_bytes + b"\r\ncontent-length: 2\r\n\r\n{}"
    return [raw[i : i + read] for i in range(0, len(raw), read)]


def test_a_request_head_over_the_cap_gets_431_and_the_connection_closes() -> None:
    fake = _connect(_chunks(10 * DEFAULT_LIMITS.max_head_bytes))
    assert fake.closed
    message = f"the request line and headers are over {DEFAULT_LIMITS.max_head_bytes} bytes"
    assert _head_refused(fake.writes) == {"error": {"type": "headers_too_large", "message": message}}


def test_the_head_cap_is_the_one_the_app_hands_over() -> None:
    """INTENT_MAX_HEAD_BYTES=2048, as the lifespan hands it to each connection."""
    small = {PROTOCOL_LIMITS: replace(DEFAULT_LIMITS, max_head_bytes=2048)}
    fake = _connect(_chunks(4096, 1024), state=small)
    assert fake.closed
    assert _head_refused(fake.writes) == {
        "error": {"type": "headers_too_large", "message": "the request line and headers are over 2048 bytes"}
    }
    writes = _connect(_chunks(1500, 1024), state=small).writes
    assert _head_refused(writes) is None
    assert writes[0].partition(b"\r\n\r\n")[2] == b'{"ok":true}'


def _head_fields_bytes(raw: bytes) -> int:
    """What the cap counts of a request's head: its URL and each header line with ": " and CRLF."""
    head = raw.partition(b"\r\n\r\n")[0].split(b"\r\n")
    url = head[0].split(b" ")[1]
    return len(url) + sum(len(name) + len(value) + 4 for name, _, value in (line.partition(b": ") for line in head[1:]))


@pytest.mark.parametrize("over", [0, 1])
def test_a_head_that_arrives_in_one_read_is_held_to_the_cap_to_the_byte(over: int) -> None:
    """INTENT_MAX_HEAD_BYTES=2048 and a head of 8,000 bytes or exactly 2,048 (+1) in one read: the counting of
    later reads never sees it, the count of its parsed lines does."""
    small = {PROTOCOL_LIMITS: replace(DEFAULT_LIMITS, max_head_bytes=2048)}
    big = b"".join(_chunks(8000))
    fake = _connect([big], state=small)
    assert fake.closed
    assert _head_refused(fake.writes) is not None
    assert RECEIVED == []  # the app never saw the request
    base = b"".join(_chunks(0))
    raw = b"".join(_chunks(2048 - _head_fields_bytes(base) + over))
    assert _head_fields_bytes(raw) == 2048 + over
    fake = _connect([raw], state=small)
    if over:
        assert fake.closed
        assert _head_refused(fake.writes) == {
            "error": {"type": "headers_too_large", "message": "the request line and headers are over 2048 bytes"}
        }
    else:
        assert _head_refused(fake.writes) is None
        assert fake.writes[0].partition(b"\r\n\r\n")[2] == b'{"ok":true}'


@pytest.mark.parametrize("over", [0, 1])
def test_a_head_in_many_reads_is_held_to_the_cap_to_the_byte(over: int) -> None:
    """The same head as above, its first byte, then all but its last, then the last: the bytes of the reads count
    the request line's method and version too, and had refused a head the cap allows (found by an audit)."""
    small = {PROTOCOL_LIMITS: replace(DEFAULT_LIMITS, max_head_bytes=2048)}
    raw = b"".join(_chunks(2048 - _head_fields_bytes(b"".join(_chunks(0))) + over))
    head_end = raw.index(b"\r\n\r\n") + 4
    fake = _connect([raw[:1], raw[1 : head_end - 1], raw[head_end - 1 :]], state=small)
    if over:
        assert _head_refused(fake.writes) == {
            "error": {"type": "headers_too_large", "message": "the request line and headers are over 2048 bytes"}
        }
    else:
        assert _head_refused(fake.writes) is None
        assert fake.writes[0].partition(b"\r\n\r\n")[2] == b'{"ok":true}'


def test_a_request_pipelined_behind_a_refused_head_is_never_dispatched() -> None:
    """A head over the cap, its body and a request behind it, all in one read: one 431, and the app sees nothing."""
    small = {PROTOCOL_LIMITS: replace(DEFAULT_LIMITS, max_head_bytes=2048)}
    fake = _connect([b"".join(_chunks(4096)) + POST], state=small)
    assert fake.closed
    assert _head_refused(fake.writes) is not None
    assert RECEIVED == []


def test_the_lifespan_hands_each_connection_the_limits_of_its_settings() -> None:
    app = create_app(
        Settings(warmup_queries=0, max_head_bytes=4096, read_timeout_s=2.5, keepalive_requests=7),
        fake_factory(FakeClassifier()),
    )

    async def state() -> dict[str, Any]:
        async with app.router.lifespan_context(app) as yielded:
            return dict(yielded or {})

    assert asyncio.run(state())[PROTOCOL_LIMITS] == HttpLimits(4096, 2.5, 7)
    assert HttpLimits.of(Settings()) == DEFAULT_LIMITS


def _closes(write: bytes) -> bool:
    """Whether an answer's head says Connection: close."""
    return b"connection: close" in write.partition(b"\r\n\r\n")[0].lower().split(b"\r\n")


def test_the_answer_to_a_connections_last_allowed_request_closes_it() -> None:
    """INTENT_KEEPALIVE_REQUESTS=3: the third answer says Connection: close and the connection closes after it, so
    a fourth request sent on it is never read; the first two keep it open."""
    fake = _connect([POST] * 4, state={PROTOCOL_LIMITS: replace(DEFAULT_LIMITS, keepalive_requests=3)}, wait_s=5)
    assert [_closes(write) for write in fake.writes] == [False, False, True]
    assert all(write.partition(b"\r\n\r\n")[2] == b'{"ok":true}' for write in fake.writes)
    assert fake.closed
    assert RECEIVED.count("http.request") == 3


def test_pipelined_requests_past_the_last_allowed_one_are_not_answered_on_that_connection() -> None:
    """Two requests in one read with INTENT_KEEPALIVE_REQUESTS=1: the first is answered with Connection: close and
    the connection closes, as uvicorn closes a pipelined connection after an answer that says so (RFC 9112: the
    client sends the unanswered request again on a new connection)."""
    fake = _connect([POST * 2], state={PROTOCOL_LIMITS: replace(DEFAULT_LIMITS, keepalive_requests=1)}, wait_s=5)
    assert [_closes(write) for write in fake.writes] == [True]
    assert fake.closed


def test_a_pipeline_deeper_than_allowed_is_answered_to_its_limit_and_the_rest_is_never_read() -> None:
    """200 requests in one read, no answer read: uvicorn parsed and queued every one (262,607 took a worker from 142
    to 460 MB). The PIPELINE_DEPTH-th answer says Connection: close and the connection closes; the client sends the
    rest again on a new connection (RFC 9112 9.3.2)."""
    fake = _connect([POST * 200], wait_s=10)
    assert fake.closed
    assert len(fake.writes) == PIPELINE_DEPTH == 64
    assert [_closes(write) for write in fake.writes] == [False] * (PIPELINE_DEPTH - 1) + [True]
    assert RECEIVED.count("http.request") == PIPELINE_DEPTH


def test_after_the_request_whose_answer_closes_the_connection_nothing_is_read() -> None:
    """Bytes pipelined behind a `Connection: close` request are neither dispatched nor refused, and reading stops."""
    close = POST.replace(b"host: x\r\n", b"host: x\r\nconnection: close\r\n")
    fake = _connect([close + POST + b"GARBAGE\r\n\r\n"], wait_s=5)
    assert fake.closed
    assert [(_status(write), _closes(write)) for write in fake.writes] == [(200, True)]
    assert RECEIVED.count("http.request") == 1
    assert fake.paused


def test_small_pipelined_requests_in_reads_over_the_head_cap_are_not_refused() -> None:
    """Reads of 70 KB, each beginning inside one head and ending inside another, of requests with 20 KB heads: each
    read had been counted whole as the head it left unfinished, so the first such read was refused 431."""
    raw = b"POST /predict HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 20_000 + b"\r\ncontent-length: 2\r\n\r\n{}"
    stream = raw * 10
    reads = [stream[:10_000]] + [stream[i : i + 70_000] for i in range(10_000, len(stream), 70_000)]
    assert max(len(read) for read in reads) > DEFAULT_LIMITS.max_head_bytes + 64
    fake = _connect(reads, wait_s=0.5)
    assert [_status(write) for write in fake.writes] == [200] * 10
    assert not fake.closed


def test_a_pipelined_request_sent_whole_in_time_is_not_timed_out_while_the_server_stops_reading() -> None:
    """A slow request, and behind it a request whose head came at once and whose body the server read only after
    the slow one's answer (it stops reading while a pipelined request waits): the deadline ran meanwhile, and the
    second request, sent whole within 50 ms of its head, was refused 408."""
    body_of_second = b'{"t":1}'
    second = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body_of_second)

    async def slow_first(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not RECEIVED:
            await asyncio.sleep(0.3)  # six read timeouts
        await _app(scope, receive, send)

    async def scenario() -> FakeTransport:
        RECEIVED.clear()
        config = Config(app=slow_first, http=CoalescingHttpToolsProtocol, ws="none", lifespan="off", log_config=None)
        config.load()
        loop = asyncio.get_running_loop()
        protocol = CoalescingHttpToolsProtocol(config, ServerState(), SHORT_TIMEOUT, loop)
        fake = FakeTransport()
        fake.on_close = lambda: loop.call_soon(protocol.connection_lost, None)
        protocol.connection_made(fake)  # type: ignore[arg-type]
        protocol.data_received(POST + second)
        deadline = loop.time() + 10  # only catches a hang
        while (fake.paused or not fake.writes) and loop.time() < deadline:  # the body stays in the socket
            await asyncio.sleep(0.005)
        protocol.data_received(body_of_second)
        while len(fake.writes) < 2 and not fake.closed and loop.time() < deadline:
            await asyncio.sleep(0.005)
        return fake

    fake = asyncio.run(scenario())
    assert [_status(write) for write in fake.writes] == [200, 200]
    assert not fake.closed


def test_no_limit_keeps_a_connection_open_for_every_request() -> None:
    fake = _connect([POST] * 5, state={PROTOCOL_LIMITS: replace(DEFAULT_LIMITS, keepalive_requests=0)})
    assert [_closes(write) for write in fake.writes] == [False] * 5
    assert not fake.closed
    assert DEFAULT_LIMITS.keepalive_requests == Settings().keepalive_requests == 1000


@pytest.mark.parametrize("read", [1024, 16 * 1024, 256 * 1024])
def test_a_head_under_the_cap_is_served_however_it_is_read(read: int) -> None:
    writes = _connect(_chunks(DEFAULT_LIMITS.max_head_bytes - 100, read)).writes
    assert _head_refused(writes) is None
    assert len(writes) == 1
    assert writes[0].partition(b"\r\n\r\n")[2] == b'{"ok":true}'


def test_a_large_body_read_with_the_end_of_its_head_is_not_counted_as_head() -> None:
    body = b"x" * (4 * DEFAULT_LIMITS.max_head_bytes)
    raw = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    # The first read leaves the head unfinished; the second ends it and brings the whole body.
    writes = _connect([raw[:20], raw[20:]]).writes
    assert len(writes) == 1
    assert writes[0].partition(b"\r\n\r\n")[2] == b'{"ok":true}'


async def _answer_at_once(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers without reading the body."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


def _status(write: bytes) -> int:
    return int(write.split(b" ", 2)[1])


TIMEOUT_MESSAGE = "the request did not arrive whole within 0.05 s"
# As the lifespan hands the limits to each connection (INTENT_READ_TIMEOUT_S=0.05).
SHORT_TIMEOUT: dict[str, Any] = {PROTOCOL_LIMITS: replace(DEFAULT_LIMITS, read_timeout_s=0.05)}


@pytest.mark.parametrize(
    "reads",
    [
        [],  # connected, sent nothing
        [b"POST /predict HTTP/1.1\r\nhost: x\r\n"],  # part of a head
        [b'POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n{"t'],  # a whole head, part of a body
        [POST, b"POST /predict HTTP/1.1\r\n"],  # a whole request, then part of the next on the same connection
    ],
    ids=["silent", "part-of-head", "part-of-body", "keep-alive-then-part"],
)
def test_a_request_that_does_not_arrive_whole_in_time_gets_408_and_the_connection_closes(reads: list[bytes]) -> None:
    fake = _connect(reads, wait_s=10, state=SHORT_TIMEOUT)
    assert fake.closed
    *answered, refused = fake.writes
    assert [_status(w) for w in answered] == ([200] if reads and reads[0] == POST else [])
    assert _status(refused) == 408
    assert json.loads(refused.partition(b"\r\n\r\n")[2]) == {
        "error": {"type": "request_timeout", "message": TIMEOUT_MESSAGE}
    }
    if b'{"t' in b"".join(reads):
        assert RECEIVED[-1] == "http.disconnect"  # the app waiting for the body is told the client is gone


def test_a_request_that_arrives_whole_is_not_timed_out_after() -> None:
    fake = _connect([POST[:10], POST[10:]], wait_s=0.3, state=SHORT_TIMEOUT)
    assert not fake.closed  # idle now: uvicorn's keep-alive timeout (5 s) is the one that closes it
    assert [_status(w) for w in fake.writes] == [200]


def test_an_answer_that_began_before_its_body_came_is_not_followed_by_408() -> None:
    fake = _connect(
        [b'POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n{"t'],
        _answer_at_once,
        wait_s=10,
        state=SHORT_TIMEOUT,
    )
    assert fake.closed
    assert [_status(w) for w in fake.writes] == [200]


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        # Content-Length and Transfer-Encoding together: the request-smuggling shape a parser must refuse.
        b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 13\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /health HTTP/1.1\r\nhost: x\r\nbad header: 1\r\n\r\n",
    ],
    ids=["garbage", "content-length-and-chunked", "space-in-header-name"],
)
def test_bytes_that_are_not_http_get_the_service_error_body_and_the_connection_closes(raw: bytes) -> None:
    fake = _connect([raw])
    assert fake.closed
    (write,) = fake.writes
    head, _, body = write.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"content-type: application/json" in head.split(b"\r\n")
    assert json.loads(body) == {"error": {"type": "invalid_http", "message": "Invalid HTTP request received."}}
    assert RECEIVED == []  # the app never saw it


@pytest.mark.parametrize("upgrade", [b"websocket", b"h2c"])
def test_an_upgrade_header_is_ignored_and_the_request_answered_as_http_1_1(
    upgrade: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    raw = b"GET /health HTTP/1.1\r\nhost: x\r\nupgrade: %s\r\nconnection: Upgrade\r\n\r\n" % upgrade
    with caplog.at_level("WARNING"):
        fake = _connect([raw], _answer_at_once)
    assert [_status(w) for w in fake.writes] == [200]
    assert not fake.closed
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == []


async def _slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reads one body message (recorded in RECEIVED) and answers 0.1 s later."""
    if scope["type"] != "http":
        return
    RECEIVED.append((await receive())["type"])
    await asyncio.sleep(0.1)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


def _answers(writes: list[bytes]) -> list[tuple[int, bytes]]:
    """Each response on the connection, in order, as (status, body); each goes out in one write."""
    return [(_status(w), w.partition(b"\r\n\r\n")[2]) for w in writes]


def _error(kind: str, message: str) -> bytes:
    return json.dumps({"error": {"type": kind, "message": message}}, separators=(",", ":")).encode()


def test_a_refusal_follows_the_answer_to_an_earlier_pipelined_request() -> None:
    """Sent at once, the 431 would be taken for the first request's answer: it waits for that answer, follows
    it, and the connection closes."""
    big = _chunks(10 * DEFAULT_LIMITS.max_head_bytes)
    fake = _connect([POST + big[0], *big[1:]], _slow_app, wait_s=10)
    assert fake.closed
    cap = DEFAULT_LIMITS.max_head_bytes
    too_large = _error("headers_too_large", f"the request line and headers are over {cap} bytes")
    assert _answers(fake.writes) == [(200, b"{}"), (431, too_large)]


def test_a_body_longer_than_its_content_length_gets_its_answer_then_400() -> None:
    """The bytes past Content-Length are read as the next request, which is not HTTP: the request is answered
    on what it declared, then the rest is refused, in that order. uvicorn alone sends its 400 at once, which the
    client reads as the request's answer, and the request's own answer is lost."""
    raw = b'POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\n{"text":"hi"}'
    fake = _connect([raw], _slow_app, wait_s=10)
    assert fake.closed
    assert _answers(fake.writes) == [(200, b"{}"), (400, _error("invalid_http", "Invalid HTTP request received."))]
    plain = _connect([raw], _slow_app, wait_s=10, protocol_class=HttpToolsProtocol)
    assert plain.closed
    assert [(status, body) for status, body in _answers(plain.writes)] == [(400, b"Invalid HTTP request received.")]


def test_a_malformed_body_pipelined_behind_a_request_being_answered_is_refused_after_its_answer() -> None:
    """The second request's chunked body is not HTTP: the first request is answered, then the second gets the
    400, and its app never runs."""
    bad_chunks = b"POST /predict HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
    fake = _connect([POST + bad_chunks], _slow_app, wait_s=10)
    assert fake.closed
    assert _answers(fake.writes) == [(200, b"{}"), (400, _error("invalid_http", "Invalid HTTP request received."))]
    assert RECEIVED == ["http.request"]


def test_a_malformed_body_of_the_request_being_read_is_refused_at_once() -> None:
    """Nothing is owed before it: the 400 is its answer, and its app, waiting for the body, is told the client
    is gone."""
    head = b"POST /predict HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    fake = _connect([head, b"zz\r\n{}\r\n0\r\n\r\n"], wait_s=10)
    assert fake.closed
    assert _answers(fake.writes) == [(400, _error("invalid_http", "Invalid HTTP request received."))]
    assert RECEIVED == ["http.disconnect"]


def test_nothing_is_read_while_a_refusal_waits() -> None:
    """Bytes that arrive after the refused ones, before the earlier answer is out, are neither parsed nor
    dispatched."""
    fake = _connect([POST + b"GARBAGE\r\n\r\n", POST], _slow_app, wait_s=10)
    assert fake.closed
    assert [status for status, _ in _answers(fake.writes)] == [200, 400]
    assert RECEIVED == ["http.request"]


def test_refusals_are_counted_with_the_apps_metrics() -> None:
    from app.http.metrics import Metrics

    metrics = Metrics()
    fake = _connect([b"GARBAGE\r\n\r\n"], state={PROTOCOL_METRICS: metrics})
    assert _status(fake.writes[0]) == 400
    assert metrics.registry.get_sample_value("intent_rejected_total", {"reason": "invalid_http"}) == 1.0


@pytest.mark.integration
def test_a_running_server_counts_what_its_protocol_refuses() -> None:
    """The lifespan hands the app's metrics to uvicorn's protocol: /metrics shows refusals the app never saw."""
    import socket

    from tests.servers import get, running_server

    with running_server() as (base, _):
        port = int(base.rsplit(":", 1)[1])
        for raw in (b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (1 << 20)):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(raw)
                answer = s.recv(1 << 16)
            assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")), answer[:80]
            # Under uvloop, whose loop clock is read once per iteration in ms, the service's time read 0.000.
            assert _service_ms(answer) > 0, answer[:400]
        status, exposition = get(base + "/metrics", 10.0)
        assert status == 200
        text = exposition.decode()
    for reason in ("invalid_http", "headers_too_large"):
        assert f'intent_rejected_total{{reason="{reason}"}} 1.0' in text.splitlines(), reason


@pytest.mark.integration
def test_a_running_server_answers_a_body_longer_than_its_content_length_then_refuses_the_rest() -> None:
    """The service reads the 5 bytes declared, `{"tex`, and answers them (not JSON), then refuses the rest."""
    import socket

    from tests.servers import running_server

    head = b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n"
    raw = head + b'{"text":"hi"}'
    with running_server() as (base, _), socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), 10) as s:
        s.sendall(raw)
        received = b""
        while chunk := s.recv(1 << 16):  # the server closes after its refusal
            received += chunk
    answers = []
    while received:
        head, _, rest = received.partition(b"\r\n\r\n")
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
        length = int(fields[b"content-length"])
        answers.append((_status(head), json.loads(rest[:length])["error"]["type"]))
        received = rest[length:]
    assert answers == [(400, "invalid_json"), (400, "invalid_http")]


def _fields(write: bytes) -> dict[bytes, bytes]:
    head = write.partition(b"\r\n\r\n")[0]
    return dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])


def _service_ms(write: bytes) -> float:
    (entry,) = _fields(write)[b"server-timing"].split(b", ")
    name, _, duration = entry.partition(b";dur=")
    assert name == b"service"
    return float(duration)


def test_each_kind_of_refusal_carries_a_fresh_request_id_and_the_services_time() -> None:
    """A 400, 431 and 408 carry what the app's answers carry: `x-request-id` (new, even where the refused bytes held
    one) and `server-timing: service;dur=`, from the request's first byte to the refusal."""
    part = b"POST /predict HTTP/1.1\r\nx-request-id: mine\r\n"  # after a whole request on the same connection
    began = time.perf_counter()
    refusals = [
        _connect([b"GARBAGE\r\nx-request-id: mine\r\n\r\n"]).writes[-1],
        _connect(_chunks(10 * DEFAULT_LIMITS.max_head_bytes)).writes[-1],
        _connect([], wait_s=10, state=SHORT_TIMEOUT).writes[-1],
        _connect([POST, part], wait_s=10, state=SHORT_TIMEOUT).writes[-1],
    ]
    took_ms = (time.perf_counter() - began) * 1000
    assert [_status(w) for w in refusals] == [400, 431, 408, 408]
    ids = [_fields(w)[b"x-request-id"].decode() for w in refusals]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == 4
    times = [_service_ms(w) for w in refusals]
    assert all(0 <= t <= took_ms for t in times)
    # INTENT_READ_TIMEOUT_S=0.05, counted from the request's first byte
    assert min(times[2:]) >= 50


def test_a_refusals_warning_in_the_log_carries_the_request_id_the_client_was_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING"):
        fake = _connect([], wait_s=10, state=SHORT_TIMEOUT)
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert record.getMessage() == "closed a connection whose request did not arrive whole in 0.05 s"
    assert record.__dict__["request_id"] == _fields(fake.writes[-1])[b"x-request-id"].decode()


def _service_app(**settings: Any) -> Any:
    """The service's own app, with a fake model; its lifespan is not run (no route here reaches the model)."""
    return create_app(Settings(warmup_queries=0, **settings), fake_factory(FakeClassifier()))


@pytest.mark.parametrize(
    ("settings", "head", "status"),
    [
        ({}, b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 999999\r\nexpect: 100-continue\r\n\r\n", 413),
        ({}, b"POST /predict/batch HTTP/1.1\r\nhost: x\r\ncontent-length: 999999\r\n\r\n", 413),
        ({}, b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 9\r\ncontent-encoding: gzip\r\n\r\n", 415),
        ({"api_key": "k"}, b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 9\r\n\r\n", 401),
    ],
    ids=["413-expect-100", "413-batch", "415", "401"],
)
def test_an_error_answered_before_the_body_came_closes_the_connection(
    settings: dict[str, Any], head: bytes, status: int
) -> None:
    """Kept open, the request a client sends next on the connection (having sent no body after the refusal, as
    Expect: 100-continue lets it) would be read as the rest of this one's body, and never answered."""
    fake = _connect([head, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"], _service_app(**settings), wait_s=10)
    assert fake.closed
    (write,) = fake.writes
    assert (_status(write), _closes(write)) == (status, True)


def test_an_error_answered_after_the_whole_body_keeps_the_connection() -> None:
    fake = _connect([b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: 7\r\n\r\n{not js"], _service_app())
    (write,) = fake.writes
    assert (_status(write), _closes(write), fake.closed) == (400, False, False)


@pytest.mark.parametrize("route", ["/predict", "/predict/batch"])
def test_a_body_that_never_arrives_whole_is_counted_499_not_as_the_services_failure(
    route: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The client gets its 408 from the protocol; the app's count says the request never arrived (499, not timed),
    and nothing is logged as an error: a slow client is not a fault of the service (the 5xx alert)."""
    app = _service_app()
    head = b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n" % route.encode()
    with caplog.at_level(logging.INFO):
        fake = _connect([head + b'{"te'], app, wait_s=10, state=SHORT_TIMEOUT)
    assert [_status(w) for w in fake.writes] == [408]
    registry = app.state.metrics.registry
    labels = {"route": route, "method": "POST"}
    assert registry.get_sample_value("intent_requests_total", {**labels, "status": "499"}) == 1.0
    assert registry.get_sample_value("intent_requests_total", {**labels, "status": "500"}) is None
    assert registry.get_sample_value("intent_request_duration_seconds_count", {"route": route, "status": "499"}) is None
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"GET /health HTTP/1.1\r\n\r\n", "an HTTP/1.1 request needs one Host header"),
        (b"GET /health HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", "an HTTP/1.1 request needs one Host header"),
        (b"GET /health HTTP/1.0\r\nhost: a\r\nhost: b\r\n\r\n", "an HTTP/1.1 request needs one Host header"),
        (b"GET /health HTTP/1.1\r\nhost: a b/c\r\n\r\n", "the Host header is not a host"),
        (b"GET /health HTTP/1.1\r\nhost: user@evil.example\r\n\r\n", "the Host header is not a host"),
        (b"GET /health HTTP/2.0\r\nhost: x\r\n\r\n", "HTTP/2.0 is not served: send HTTP/1.1"),
        (b"GET /health\r\n\r\n", "HTTP/0.9 is not served: send HTTP/1.1"),
    ],
    ids=["no-host", "two-hosts", "two-hosts-1.0", "host-with-space", "host-with-userinfo", "http-2.0", "no-version"],
)
def test_a_head_rfc_9112_says_to_refuse_gets_400_and_never_reaches_the_app(head: bytes, message: str) -> None:
    fake = _connect([head + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"])  # and a good request behind it
    assert fake.closed
    (write,) = fake.writes
    assert (_status(write), json.loads(write.partition(b"\r\n\r\n")[2])) == (
        400,
        {"error": {"type": "invalid_http", "message": message}},
    )
    assert RECEIVED == []


@pytest.mark.parametrize(
    "head",
    [
        b"GET /health HTTP/1.0\r\n\r\n",  # HTTP/1.0 needs no Host (HAProxy's health check sends none)
        b"GET /health HTTP/1.1\r\nhost: \r\n\r\n",
        b"GET /health HTTP/1.1\r\nhost: example.com:8000\r\n\r\n",
        b"GET /health HTTP/1.1\r\nhost: [::1]:8000\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: 10.0.0.7\r\n\r\n",
    ],
)
def test_a_head_with_a_good_host_or_none_in_http_1_0_is_answered(head: bytes) -> None:
    fake = _connect([head], wait_s=0.2)
    assert [_status(w) for w in fake.writes] == [200]
