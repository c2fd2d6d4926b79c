"""Every module of the product imports. A module that names one removed since (`loadtest.batching` imported
`app.runtime` for a year of sessions after the serving engine replaced it) fails here, not when someone runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT
from tests.servers import SERVE_PYTHON

# Scripts that serve a baseline in a venv of their own (`make compare` builds them), not modules of the product.
OWN_VENV = ("loadtest.baselines.",)

IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException:
        failed.append(name + ": " + traceback.format_exc().strip().splitlines()[-1])
print("\\n".join(failed))
"""


def modules(*packages: str) -> list[str]:
    names = []
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__main__":  # runs its command line on import
                continue
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            if not name.startswith(OWN_VENV):
                names.append(name)
    return names


def failures(python: Path | str, names: list[str]) -> list[str]:
    r = subprocess.run(
        [str(python), "-c", IMPORT_EACH, *names], capture_output=True, text=True, check=False, cwd=ROOT, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return [line for line in r.stdout.splitlines() if line]


def test_every_module_imports_with_the_training_install() -> None:
    names = modules("app", "compression", "loadtest")
    assert {"app.engine.engine", "compression.stages.prune", "loadtest.batching"} <= set(names)
    assert failures(sys.executable, names) == []


def test_every_serving_module_imports_with_the_serving_install() -> None:
    """The service's own modules need nothing that the serving install (no torch) lacks."""
    assert SERVE_PYTHON.exists(), "make test builds .venv-serve first"
    assert failures(SERVE_PYTHON, modules("app")) == []


def test_a_module_that_imports_a_removed_one_is_reported() -> None:
    assert failures(sys.executable, ["json", "app.runtime"]) == [
        "app.runtime: ModuleNotFoundError: No module named 'app.runtime'"
    ]
