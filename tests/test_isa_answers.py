"""The served model's answers with AVX-512, VNNI and AMX hidden from ONNX Runtime (docs/avx2-emulation/): the
kernels an AVX2-only CPU runs, on whatever CPU runs the suite. On the VNNI machines most runs happen on, this is
how the suite sees those kernels at all: with int8 weights they gave 22 other answers of 5,350 (2026-12-05,
docs/one-small-model.md), which no test on a VNNI machine could see."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from tests.conftest import MODEL_DIR, ROOT

EMULATION = ROOT / "docs" / "avx2-emulation"


@pytest.fixture(scope="module")
def avx2_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A patched copy of this onnxruntime and the cpuid mask, and the environment that makes a child use them."""
    for tool in ("gcc", "objdump"):
        if shutil.which(tool) is None:
            pytest.skip(f"the AVX2 emulation needs {tool}, which is not installed")
    root = tmp_path_factory.mktemp("avx2")
    package = Path(ort.__file__).parent
    subprocess.run([sys.executable, str(EMULATION / "patch_cpuid.py"), str(package), str(root)], check=True)
    mask = root / "cpuid_mask.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", str(EMULATION / "cpuid_mask.c"), "-o", str(mask)], check=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(ROOT)]), "LD_PRELOAD": str(mask)}
    return root, env


def test_the_avx2_kernels_give_every_golden_answer(avx2_env: tuple[Path, dict[str, str]]) -> None:
    root, env = avx2_env
    child = subprocess.run(
        [sys.executable, "-m", "tests.golden.isa_probe"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert child.returncode == 0, child.stderr[-2000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    # The emulation took hold: the child ran the patched copy, and its int8 kernel saturates as an AVX2 CPU's does.
    assert Path(report["onnxruntime"]).is_relative_to(root)
    assert report["int8_exact"] is False
    assert report["uint8_exact"] is True
    # So the engine's own probe keeps the stored uint8 weights.
    assert report["signed_products_exact"] is False
    decisions = report["decisions"]
    golden = json.loads((ROOT / "tests" / "golden" / f"decisions-{decisions['model_version']}.json").read_text())
    assert decisions["model_version"] == json.loads((MODEL_DIR / "card.json").read_text())["version"]
    for name, expected in golden["pools"].items():
        got = decisions["pools"][name]
        assert got["intents"] == expected["intents"], name
        assert got["first_stage"] == expected["first_stage"], name


def test_where_int8_products_are_exact_the_flipped_graphs_give_the_stored_outputs_bit_for_bit(
    avx2_env: tuple[Path, dict[str, str]],
) -> None:
    """With AVX2 hidden as well, ONNX Runtime's SSE kernels multiply uint8 by int8 exactly, as VNNI does: the
    engine's probe says so, the engine loads the weights as int8, and every committed graph then gives the stored
    file's outputs, bit for bit, on 298 texts of the golden pools. This is the one exact int8 kernel a machine
    without VNNI can run; on a VNNI machine the suite's golden test checks the same through VNNI."""
    from app.engine.engine import WEIGHTS_SIGNED

    root, env = avx2_env
    child = subprocess.run(
        [sys.executable, "-m", "tests.golden.isa_probe", "outputs"],
        env={**env, "CPUID_MASK_SSE": "1"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert Path(report["onnxruntime"]).is_relative_to(root)
    assert (report["int8_exact"], report["uint8_exact"], report["signed_products_exact"]) == (True, True, True)
    assert report["flipped_outputs"] == {"weights": WEIGHTS_SIGNED, "static.onnx": [298, 298], "model.onnx": [298, 298]}
