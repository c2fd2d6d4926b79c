"""`python -m app`: check the model before binding the port, then run uvicorn."""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import re
import resource
import shutil
import signal
import socket
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import FrameType

import uvicorn
from dotenv.parser import parse_stream
from pydantic import ValidationError
from pydantic_settings import SettingsError

from app.config import Settings
from app.engine.engine import check
from app.http.logs import configure_logging
from app.http.protocol import CoalescingHttpToolsProtocol

APP_FACTORY = "app.http.main:create_app_from_env"


def prepare_metrics_dir(directory: Path) -> None:
    """The workers' shared metrics directory, made if missing (an emptyDir or tmpfs at /tmp starts empty),
    and emptied of the files an earlier run of the service left there: prometheus_client sums every file
    it finds, so a restarted container would otherwise report its predecessor's counts as its own."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()


def raise_open_files_limit() -> tuple[int, int] | None:
    """Raise this process's soft limit on open files to its hard limit; the workers it starts inherit it. Returns
    (before, after) when it changed it.

    Every connection holds a descriptor. Under a soft limit of 1,024 (systemd's default for services, and
    containerd 2's for containers) a worker with about a thousand connections open can take no more: new ones,
    health checks included, are reset, and an orchestrator restarts a worker that is only busy. The hard limit is
    the administrator's choice and stays; Go's runtime and nginx's `worker_rlimit_nofile` raise the soft one so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20  # Linux caps descriptors at fs.nr_open anyway
    if soft == resource.RLIM_INFINITY or soft >= target:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # a platform that refuses the value (macOS above OPEN_MAX): keep the soft limit
        return None
    return soft, target


def check_in_child(settings: Settings) -> str | None:
    """app.engine.engine.check in a spawned process: the supervisor that starts the workers then never imports ONNX
    Runtime or holds a model (about 50 MB less per replica), and a crash in the check is only an error."""
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(check, str(settings.model_dir), settings.verify_sha256).result()
    except Exception as exc:  # noqa: BLE001 - a broken child (say, a crash in a native library) is reported
        return f"could not check the model: {type(exc).__name__}: {exc}"


def run_workers(settings: Settings, factory: str) -> int:
    """uvicorn on `settings`' host, port and workers, each worker building its app with `factory` (a
    "module:function" path) on this service's HTTP protocol and event loop. The workers share a metrics directory
    and, with /admin/reload on, a model pointer; both are made here when not given, and removed after. `python -m
    app` serves the model with it, and `loadtest.floor` the same service around a model that does no work."""
    metrics_dir = None
    if given := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        try:
            prepare_metrics_dir(Path(given))
        except OSError as exc:
            print(f"error: PROMETHEUS_MULTIPROC_DIR={given}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    pointer_dir = None
    # A read-only root with no writable temporary directory (`docker run --read-only` without a tmpfs) had been a
    # traceback: one line instead, naming what to mount.
    try:
        if not given and settings.workers > 1:
            metrics_dir = tempfile.mkdtemp(prefix="intent-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        if settings.admin_key is not None and settings.model_pointer is None:
            # The file through which the workers follow a reload (app.http.reload); it starts empty.
            pointer_dir = tempfile.mkdtemp(prefix="intent-model-")
            os.environ["INTENT_MODEL_POINTER"] = os.path.join(pointer_dir, "pointer.json")
    except OSError as exc:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        print(
            f"error: no writable temporary directory ({tempfile.gettempdir()}: {exc.strerror or exc}); the workers "
            "share their metrics and reloads through one: mount a writable /tmp (an emptyDir, a tmpfs) or set TMPDIR",
            file=sys.stderr,
        )
        return 1
    # After a drained shutdown one uvicorn server (one worker) restores the signal handlers it found and raises the
    # signal again: the default SIGTERM handler then ended the process where it stood (exit -15), before the
    # `finally` below, leaving its temporary directories behind on every stop. Found here, the signal ends it as
    # the supervisor of several workers does: after the clean-up, with status 0.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, _stop)
    try:
        uvicorn.run(
            factory,
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            loop="uvloop",
            http=CoalescingHttpToolsProtocol,
            ws="none",  # no WebSocket routes: an Upgrade header is ignored, and the websockets package never loads
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=settings.graceful_timeout_s,
            backlog=2048,
        )
    finally:
        for made in (metrics_dir, pointer_dir):
            if made:
                shutil.rmtree(made, ignore_errors=True)
    return 0


def address_problem(host: str, port: int) -> str | None:
    """Why the service could not listen on `host`:`port`, found before the model's check and the workers: uvicorn
    said "[Errno -2] Name or service not known" or "address already in use" without naming either setting, and with
    one worker only after the model had loaded and logged `ready`."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        return f"invalid setting INTENT_HOST: {host!r} does not resolve ({exc})"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            return f"cannot listen on INTENT_HOST {host} INTENT_PORT {port}: {exc.strerror}"
    return None


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _hang_up(signum: int, frame: FrameType | None) -> None:
    signal.raise_signal(signal.SIGTERM)


def env_file_problem(path: Path) -> str | None:
    """What is wrong with the settings file (`.env`), if anything. python-dotenv skips a line it cannot parse with a
    warning, so the setting on it fell back to its default (an unclosed quote on INTENT_PORT served on 8000), and
    it raised a UnicodeDecodeError traceback on bytes that are not UTF-8."""
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return f"{path} is not UTF-8 text"
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror}"
    bad = next((binding.original.line for binding in parse_stream(io.StringIO(text)) if binding.error), None)
    return None if bad is None else f"{path}, line {bad}: not a NAME=value line (an unclosed quote?)"


def settings_or_error() -> Settings | str:
    """The settings from the environment, or the one line that says which setting is wrong and why."""
    env_file = Settings.model_config.get("env_file")
    if isinstance(env_file, str) and (problem := env_file_problem(Path(env_file))) is not None:
        return f"invalid settings file: {problem}"
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
        if not first["loc"]:  # a check of several settings together: its message names them
            return f"invalid settings: {message}"
        return f"invalid setting INTENT_{str(first['loc'][0]).upper()}: {message}"
    except SettingsError as exc:  # a list setting (INTENT_OPEN_PATHS, INTENT_CORS_ORIGINS) that is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"INTENT_{field.group(1).upper()}" if field else "a list setting"
        return f'invalid setting {name}: not JSON; write a list as ["a", "b"]'


def main() -> int:
    # A SIGTERM or SIGINT before the workers start waits for the model's check to end (a second one does not), and
    # then nothing starts. By default it had ended this process alone, and left the check's child (about 100 MB)
    # running without a parent; ended at once, mid-spawn, the child failed with tracebacks of its own.
    asked: list[int] = []

    def after_the_check(signum: int, frame: FrameType | None) -> None:
        if asked:
            raise SystemExit(0)
        asked.append(signum)

    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, after_the_check)
    # SIGHUP had ended a single worker at once (no drain, no log line, its temporary directories left behind), where
    # the supervisor of several workers, which replaces this handler, restarts them gracefully. Here it is a SIGTERM:
    # a drained stop, with exit 0, that a process manager restarts, as a hang-up (the terminal or session gone) also
    # means, rather than ignored, which would leave a service running that no one may be watching. Where it was
    # ignored when this process started (`nohup`), it stays ignored: that was asked for.
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _hang_up)
    settings = settings_or_error()
    if isinstance(settings, str):
        print(f"error: {settings}", file=sys.stderr)
        return 2
    if (problem := address_problem(settings.host, settings.port)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # Fail fast, before any port is bound, on a missing, tampered or inconsistent model.
    error = None if asked else check_in_child(settings)
    if asked:
        return 0
    if error is not None:
        print(f"error: {error}", file=sys.stderr)
        return 1
    configure_logging(settings.log_level)
    if (oversubscribed := settings.oversubscription()) is not None:
        logging.getLogger("app").warning(oversubscribed)  # once, here in the supervisor: not refused, but seen
    if (raised := raise_open_files_limit()) is not None:
        logging.getLogger("app").info("open files: soft limit raised", extra={"before": raised[0], "after": raised[1]})
    return run_workers(settings, APP_FACTORY)


if __name__ == "__main__":
    sys.exit(main())
