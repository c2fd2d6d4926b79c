"""Each stage's run record (run.json: config, metrics, versions, where it ran), written beside its output, and
the few other files one stage leaves for a later one."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "optuna", "tokenizers", "numpy")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


def ran_on() -> dict[str, Any]:
    """Where a stage ran: the CPU, and the GPU when torch used one (the factory runs on CPU by default)."""
    import sys

    from app.cpu import current

    where: dict[str, Any] = {"cpu": current().describe(), "device": "cpu"}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        where["device"] = f"cuda ({torch.cuda.get_device_name()})"
    return where


def write_run(directory: Path, stage: str, config: dict[str, Any], metrics: dict[str, Any], **extra: Any) -> Path:
    record = {
        "stage": stage,
        "ran_on": ran_on(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
        "config": config,
        "metrics": metrics,
        "versions": versions(),
        **extra,
    }
    path = directory / "run.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def read_run(directory: Path) -> dict[str, Any]:
    path = directory / "run.json"
    if not path.is_file():
        return {}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


# What the search stage leaves for the distill stage: {"alpha", "temperature", "lr"}.
BEST_PARAMS_FILE = "best_params.json"


def read_best_params(directory: Path) -> dict[str, float]:
    """The search's best alpha, temperature and lr; empty when the search did not run."""
    path = directory / BEST_PARAMS_FILE
    if not path.is_file():
        return {}
    params: dict[str, float] = json.loads(path.read_text())
    return params
