from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "clinc150"
# Where `make test` found the data (CLINC_DATA, CLINC_WIKI), else the shared copy beside the repository.
SHARED = ROOT.parent / "shared" / "data" / "clinc150"
DATA = Path(os.environ.get("CLINC_DATA") or SHARED / "clinc150_plus_train_val.json").resolve()
WIKI = Path(os.environ.get("CLINC_WIKI") or SHARED / "wiki_sents.txt").resolve()


@pytest.fixture(scope="session")
def data_path() -> Path:
    assert DATA.is_file(), f"CLINC150 data missing at {DATA}; `make test` says where to put it"
    return DATA


@pytest.fixture(scope="session")
def validation(data_path: Path) -> tuple[list[str], list[str]]:
    raw = json.loads(data_path.read_text())
    rows = raw["val"] + raw["oos_val"]
    return [r[0] for r in rows], [r[1] for r in rows]


@pytest.fixture(scope="session")
def card() -> dict:
    return json.loads((MODEL_DIR / "card.json").read_text())


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A private copy of the committed artifact, for tests that damage it."""
    dest = tmp_path / "model"
    shutil.copytree(MODEL_DIR, dest)
    return dest


def linked_copy(dest: Path, version: str | None = None, skip: tuple[str, ...] = ()) -> Path:
    """The committed model at `dest`, under `version` if given, without the files named in `skip`. Model files
    are hard links where the filesystem allows (no space, no time): never write into one, it is the committed
    file. card.json is always written fresh, and report.md copied (a factory writes both)."""
    dest.mkdir(parents=True)
    for src in MODEL_DIR.iterdir():
        if src.name == "card.json" or src.name in skip:
            continue
        if src.name == "report.md":
            shutil.copy2(src, dest / src.name)
            continue
        try:
            os.link(src, dest / src.name)
        except OSError:
            shutil.copy2(src, dest / src.name)
    card = json.loads((MODEL_DIR / "card.json").read_text())
    if version is not None:
        card["version"] = version
    (dest / "card.json").write_text(json.dumps(card))
    return dest


def one_label_short(dest: Path) -> Path:
    """The committed model at `dest` with one intent dropped from its labels, the card's count and sha256 to
    match: every file checks out, so a load builds the sessions, and only their 151 logits against 150 labels
    refuse it."""
    from app.engine.artifact import sha256_file

    shutil.copytree(MODEL_DIR, dest)
    written = dest / "labels.json"
    labels = json.loads(written.read_text())
    labels.remove(next(label for label in labels if label != "oos"))
    written.write_text(json.dumps(labels))
    card = json.loads((dest / "card.json").read_text())
    card["spec"]["labels"]["count"] = len(labels)
    card["files"]["labels.json"] = {"sha256": sha256_file(written), "bytes": written.stat().st_size}
    (dest / "card.json").write_text(json.dumps(card))
    return dest


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """`python -m compression ARGS` in a child process, as a user runs it; its exit code and output to read."""
    return subprocess.run(
        [sys.executable, "-m", "compression", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
