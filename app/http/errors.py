"""One exception type per failure kind, one table from type to HTTP status, one JSON error body, one renderer."""

from __future__ import annotations

from typing import Any

import orjson


class ServiceError(Exception):
    """Base class: `kind` names the failure in the response body and in metrics."""

    kind = "internal_error"
    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidHTTP(ServiceError):
    """Bytes that are not an HTTP/1.1 request (the parser refused them); answered by the protocol, which closes."""

    kind = "invalid_http"


class InvalidJSON(ServiceError):
    kind = "invalid_json"


class InvalidEncoding(ServiceError):
    kind = "invalid_encoding"


class ValidationFailed(ServiceError):
    kind = "validation_error"


class EmptyText(ServiceError):
    kind = "empty_text"


class TextTooLong(ServiceError):
    kind = "text_too_long"


class BatchTooLarge(ServiceError):
    kind = "batch_too_large"


class BodyTooLarge(ServiceError):
    kind = "body_too_large"


class RequestTimeout(ServiceError):
    """No whole request within INTENT_READ_TIMEOUT_S (app.http.protocol); answered by the protocol, which then
    closes."""

    kind = "request_timeout"


class UnsupportedEncoding(ServiceError):
    """A body sent with a Content-Encoding (gzip, ...): bodies are read as sent, never decompressed."""

    kind = "unsupported_content_encoding"


class UnsupportedTransferCoding(ServiceError):
    """A body sent with a transfer coding other than chunked (gzip, ...), which the service does not implement."""

    kind = "unsupported_transfer_coding"


class UnsupportedMediaType(ServiceError):
    """A body sent as something other than JSON (text/plain, a form): refused before it is read, not parsed as
    JSON whatever it says it is."""

    kind = "unsupported_media_type"


class CORSRefused(ServiceError):
    """A CORS preflight that the configured origins, methods or headers do not allow (INTENT_CORS_ORIGINS)."""

    kind = "cors_refused"


class HeadersTooLarge(ServiceError):
    """A request line and headers over INTENT_MAX_HEAD_BYTES (app.http.protocol); refused by the protocol, before
    the app."""

    kind = "headers_too_large"


class Unauthorized(ServiceError):
    kind = "unauthorized"


class NotFound(ServiceError):
    kind = "not_found"


class MethodNotAllowed(ServiceError):
    kind = "method_not_allowed"


class Overloaded(ServiceError):
    kind = "overloaded"


class NotReady(ServiceError):
    kind = "not_ready"


class ModelRejected(ServiceError):
    """A model directory given to /admin/reload that cannot be served; the old model keeps serving."""

    kind = "model_rejected"


class PointerNotWritten(ServiceError):
    """/admin/reload loaded the model but could not write the pointer the other workers follow; nothing changed."""

    kind = "reload_not_published"


class Forbidden(ServiceError):
    """A model directory outside INTENT_MODEL_ROOT given to /admin/reload; nothing is read from it."""

    kind = "forbidden"


STATUS: dict[type[ServiceError], int] = {
    InvalidHTTP: 400,
    InvalidJSON: 400,
    InvalidEncoding: 400,
    CORSRefused: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    MethodNotAllowed: 405,
    RequestTimeout: 408,
    BodyTooLarge: 413,
    UnsupportedEncoding: 415,
    UnsupportedMediaType: 415,
    ValidationFailed: 422,
    EmptyText: 422,
    TextTooLong: 422,
    BatchTooLarge: 422,
    ModelRejected: 422,
    Overloaded: 429,
    HeadersTooLarge: 431,
    PointerNotWritten: 500,
    UnsupportedTransferCoding: 501,
    NotReady: 503,
    ServiceError: 500,
}
for _cls, _code in STATUS.items():
    _cls.status = _code


def error_body(kind: str, message: str) -> bytes:
    return orjson.dumps({"error": {"type": kind, "message": message}})


def render(exc: ServiceError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """An error as its status, headers and body: the one rendering both the service middleware and FastAPI's
    exception handlers send."""
    body = error_body(exc.kind, exc.message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    return exc.status, headers, body


ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}
