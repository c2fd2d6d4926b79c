"""`python -m app`: check the model before binding the port, then run uvicorn."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from app.artifact import load_artifact
from app.config import Settings
from app.errors import ModelLoadError
from app.logs import configure_logging
from app.runtime import OnnxClassifier


def prepare_metrics_dir(directory: Path) -> None:
    """The workers' shared metrics directory, made if missing (an emptyDir or tmpfs at /tmp starts empty),
    and emptied of the files an earlier run of the service left there: prometheus_client sums every file
    it finds, so a restarted container would otherwise report its predecessor's counts as its own."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        print(f"error: invalid setting INTENT_{str(first['loc'][0]).upper()}: {first['msg']}", file=sys.stderr)
        return 2
    try:
        # Fail fast, before any port is bound, on a missing, tampered or inconsistent model.
        OnnxClassifier(load_artifact(settings.model_dir, settings.verify_sha256), 1, 1).close()
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    configure_logging(settings.log_level)
    metrics_dir = None
    if given := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        try:
            prepare_metrics_dir(Path(given))
        except OSError as exc:
            print(f"error: PROMETHEUS_MULTIPROC_DIR={given}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    elif settings.workers > 1:
        metrics_dir = tempfile.mkdtemp(prefix="intent-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    pointer_dir = None
    if settings.admin_key is not None and settings.model_pointer is None:
        # The file through which the workers follow a reload (app.reload); it starts empty.
        pointer_dir = tempfile.mkdtemp(prefix="intent-model-")
        os.environ["INTENT_MODEL_POINTER"] = os.path.join(pointer_dir, "pointer.json")
    try:
        uvicorn.run(
            "app.main:create_app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            loop="uvloop",
            http="httptools",
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


if __name__ == "__main__":
    sys.exit(main())
