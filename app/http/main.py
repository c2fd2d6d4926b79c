"""`create_app(settings)`: the application factory. The lifespan owns the model, session and queue."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import iter_route_contexts
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from app import __doc__ as description
from app import heap
from app.config import Settings, within_root
from app.engine.engine import WARMUP_TEXTS
from app.engine.errors import ModelLoadError
from app.http import reload
from app.http.errors import CORSRefused, MethodNotAllowed, NotFound, ServiceError, ValidationFailed, render
from app.http.logs import configure_logging
from app.http.metrics import Metrics, drop_gauges_of_a_reused_pid
from app.http.middleware import ServiceMiddleware, request_id_of, service_time
from app.http.protocol import PROTOCOL_DRAIN, PROTOCOL_LIMITS, PROTOCOL_METRICS, HttpLimits
from app.http.queue import InferenceQueue
from app.http.routes import predict_one, router
from app.http.serving import ModelFactory, Slot, load_engine

log = logging.getLogger("app")


def _install_drain_on_sigterm(app: FastAPI, delay: float, drain: asyncio.Event) -> None:
    """On SIGTERM: /ready answers 503 at once, traffic is still served for `delay` seconds so that
    load balancers can stop routing here, then uvicorn's own handler closes listeners and drains. From the
    SIGTERM on, `drain` is set: each answer closes its connection (app.http.protocol)."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set signal handlers (TestClient runs the lifespan elsewhere)
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return
    loop = asyncio.get_running_loop()

    def begin_drain(signum: int, frame: FrameType | None) -> None:
        drain.set()
        app.state.metrics.ready.set(0)
        log.info("SIGTERM: not ready; closing listeners in %.1f s", delay)
        loop.call_later(delay, previous, signum, frame)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        # A signal handler runs between any two bytecodes of the main thread, which may be holding the lock
        # of a metric (multiprocess mode) or of a log handler at that moment: taking either here would
        # deadlock the worker. So only a flag is set here; the rest runs on the event loop.
        if not app.state.ready:  # a second SIGTERM: stop waiting
            previous(signum, frame)
            return
        app.state.ready = False
        loop.call_soon_threadsafe(begin_drain, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def _lifespan(factory: ModelFactory) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        settings: Settings = app.state.settings
        metrics: Metrics = app.state.metrics
        state = app.state
        state.model_factory = factory
        state.reload_lock = asyncio.Lock()
        # A worker started after a reload serves what the pointer names, like the workers already running.
        pointer = reload.read_pointer(settings.model_pointer)
        model_dir = Path(pointer.model_dir) if pointer is not None else settings.model_dir
        try:
            inside = within_root(model_dir, settings.model_root)
        except ValueError:  # a symlink loop
            inside = False
        if not inside:  # a pointer file no reload of ours wrote
            log.warning("the model pointer names a directory outside INTENT_MODEL_ROOT; serving INTENT_MODEL_DIR")
            model_dir = settings.model_dir
        heap.limit_arenas()  # before the first thread that a reload loads a model in
        try:
            model, card = reload.load_warm(state, model_dir)
        except (ModelLoadError, OSError) as exc:
            if model_dir == settings.model_dir:
                raise
            # Its directory was removed or changed since the reload: a worker that restarts (one killed, say)
            # serves INTENT_MODEL_DIR rather than fail, which uvicorn answers by stopping every worker.
            log.warning(
                "the model pointer names a directory that does not load; serving INTENT_MODEL_DIR",
                extra={"error": str(exc)[:300]},
            )
            model_dir = settings.model_dir
            model, card = reload.load_warm(state, model_dir)
        reload.install(state, model, card, model_dir)
        version, serving = model.version, card.get("serving", {})  # the CPU, and the weights it runs on it
        del model, card  # the slot holds the model alone, so the reload that replaces it frees it
        heap.return_free_memory()  # what the load and the warm-up left behind
        queue = InferenceQueue(
            state.slot,
            metrics,
            settings.max_queue,
            settings.retry_after_s,
            settings.inference_mode,
            keep_warm_s=settings.keep_warm_ms / 1000,
            warm_texts=WARMUP_TEXTS,
        )
        queue.start()
        state.queue = queue
        sampler = asyncio.create_task(metrics.sample_worker_every(), name="worker-sampler")
        follower = None
        if settings.admin_key is not None and settings.model_pointer is not None:
            follower = asyncio.create_task(reload.follow_pointer(state, settings.model_pointer, settings.reload_poll_s))
        metrics.ready.set(1)
        app.state.ready = True
        drain = asyncio.Event()
        _install_drain_on_sigterm(app, settings.shutdown_delay_s, drain)
        log.info("ready", extra={"model_version": version, "mode": settings.inference_mode, **serving})
        try:
            # The lifespan state: uvicorn hands it to each connection's protocol, which applies these limits and
            # counts the requests it refuses before the app sees them (app.http.protocol) in the same metrics.
            yield {PROTOCOL_METRICS: metrics, PROTOCOL_LIMITS: HttpLimits.of(settings), PROTOCOL_DRAIN: drain}
        finally:
            app.state.ready = False
            metrics.ready.set(0)
            if follower is not None:
                follower.cancel()
            sampler.cancel()
            drained = await queue.drain(settings.graceful_timeout_s)
            await queue.stop()
            state.slot.served.model.close()
            app.state.queue = None
            log.info("stopped", extra={"drained": drained})

    return lifespan


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    status, headers, body = render(exc)
    response = Response(body, status_code=status)
    response.raw_headers = headers
    return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    mapped: ServiceError
    path = _shown(request.url.path)
    if exc.status_code == 404:
        mapped = NotFound(f"no route {path}")
    elif exc.status_code == 405:
        # Starlette's exception carries the route's `Allow`, which RFC 9110 requires on a 405.
        mapped = MethodNotAllowed(f"{request.method} is not allowed on {path}", dict(exc.headers or {}))
    else:
        mapped = ServiceError(str(exc.detail))
        mapped.status = exc.status_code
    return await _service_error(request, mapped)


def _shown(path: str, limit: int = 100) -> str:
    """A path as an error message quotes it: cut, so that a client's 60 KB URL is not sent back whole."""
    return path if len(path) <= limit else path[:limit] + "..."


async def _validation_error(request: Request, exc: Exception) -> Response:
    return await _service_error(request, ValidationFailed("request does not match the schema"))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error(
        "unhandled error",
        extra={"request_id": request.scope.get("state", {}).get("request_id"), "error_type": type(exc).__name__},
    )
    return await _service_error(request, ServiceError("internal error"))


class _CORSMiddleware(CORSMiddleware):
    """Starlette's, but a preflight it refuses gets the service's JSON error body, as every other error does, not
    its plain text; with the CORS headers Starlette gives it. Every preflight carries `x-request-id` and
    `server-timing`, as every other answer does: it is answered here, outside the service middleware."""

    def preflight_response(self, request_headers: Headers) -> Response:
        began = time.perf_counter()
        response = super().preflight_response(request_headers)
        if response.status_code == 400:
            reason = bytes(response.body).decode().removeprefix("Disallowed CORS ")  # e.g. `origin, method`
            kept = {k: v for k, v in response.headers.items() if k not in ("content-type", "content-length")}
            status, headers, body = render(CORSRefused(f"CORS preflight refused: {reason} not allowed", kept))
            response = Response(body, status_code=status)
            response.raw_headers = headers
        client_id = request_headers.get("x-request-id")
        response.headers["x-request-id"] = request_id_of(client_id.encode("latin-1") if client_id else None)
        response.headers["server-timing"] = service_time(began).decode()
        return response


def create_app(settings: Settings | None = None, model_factory: ModelFactory | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(
        title="Intent detection",
        version="1.0.0",
        description=description or "",
        lifespan=_lifespan(model_factory or load_engine),
        # `/predict/` is an unknown route (404), not a 307 to a URL built from the client's Host header.
        redirect_slashes=False,
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.ready = False
    app.state.queue = None
    app.state.slot = Slot()
    app.include_router(router)
    path_keys: dict[str, tuple[str, str]] = {}
    if settings.admin_key is not None:
        app.include_router(reload.router)
        # Its own key, not INTENT_API_KEY, checked before its body is read (a client without it had been answered
        # 413 or 415 first, and could make the service read a body).
        path_keys[reload.ADMIN_RELOAD] = (settings.admin_key.get_secret_value(), reload.ADMIN_KEY_NEEDED)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
    key = settings.api_key.get_secret_value() if settings.api_key else None
    # Metrics label routes by the paths the router declares (computed after the routers are included).
    # (FastAPI keeps included routers as one entry each; iter_route_contexts flattens them with their prefixes.)
    routes = [(ctx.path, ctx.methods or set()) for ctx in iter_route_contexts(app.routes) if ctx.path is not None]
    route_labels = frozenset(path for path, _ in routes)
    json_posts = frozenset(path for path, methods in routes if "POST" in methods)  # every POST route takes JSON
    # The service middleware answers POST /predict itself in every configuration.
    app.add_middleware(
        ServiceMiddleware,
        metrics=app.state.metrics,
        max_body=settings.max_body_bytes,
        api_key=key,
        open_paths=list(settings.open_paths),
        path_keys=path_keys,
        route_labels=route_labels,
        direct_posts={"/predict": partial(predict_one, app.state)},
        json_posts=json_posts,
    )
    if settings.cors_origins:
        # Added last, so it is the outermost middleware: its headers reach the directly answered
        # /predict and error responses too, and preflights are answered before auth.
        app.add_middleware(
            _CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id"],
            expose_headers=["server-timing", "x-request-id"],
        )
    return app


def create_app_from_env() -> FastAPI:
    """Entry point for `uvicorn --factory app.http.main:create_app_from_env`: each worker process's, so each
    configures its own logging (with several workers, uvicorn spawns processes that `python -m app`'s set-up never
    reached: their records came out as bare text, below WARNING not at all)."""
    settings = Settings()
    configure_logging(settings.log_level)
    drop_gauges_of_a_reused_pid()
    return create_app(settings)
