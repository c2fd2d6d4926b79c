"""One settings object, read from INTENT_* environment variables (and an optional .env file)."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Literal

from dotenv import dotenv_values
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_SERVICE_LINK = re.compile(r"INTENT_(SERVICE_HOST|SERVICE_PORT\w*|PORT_\d+_(TCP|UDP|SCTP)\w*)")
KEEP_WARM_MS_MAX = 60_000  # a minute; the load tests' --keep-warm-ms takes the same range
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "clinc150"
# What a key may hold: visible ASCII, as an Authorization header carries it (RFC 9110 5.5, 11.4).
_KEY = re.compile(r"[!-~]+")


def batch_body_bytes(max_batch: int, max_text_chars: int) -> int:
    """The body of the largest batch INTENT_MAX_BATCH and INTENT_MAX_TEXT_CHARS allow, as json.dumps writes it by
    default (Python's requests sends so): each character a \\uXXXX escape (6 bytes; a character outside the BMP
    takes two), each text in quotes and followed by ", ", and 64 bytes for the rest (`{"texts": [...],
    "top_k": 10}`)."""
    return max_batch * (6 * max_text_chars + 4) + 64


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INTENT_", env_file=".env", extra="ignore")

    model_dir: Path = Field(
        DEFAULT_MODEL_DIR, description="directory holding the artifact (model.onnx, card.json, ...)"
    )
    model_root: Path | None = Field(
        None,
        description="if set, INTENT_MODEL_DIR and every directory /admin/reload loads must lie under it "
        "(after resolving symlinks); unset: any directory",
    )
    verify_sha256: bool = Field(True, description="check every artifact file against card.json at start-up")

    # Not empty: uvicorn reads "" as every interface, which an unset template variable would open up.
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(0, ge=0, description="uvicorn worker processes; 0 means one per CPU core")
    ort_intra_threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per worker")
    ort_inter_threads: int = Field(1, ge=1)
    inference_mode: Literal["inline", "thread"] = Field(
        "inline", description="run session.run on the event loop (inline) or on a one-thread executor"
    )

    keep_warm_ms: float = Field(
        0.0,
        ge=0,
        le=KEEP_WARM_MS_MAX,
        description="inline mode: after this long idle, run throw-away queries through every stage in an "
        "idle-priority thread, to keep caches warm (0: off)",
    )

    max_text_chars: int = Field(1000, ge=1)
    max_batch: int = Field(64, ge=1)
    max_top_k: int = Field(10, ge=1)
    # Holds the largest batch the other defaults allow, escaped (batch_body_bytes: 384,320 bytes): at 256 KiB, 64
    # texts of 1,000 CJK characters sent by Python's requests had been refused 413.
    max_body_bytes: int = Field(512 * 1024, ge=1024)
    max_head_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="request line and headers; beyond this, 431 (nginx, HAProxy, Node: 8-64 KiB). The URL and header "
        "lines count, method, version and blank line aside (app.http.protocol)",
    )
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="a request, head and body, must arrive whole within this long of the connection opening or of "
        "its first byte; else 408 (HAProxy suggests 10 s for its head)",
    )
    keepalive_requests: int = Field(
        1000,
        ge=0,
        description="the answer to a connection's Nth request says Connection: close (nginx's keepalive_requests), "
        "so that a client's connections are placed on the workers again (app.http.protocol); 0: no limit",
    )
    max_queue: int = Field(64, ge=1, description="requests admitted per worker; beyond this, 429 at once")
    retry_after_s: int = Field(1, ge=1, le=3600)

    api_key: SecretStr | None = Field(None, description="if set, require 'Authorization: Bearer <key>'")
    open_paths: list[str] = Field(default_factory=lambda: ["/health", "/ready", "/metrics"])
    admin_key: SecretStr | None = Field(
        None, description="enables POST /admin/reload, which needs 'Authorization: Bearer <key>'; off if unset"
    )
    model_pointer: Path | None = Field(
        None, description="file through which workers follow a reload (python -m app sets it for its workers)"
    )
    reload_poll_s: float = Field(0.5, gt=0, le=10, description="how often workers look at model_pointer")
    reload_retry_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="a worker tries a pointer that failed to load again after this long, twice as long after each "
        "further failure, up to 8 times as long",
    )
    cors_origins: list[str] = Field(default_factory=list, description="CORS off unless origins are listed")

    opentelemetry: bool = Field(
        False, description="FastAPI's native OpenTelemetry spans and metrics; off skips its per-request provider check"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    warmup_queries: int = Field(20, ge=0, le=10_000)
    graceful_timeout_s: int = Field(20, ge=0, le=3600, description="longest wait for in-flight requests at shutdown")
    # Bounded: at `inf` (accepted before) a SIGTERM never ended the service.
    shutdown_delay_s: float = Field(
        2.0,
        ge=0,
        le=300,
        description="after SIGTERM, answer /ready 503 and keep serving this long before closing listeners",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_any_case(cls, value: object) -> object:
        # Python's logging and uvicorn spell levels in upper case, and INFO had stopped start-up. Only the case
        # folds: " info" is still refused.
        return value.lower() if isinstance(value, str) else value

    @field_validator("model_dir", "model_root", "model_pointer", mode="before")
    @classmethod
    def _path_not_empty(cls, value: object) -> object:
        # An empty variable (an unset template value) read as the current directory.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty: unset it for the default, or name a path")
        return value

    @field_validator("api_key", "admin_key")
    @classmethod
    def _key_not_empty(cls, key: SecretStr | None) -> SecretStr | None:
        # An empty API key read as "no key" (authentication off), and an empty admin key turned /admin/reload on
        # with a key no client can send: refused, so that a key variable set from a missing secret stops start-up.
        if key is None:
            return None
        value = key.get_secret_value()
        if not value.strip():
            raise ValueError("is empty: unset it to run without a key, or give a key")
        # Taken as it is, a key read from a secret file with its final newline never matched what a client sends:
        # every request 401. The key is not echoed.
        if value != value.strip():
            raise ValueError("has leading or trailing whitespace (a file's final newline?): remove it")
        if not _KEY.fullmatch(value):
            raise ValueError("holds a character that is not visible ASCII, which no Authorization header carries")
        return key

    @field_validator("model_root")
    @classmethod
    def _model_dir_under_root(cls, root: Path | None, info: ValidationInfo) -> Path | None:
        model_dir = info.data.get("model_dir")  # absent only if it failed its own validation
        if root is not None and model_dir is not None and not within_root(model_dir, root):
            raise ValueError(f"INTENT_MODEL_DIR {model_dir} is outside INTENT_MODEL_ROOT {root}")
        return root

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> Settings:
        # A mistyped setting (INTENT_MAX_QUEU) was ignored, and its default served in silence. Kubernetes' service
        # links for a Service named "intent" (INTENT_SERVICE_HOST, INTENT_PORT_8000_TCP...) are not settings.
        # The settings file's names too: a typo there had been ignored as well.
        known = {f"INTENT_{name.upper()}" for name in type(self).model_fields}
        env_file = self.model_config.get("env_file")
        files = [env_file] if isinstance(env_file, str | Path) else list(env_file or ())
        sources = [(sorted(os.environ), "", "unset it")]
        sources += [(list(dotenv_values(f)), f" in {f}", "remove it") for f in files if Path(f).is_file()]
        for variables, where, fix in sources:
            for variable in variables:
                name = variable.upper()
                if name.startswith("INTENT_") and name not in known and not _SERVICE_LINK.fullmatch(name):
                    near = difflib.get_close_matches(name, sorted(known), n=1)
                    hint = f" (did you mean {near[0]}?)" if near else ""
                    raise ValueError(
                        f"{variable}{where} is not a setting{hint}; {fix}, or see the README's Configuration"
                    )
        return self

    @model_validator(mode="after")
    def _batch_fits_queue(self) -> Settings:
        # Each text of a batch takes a place in the queue, so a batch over INTENT_MAX_QUEUE would get 429 and a
        # Retry-After for ever, on an idle worker too.
        if self.max_batch > self.max_queue:
            raise ValueError(
                f"INTENT_MAX_BATCH {self.max_batch} is over INTENT_MAX_QUEUE {self.max_queue}: a batch that large "
                "could never be admitted; lower the one or raise the other"
            )
        return self

    @model_validator(mode="after")
    def _batch_fits_body(self) -> Settings:
        # A batch within INTENT_MAX_BATCH and INTENT_MAX_TEXT_CHARS, sent as JSON with escapes, had been refused 413.
        need = batch_body_bytes(self.max_batch, self.max_text_chars)
        if self.max_body_bytes < need:
            raise ValueError(
                f"INTENT_MAX_BODY_BYTES {self.max_body_bytes} is under the {need} bytes of the largest batch "
                f"(INTENT_MAX_BATCH {self.max_batch} x INTENT_MAX_TEXT_CHARS {self.max_text_chars}, as JSON "
                "escapes): raise it, or lower either"
            )
        return self

    @model_validator(mode="after")
    def _cores(self) -> Settings:
        if self.workers == 0:
            self.workers = max(1, effective_cpus() // self.ort_intra_threads)
        return self

    def oversubscription(self) -> str | None:
        """The one-line warning for start-up's log when the workers' intra-op threads outnumber the CPUs this
        process may use (each thread then waits for a core, and latency collapses), else None. Not refused: an
        operator may oversubscribe on purpose."""
        cpus = effective_cpus()
        threads = self.workers * self.ort_intra_threads
        if threads <= cpus:
            return None
        return (
            f"INTENT_WORKERS {self.workers} x INTENT_ORT_INTRA_THREADS {self.ort_intra_threads} is {threads} threads "
            f"on {cpus} CPUs: each waits for a core and latency rises; lower either, or unset INTENT_WORKERS for one "
            "worker per core"
        )


def within_root(path: Path, root: Path | None) -> bool:
    """Whether `path` lies under `root` once both are resolved (symlinks followed, `..` collapsed, the path
    need not exist); always true without a root. Relative paths resolve against the working directory, as
    the model loader reads them. ValueError when either cannot be resolved (a symlink loop)."""
    if root is None:
        return True
    return _resolved(path).is_relative_to(_resolved(root))


def _resolved(path: Path) -> Path:
    try:
        return path.resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # RuntimeError: a symlink loop, before Python 3.13
        raise ValueError(f"{path} cannot be resolved: {exc}") from None


def effective_cpus() -> int:
    """CPUs this process may use: the cgroup quota in a container, else the affinity mask."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            return max(1, int(int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return len(os.sched_getaffinity(0))
