"""Model rollout without a restart.

`POST /admin/reload` (only when `INTENT_ADMIN_KEY` is set, and only with `Authorization: Bearer <that key>`)
loads a model directory through the same factory as start-up (files, sha256, tokenizer, labels against
both stages' logits), warms it up off the event loop, and swaps it in: new requests go to the new model,
and requests already in the queue finish on the one they started on (the queue reads the model slot once
per request). A model that does not load is refused with 422 `model_rejected`; the old one keeps serving, and
what the refused load built is given back to the kernel.
With `INTENT_MODEL_ROOT` set, a directory outside it (after resolving symlinks) is refused with 403
`forbidden` before anything is read from it, here and in the workers that follow the pointer.

The worker that answers the call then writes a pointer file (`INTENT_MODEL_POINTER`, which `python -m
app` creates for its workers) naming the directory and version. Every other worker polls that file and
loads the same directory, so all of them serve the new version within a poll interval plus a load (about
a second); a worker that restarts later starts from the pointer too, not from `INTENT_MODEL_DIR`. A pointer
file removed sends every worker back to `INTENT_MODEL_DIR`, where a worker that starts then begins.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from app import heap
from app.config import within_root
from app.engine.engine import WARMUP_TEXTS, Predictor
from app.engine.errors import ModelLoadError
from app.http.errors import Forbidden, ModelRejected, NotReady, PointerNotWritten, ServiceError
from app.http.routes import parse
from app.http.serving import Served

if TYPE_CHECKING:
    from starlette.datastructures import State

    from app.config import Settings

log = logging.getLogger("app")
ADMIN_RELOAD = "/admin/reload"
ADMIN_KEY_NEEDED = "admin routes need 'Authorization: Bearer <INTENT_ADMIN_KEY>'"


@dataclass(frozen=True)
class Pointer:
    """Which model every worker should serve, written by the worker that reloaded. An empty version stands for
    whatever `model_dir` holds: the follower's own pointer back to INTENT_MODEL_DIR once the file is removed."""

    model_dir: str
    version: str

    def served_by(self, served: Served | None) -> bool:
        if served is None:
            return False
        if self.version:
            return served.version == self.version
        return served.model_dir == Path(self.model_dir)


def read_pointer(path: Path | None) -> Pointer | None:
    if path is None:
        return None
    try:
        raw = json.loads(path.read_text())
        return Pointer(str(raw["model_dir"]), str(raw["version"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not written yet: no reload has happened


def write_pointer(path: Path, pointer: Pointer) -> None:
    """Atomically: a worker polling the file sees the old pointer or the new one, never half of one. OSError if
    it cannot be written, with nothing left behind."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"model_dir": pointer.model_dir, "version": pointer.version}))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def install(state: State, model: Predictor, card: dict[str, Any], model_dir: Path) -> str | None:
    """Make `model`, loaded from `model_dir`, the served one: the slot that requests, /model and the model_info
    metric read. Returns the version it replaces (None at start-up). The replaced model is freed when the last
    request that read it is answered; the memory it held is then given back to the kernel (app.heap)."""
    served = Served.of(model, card, model_dir)
    previous: Served | None = state.slot.install(served)
    metrics = state.metrics
    if previous is not None and previous.info != served.info:
        metrics.model_info.labels(*previous.info).set(0)
    metrics.model_info.labels(*served.info).set(1)
    if previous is None:
        return None
    if previous.model is not model:  # a factory may hand back the model it serves (the tests' fakes do)
        heap.when_freed(previous.model, asyncio.get_running_loop())
    return previous.version


def load_warm(state: State, model_dir: Path) -> tuple[Predictor, dict[str, Any]]:
    """Load `model_dir` with the service's factory and warm it up (blocking: run it in a thread)."""
    settings: Settings = state.settings
    model, card = state.model_factory(settings.model_copy(update={"model_dir": model_dir}))
    try:
        for i in range(settings.warmup_queries):
            text = WARMUP_TEXTS[i % len(WARMUP_TEXTS)]
            model.warm(text)  # every stage, which the texts' own answers may not reach
            model.predict(text, top_k=3)  # and the answering path, ranking included
    except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors at run time (an allocation, say)
        # A model that cannot answer is refused like one that does not load: a reload had answered 500 and killed
        # the pointer follower, and a worker restarting on the pointer had failed to start.
        why = str(exc).partition("\n")[0][:200] or type(exc).__name__
        raise ModelLoadError(f"the warm-up failed: {why}") from None
    return model, card


def check_root(state: State, model_dir: Path) -> None:
    """Refuse a directory outside INTENT_MODEL_ROOT (when set), symlinks and `..` resolved first, and one that
    cannot be resolved (a symlink loop)."""
    try:
        inside = within_root(model_dir, state.settings.model_root)
    except ValueError as exc:
        state.metrics.reloads.labels("rejected").inc()
        raise ModelRejected(str(exc)) from None
    if not inside:
        state.metrics.reloads.labels("rejected").inc()
        raise Forbidden(f"model_dir {model_dir} is outside INTENT_MODEL_ROOT")


async def reload(state: State, model_dir: Path, publish: bool) -> tuple[str, str | None]:
    """Load, verify, warm up and swap in `model_dir`; with `publish`, point the other workers at it.
    Returns (new version, previous version). Reloads in one worker run one at a time."""
    check_root(state, model_dir)
    async with state.reload_lock:
        refusal: ServiceError | None = None
        try:
            model, card = await asyncio.to_thread(load_warm, state, model_dir)
        except (ModelLoadError, OSError) as exc:  # OSError: a directory this process may not read
            refusal = ModelRejected(f"{model_dir}: {exc}")
            # Its traceback holds the frames that built the refused model, and a cycle through the future that
            # carried it from the thread: left to the garbage collector, the model outlived the trim below.
            exc.__traceback__ = None
        else:
            pointer_path: Path | None = state.settings.model_pointer
            if publish and pointer_path is not None:
                # Before the swap: a pointer that cannot be written leaves this worker as it was, with the others,
                # rather than on a model they never hear of.
                try:
                    write_pointer(pointer_path, Pointer(str(model_dir), model.version))
                except OSError as exc:
                    refusal = PointerNotWritten(
                        f"the other workers cannot be told of it ({exc.strerror}): nothing changed"
                    )
                    del model
        if refusal is not None:
            # Raised here, outside the handler, so that the model refused (built before its outputs were checked
            # against the labels, or a warm-up failed, or not published) is freed with the exception's traceback:
            # give its pages back, as a replaced model's are, so that a refused reload leaves the worker as large as
            # it was (app.heap).
            state.metrics.reloads.labels("rejected").inc()
            await asyncio.to_thread(heap.return_free_memory)
            raise refusal
        previous = install(state, model, card, model_dir)
        state.metrics.reloads.labels("ok").inc()
        log.info("model reloaded", extra={"model_version": model.version, "previous": previous})
        return model.version, previous


async def follow_pointer(state: State, path: Path, interval_s: float) -> None:
    """Poll the pointer file; when it names a version this worker does not serve, load that directory. Compared
    with what this worker serves, not with the pointer it saw last: two reloads in other workers between two polls
    (A, then B, then A again) had left a worker on B for good. A pointer that failed to load is tried again after
    INTENT_RELOAD_RETRY_S, twice as long after each further failure, up to 8 times as long: a failure may pass (a
    full disk), and it had left the worker behind until it restarted. One outside INTENT_MODEL_ROOT, or whose
    directory holds another version than it names (rewritten in place since), is not tried again until it changes.

    A pointer file removed (by hand: the workers never remove it) stands for INTENT_MODEL_DIR. A worker that
    started then began there, while those already running had kept the reloaded model, so that one replica
    answered with two versions after a worker restart. A file that is there but cannot be read or parsed (a
    hand edit under way) is still passed over: the workers keep what they serve."""
    loop = asyncio.get_running_loop()
    retry_s: float = state.settings.reload_retry_s
    configured = Pointer(str(state.settings.model_dir), "")
    failed: Pointer | None = None  # the pointer as last seen, if it failed
    delay = retry_at = 0.0  # the back-off, and when it ends (loop time)
    while True:
        await asyncio.sleep(interval_s)
        pointer = read_pointer(path)
        if pointer is None and not os.path.lexists(path):
            pointer = configured
        if pointer != failed:
            failed = None  # the pointer changed: its back-off starts over, even if it names the failed one again
        if pointer is None or (failed is not None and loop.time() < retry_at):
            continue
        # (No local name for the served model: held across the sleep, it would keep a replaced model alive.)
        if pointer.served_by(state.slot.served):
            continue
        if state.reload_lock.locked():
            continue  # this worker is reloading: look again once it has, and has published or not
        try:
            version, _ = await reload(state, Path(pointer.model_dir), publish=False)
        except (ModelRejected, Forbidden) as exc:
            again = not isinstance(exc, Forbidden)  # INTENT_MODEL_ROOT does not change while the worker runs
            log.warning("could not follow a reload", extra={"error": exc.message[:300]})
        except Exception as exc:  # noqa: BLE001 - a factory's fault: ending this task had left the worker behind for good
            again = True
            state.metrics.reloads.labels("rejected").inc()
            log.error("could not follow a reload", extra={"error_type": type(exc).__name__})
        else:
            if version == pointer.version or not pointer.version:
                failed = None
                continue
            again = False  # loaded again at every poll, it had never matched
            log.warning(
                "the model pointer's version is not its directory's",
                extra={"pointer_version": pointer.version, "model_version": version},
            )
        delay = retry_s if failed is None else min(2 * delay, 8 * retry_s)
        failed = pointer
        retry_at = loop.time() + delay if again else math.inf


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_dir: str | None = Field(None, min_length=1, max_length=4096, description="default: INTENT_MODEL_DIR")


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str | None
    model_dir: str


router = APIRouter()


@router.post(
    ADMIN_RELOAD,
    summary="Load, verify and swap in a model directory, in every worker",
    response_model=ReloadResponse,
    include_in_schema=True,
)
async def admin_reload(request: Request) -> Response:
    state = request.app.state  # its key was checked by the service middleware, before the body was read
    body = await request.body()
    req = parse(body, ReloadRequest) if body.strip() else ReloadRequest()
    if not state.ready:
        raise NotReady("not serving: shutting down or still loading", {"Retry-After": "1"})
    model_dir = Path(req.model_dir) if req.model_dir else state.settings.model_dir
    version, previous = await reload(state, model_dir, publish=True)
    content = {"model_version": version, "previous_version": previous, "model_dir": str(model_dir)}
    return Response(orjson.dumps(content), media_type="application/json")
