"""One pure-ASGI middleware (cheaper than a stack of BaseHTTPMiddleware): request id, auth,
body-size limit and media type before parsing, per-request metrics and the DEBUG access line.

It also answers the hot route, POST /predict, itself: FastAPI's routing, request object and
exception middleware cost more per call than parsing and answering the request (measured in
the README), and at a millisecond per query that difference shows in p50."""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from app.http.errors import (
    BodyTooLarge,
    ServiceError,
    Unauthorized,
    UnsupportedEncoding,
    UnsupportedMediaType,
    UnsupportedTransferCoding,
    render,
)
from app.http.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# Raw body -> (JSON body, server-timing header); raises ServiceError for a bad request.
DirectHandler = Callable[[bytes], Awaitable[tuple[bytes, str]]]

log = logging.getLogger("app.access")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# The status counted for a request whose body never arrived whole: the client left, or the connection was refused
# mid-body (408, 400 invalid_http; app.http.protocol). nginx's "client closed request". Nothing answered it, so it
# is counted and not timed, and it is not a 5xx: a slow or vanished client is not the service's failure.
CLIENT_CLOSED = 499
# application/json, or a JSON-based type (application/problem+json; RFC 6839), lower-cased, parameters cut off.
_JSON_MEDIA_TYPE = re.compile(rb"application/(?:[a-z0-9!#$&^_.+-]+\+)?json")


def new_request_id() -> str:
    """A fresh request id: for a request that brought none fit to keep, and for the protocol's refusals."""
    return uuid.uuid4().hex


def request_id_of(raw: bytes | None) -> str:
    """The client's id if it is short and printable ASCII, otherwise a fresh one."""
    if raw and len(raw) <= 128 and all(33 <= b < 127 for b in raw):
        return raw.decode("ascii")
    return new_request_id()


def service_time(start: float) -> bytes:
    """The server-timing entry of the service's time: ms from `start` (a perf_counter reading) to now."""
    return f"service;dur={(time.perf_counter() - start) * 1000:.3f}".encode()


def _with_service_time(headers: list[tuple[bytes, bytes]], start: float) -> list[tuple[bytes, bytes]]:
    """The response's headers with `service;dur=` (ms from this middleware's first look at the request to its
    response's start) added to its server-timing, or as one. A client that subtracts it from what it measured
    learns how long the request spent outside the service (the network, the kernel, a busy event loop, itself);
    the other durations in the header split the service's own time further."""
    entry = service_time(start)
    out, added = [], False
    for name, value in headers:
        if not added and name.lower() == b"server-timing":
            value, added = value + b", " + entry, True
        out.append((name, value))
    return out if added else [*out, (b"server-timing", entry)]


class ServiceMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        max_body: int,
        api_key: str | None,
        open_paths: list[str],
        route_labels: frozenset[str],
        direct_posts: Mapping[str, DirectHandler] | None = None,
        path_keys: Mapping[str, tuple[str, str]] | None = None,
        json_posts: frozenset[str] = frozenset(),
    ) -> None:
        """`route_labels`: the app's route paths, taken from its router when the app is built; any other
        path is labelled `other` in the metrics, so that scanners cannot blow up their cardinality. Paths
        match exactly: a route with a path parameter (`/x/{id}`) would be counted as `other`. `path_keys`: paths
        with a key of their own instead of `api_key` (path -> (key, the 401's message)), checked as it is, before
        the body is read. A key is sent as `Authorization: Bearer <key>`, the scheme in any case (RFC 9110 11.1).
        `json_posts`: paths whose POST body is JSON; one sent as another media type is refused before it is
        read."""
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.api_key = api_key.encode() if api_key else None
        self.open_paths = frozenset(open_paths)
        self.path_keys = {path: (key.encode(), why) for path, (key, why) in (path_keys or {}).items()}
        self.direct_posts = dict(direct_posts or {})
        self.route_labels = frozenset(route_labels)
        self.json_posts = frozenset(json_posts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        if len(headers) < len(scope["headers"]):  # a name on several lines: rare, so only then looked at
            _join_repeated(headers, scope["headers"])
        rid = request_id_of(headers.get(b"x-request-id"))
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode())
        path: str = scope["path"]
        method: str = scope["method"]
        route = path if path in self.route_labels else "other"
        status = 500
        recorded = False

        def record() -> None:
            nonlocal recorded
            recorded = True
            elapsed = time.perf_counter() - start
            if status == CLIENT_CLOSED:
                self.metrics.count_request(route, method, str(status))
            else:
                self.metrics.observe_request(route, method, str(status), elapsed)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "request",
                    extra={
                        "request_id": rid,
                        "method": method,
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                    },
                )

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*_with_service_time(message.get("headers", []), start), rid_header]
            elif message["type"] == "http.response.body" and not message.get("more_body", False) and not recorded:
                # Count the request before its last byte goes out: a client that reads /metrics right
                # after this response (from any worker) must see it.
                record()
            await send(message)

        # Whether the request's body is still to come when an error is answered: then the connection closes after
        # the answer (RFC 9110 10.1.1). Kept open, a client that sent no body after the refusal (Expect:
        # 100-continue) would have its next request read as the rest of this one's body, and get no answer.
        body_pending = b"content-length" in headers and headers[b"content-length"] != b"0"
        body_pending = body_pending or b"transfer-encoding" in headers
        try:
            required = self.path_keys.get(path)
            if required is None and self.api_key is not None and path not in self.open_paths:
                required = (self.api_key, "missing or wrong API key")
            if required is not None and not _bearer_matches(headers.get(b"authorization", b""), required[0]):
                self.metrics.rejected.labels("unauthorized").inc()
                why = (
                    "more than one Authorization header"
                    if _repeated(b"authorization", scope["headers"])
                    else required[1]
                )
                raise Unauthorized(why, {"WWW-Authenticate": "Bearer"})
            direct = self.direct_posts.get(path) if method == "POST" else None
            if direct is not None or method in _BODY_METHODS:
                media = headers.get(b"content-type")
                # None: a client that names no type (curl -X POST, the load tests' raw requests) sends JSON.
                if media is not None and media != b"application/json" and method == "POST" and path in self.json_posts:
                    self._check_media_type(media)
                body = await self._read_body(headers, receive, scope["headers"])
                body_pending = False
                if body is None:
                    status = CLIENT_CLOSED  # nothing to answer, and no one to answer it to
                    return
                if direct is not None:
                    await self._answer_directly(direct, body, send_with_id, rid)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_id)
        except ServiceError as exc:
            if body_pending:
                exc.headers["Connection"] = "close"
            await _send_error(send_with_id, exc)
        finally:
            if not recorded:  # no final body went out: the client disconnected, or the app failed
                record()

    async def _answer_directly(self, handler: DirectHandler, body: bytes, send: Send, request_id: str) -> None:
        try:
            content, timing = await handler(body)
        except ServiceError:
            raise
        except Exception as exc:  # noqa: BLE001 - the last resort that FastAPI's handler is for other routes
            log.error("unhandled error", extra={"request_id": request_id, "error_type": type(exc).__name__})
            raise ServiceError("internal error") from None
        response_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"server-timing", timing.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": response_headers})
        await send({"type": "http.response.body", "body": content})

    def _check_media_type(self, media: bytes) -> None:
        """Refuse a Content-Type other than JSON, UTF-8 if a charset is named (RFC 8259 8.1): a form or text/plain
        (what `curl -d` and an HTML form send) is not read as JSON, whatever it holds."""
        kind, *params = media.lower().split(b";")
        charsets = [
            value.strip().strip(b'"')
            for name, _, value in (p.partition(b"=") for p in params)
            if name.strip() == b"charset"
        ]
        if _JSON_MEDIA_TYPE.fullmatch(kind.strip()) and all(c == b"utf-8" for c in charsets):
            return
        self.metrics.rejected.labels("unsupported_media_type").inc()
        raise UnsupportedMediaType(
            f"Content-Type {media.decode('latin-1')[:60]} is not accepted: send application/json"
        )

    async def _read_body(
        self, headers: dict[bytes, bytes], receive: Receive, raw_headers: list[tuple[bytes, bytes]]
    ) -> bytes | None:
        """The whole body, refused as soon as it passes the limit; None if the client disconnected."""
        if b"transfer-encoding" in headers and (transfer := _codings(raw_headers, b"transfer-encoding", b"chunked")):
            self.metrics.rejected.labels("unsupported_transfer_coding").inc()
            # The parser takes off `chunked` alone: the body under any other coding had been read as plain JSON.
            raise UnsupportedTransferCoding(
                f"Transfer-Encoding {transfer.decode('latin-1')[:40]} is not implemented: send chunked or a "
                "Content-Length"
            )
        coding = _codings(raw_headers, b"content-encoding", b"identity") if b"content-encoding" in headers else b""
        if coding:
            self.metrics.rejected.labels("unsupported_content_encoding").inc()
            # Refused rather than decompressed: a few hundred bytes of JSON gain nothing from compression, and a
            # decompressed body would need its own limit (a small gzip can inflate to gigabytes).
            raise UnsupportedEncoding(
                f"Content-Encoding {coding.decode('latin-1')[:40]} is not accepted: send the body uncompressed",
                {"Accept-Encoding": "identity"},
            )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            self.metrics.rejected.labels("body_too_large").inc()
            raise BodyTooLarge(f"request body is over {self.max_body} bytes")
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                self.metrics.rejected.labels("body_too_large").inc()
                raise BodyTooLarge(f"request body is over {self.max_body} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)


def _join_repeated(headers: dict[bytes, bytes], raw_headers: list[tuple[bytes, bytes]]) -> None:
    """In `headers`, which kept a repeated name's last line, each repeated name's lines joined as one list (RFC
    9110 5.3), which no singleton field matches: two Authorization lines are refused even if one is right, two
    Content-Types are no JSON, and two x-request-ids (`a, b`, with a space) give way to a fresh one. The last line
    had won silently."""
    seen: set[bytes] = set()
    for name, _ in raw_headers:
        if name in seen:
            headers[name] = b", ".join(value for n, value in raw_headers if n == name)
        seen.add(name)


def _repeated(name: bytes, raw_headers: list[tuple[bytes, bytes]]) -> bool:
    return sum(n == name for n, _ in raw_headers) > 1


def _codings(raw_headers: list[tuple[bytes, bytes]], header: bytes, plain: bytes) -> bytes:
    """The codings a body was sent with, other than `plain` (`identity`, `chunked`), from every line of `header`
    (Content-Encoding, Transfer-Encoding): a header given twice is one list (RFC 9110 5.3), so `gzip` then
    `identity` is still gzip, where the last line alone read as plain."""
    codings = (c.strip().lower() for name, value in raw_headers if name == header for c in value.split(b","))
    return b", ".join(c for c in codings if c not in (b"", plain))


def _bearer_matches(authorization: bytes, key: bytes) -> bool:
    """Whether an Authorization value is `Bearer <key>`, the scheme in any case and the key compared in constant
    time: a partition, a lower() and a compare."""
    scheme, _, credentials = authorization.partition(b" ")
    return hmac.compare_digest(credentials.lstrip(b" "), key) and scheme.lower() == b"bearer"


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app: the body already read, whole, then the connection's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send: Send, exc: ServiceError) -> None:
    status, headers, body = render(exc)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
