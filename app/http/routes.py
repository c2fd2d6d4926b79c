"""HTTP routes. Bodies are parsed from bytes with pydantic's JSON parser, so that invalid JSON,
bad encodings and wrong types each get their own error type instead of one generic 422."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json
from starlette.datastructures import State

from app.config import Settings
from app.engine.engine import Prediction
from app.http import schemas
from app.http.errors import (
    ERROR_SCHEMA,
    BatchTooLarge,
    EmptyText,
    InvalidEncoding,
    InvalidJSON,
    NotReady,
    TextTooLong,
    ValidationFailed,
)
from app.http.normalize import normalize_text

router = APIRouter()
M = TypeVar("M", bound=BaseModel)
JSON = "application/json"


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"description": "error", "content": {JSON: {"schema": ERROR_SCHEMA}}} for code in codes}


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {JSON: {"schema": model.model_json_schema()}}}}


PREDICT_ERRORS = _errors(400, 401, 413, 415, 422, 429, 503)


def parse(body: bytes, model: type[M]) -> M:
    """One pass of pydantic's JSON parser over the bytes; only a body it refuses, or one that may hold NaN or
    Infinity, is looked at again, to tell a bad encoding from bad JSON."""
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        if first["type"] == "json_invalid":
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidEncoding("request body is not valid UTF-8") from None
            raise InvalidJSON("request body is not valid JSON") from None
        _refuse_constants(body)
        if first["type"] == "extra_forbidden":  # its name is the client's, and may be anything: not sent back
            raise ValidationFailed(f"unknown field: the fields are {', '.join(model.model_fields)}") from None
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ValidationFailed(f"{where}: {first['msg']}") from None
    _refuse_constants(body)  # a repeated key can override a constant: {"top_k": NaN, "top_k": 1} validates
    return parsed


def _refuse_constants(body: bytes) -> None:
    """pydantic's parser reads NaN, Infinity and -Infinity as numbers, which JSON has not (RFC 8259 6): a body
    with one is invalid JSON, whether it failed validation (no field takes a number that is not an integer) or
    passed, a repeated key having overridden the constant. The search costs about 0.3 us on a 60-byte body and 2 us
    on a text of 1,000 characters, against about 500 us of model path (Python 3.11, AMD EPYC avx2; `find`, as `in`
    on bytes first tries its operand as an int, raising and clearing a TypeError, which doubled that on a small
    body); only a body that holds either word (in a text, say) is parsed again, strictly."""
    if body.find(b"NaN") >= 0 or body.find(b"Infinity") >= 0:
        try:
            from_json(body, allow_inf_nan=False)
        except ValueError:
            raise InvalidJSON("request body is not valid JSON") from None


def clean_text(text: str, settings: Settings, where: str = "text") -> str:
    limit = settings.max_text_chars
    # Checked before NFC too, which bounds its work: it lengthens a text by 3 times at most.
    if len(text) > limit:
        raise TextTooLong(f"{where} is {len(text)} characters; the limit is {limit}")
    cleaned = normalize_text(text)
    if not cleaned:
        raise EmptyText(f"{where} is empty or whitespace only")
    # The limit holds for what the tokenizer gets: NFC can lengthen a text (U+FB2C is 3 code points after it).
    if len(cleaned) > limit:
        raise TextTooLong(f"{where} is {len(cleaned)} characters after Unicode normalisation; the limit is {limit}")
    return cleaned


def _top_k(requested: int | None, settings: Settings) -> int:
    if requested is None:
        return 0
    if requested > settings.max_top_k:
        raise ValidationFailed(f"top_k: must be at most {settings.max_top_k}")
    return requested


def _prediction(p: Prediction, top_k: int) -> dict[str, Any]:
    out: dict[str, Any] = {"intent": p.intent, "confidence": p.confidence}
    if top_k:
        out["top_k"] = [{"intent": name, "confidence": c} for name, c in p.top_k]
    return out


def _server_timing(predictions: list[Prediction]) -> str:
    """Tokenisation and the whole model path (every stage that ran), summed over the texts; `desc` names
    which model of the cascade answered a single text."""
    inference_ms = sum(p.inference_s for p in predictions) * 1000
    tokenize_ms = sum(p.tokenize_s for p in predictions) * 1000
    desc = f';desc="{predictions[0].stage}"' if len(predictions) == 1 else ""
    return f"tokenize;dur={tokenize_ms:.3f}, inference;dur={inference_ms:.3f}{desc}"


def _json(content: dict[str, Any], predictions: list[Prediction]) -> Response:
    return Response(orjson.dumps(content), media_type=JSON, headers={"server-timing": _server_timing(predictions)})


def _queue(state: State) -> Any:
    queue = getattr(state, "queue", None)
    if queue is None:
        raise NotReady("the model is not loaded yet", {"Retry-After": "1"})
    return queue


async def predict_one(state: State, body: bytes) -> tuple[bytes, str]:
    """POST /predict from raw body to (JSON, server-timing). The service middleware calls this
    directly for the hot route; the FastAPI route below only documents it (and calls this too)."""
    settings: Settings = state.settings
    req = parse(body, schemas.PredictRequest)
    text = clean_text(req.text, settings)
    top_k = _top_k(req.top_k, settings)
    queue = _queue(state)
    state.metrics.batch_size.observe(1)
    (pred,) = await queue.submit([text], top_k)
    content = _prediction(pred, top_k)
    content["model_version"] = pred.model_version
    return orjson.dumps(content), _server_timing([pred])


@router.post(
    "/predict",
    summary="Classify one message",
    response_model=schemas.PredictResponse,
    responses=PREDICT_ERRORS,
    openapi_extra=_body_doc(schemas.PredictRequest),
)
async def predict(request: Request) -> Response:
    """Documents POST /predict in OpenAPI. In a running service the service middleware
    (`app.http.middleware.ServiceMiddleware`) answers this path itself, in every configuration, with
    `predict_one`; this route calls the same `predict_one`, so the two cannot drift apart."""
    content, timing = await predict_one(request.app.state, await request.body())
    return Response(content, media_type=JSON, headers={"server-timing": timing})


@router.post(
    "/predict/batch",
    summary="Classify several messages, answered in input order",
    response_model=schemas.BatchResponse,
    responses=PREDICT_ERRORS,
    openapi_extra=_body_doc(schemas.BatchRequest),
)
async def predict_batch(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    req = parse(await request.body(), schemas.BatchRequest)
    if len(req.texts) > settings.max_batch:
        raise BatchTooLarge(f"texts has {len(req.texts)} items; the limit is {settings.max_batch}")
    texts = [clean_text(t, settings, f"texts.{i}") for i, t in enumerate(req.texts)]
    top_k = _top_k(req.top_k, settings)
    queue = _queue(request.app.state)
    request.app.state.metrics.batch_size.observe(len(texts))
    preds = await queue.submit(texts, top_k)
    version = preds[0].model_version  # one model answers every text of a request
    content = {"predictions": [_prediction(p, top_k) for p in preds], "model_version": version}
    return _json(content, preds)


# HEAD as well on every GET route: monitors and balancers that check with HEAD (RFC 9110 asks every
# general-purpose server to support it) get the GET answer's status and headers. A route of GET and HEAD, declared
# first, answers both, and a 405 on its path takes its Allow from it: from a route of HEAD alone it had said
# `Allow: HEAD`. It is out of the OpenAPI schema, which would otherwise list each path twice under one operation
# id; the GET route documents the path.
@router.get("/health", summary="Liveness: the process is up", response_model=schemas.Status)
@router.api_route("/health", methods=["GET", "HEAD"], include_in_schema=False)
async def health() -> Response:
    return Response(b'{"status":"ok"}', media_type=JSON)


@router.get(
    "/ready",
    summary="Readiness: model loaded and warmed up, not shutting down",
    response_model=schemas.Status,
    responses=_errors(503),
)
@router.api_route("/ready", methods=["GET", "HEAD"], include_in_schema=False)
async def ready(request: Request) -> Response:
    if not request.app.state.ready:
        raise NotReady("not ready", {"Retry-After": "1"})
    return Response(b'{"status":"ready"}', media_type=JSON)


@router.get(
    "/model",
    summary="The model card: version, labels, metrics, sha256",
    response_model=schemas.ModelCardResponse,
    responses=_errors(503),
)
@router.api_route("/model", methods=["GET", "HEAD"], include_in_schema=False)
async def model(request: Request) -> Response:
    served = request.app.state.slot.served
    if served is None:
        raise NotReady("the model is not loaded yet", {"Retry-After": "1"})
    return Response(served.card_json, media_type=JSON)


@router.get(
    "/metrics",
    summary="Prometheus exposition",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
@router.api_route("/metrics", methods=["GET", "HEAD"], include_in_schema=False)
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    metrics = request.app.state.metrics
    metrics.sample_worker()  # the scraped worker's own queue, memory and CPU as of now; the others' are at most 1 s old
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
