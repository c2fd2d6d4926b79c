"""The serving install alone (base dependencies, no torch) starts the app under uvicorn and answers."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import ROOT
from tests.servers import SERVE_PYTHON, get, post, running_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_serving_venv_has_no_training_stack() -> None:
    assert SERVE_PYTHON.exists(), "make test builds .venv-serve first"
    for module in ("torch", "transformers", "optuna"):
        r = subprocess.run([str(SERVE_PYTHON), "-c", f"import {module}"], capture_output=True, check=False)
        assert r.returncode != 0, f"{module} is importable in the serving venv"


def _threads_after(code: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    r = subprocess.run(
        [str(SERVE_PYTHON), "-c", f"{code}; print(open('/proc/self/status').read().split('Threads:')[1].split()[0])"],
        capture_output=True,
        text=True,
        check=True,
        env={**clean, **env},
        cwd=ROOT,
    )
    return int(r.stdout)


def test_a_serving_process_starts_no_blas_threads() -> None:
    """numpy's OpenBLAS starts a thread per core unless told otherwise; the app tells it one, as each worker is one
    thread, unless the environment already says."""
    assert _threads_after("import app, numpy") == 1
    if (os.cpu_count() or 1) > 1:
        assert _threads_after("import numpy") > 1  # what the app prevents
        assert _threads_after("import app, numpy", OPENBLAS_NUM_THREADS="2") == 2


def test_serve_answers_predict_and_metrics() -> None:
    with running_server() as (base, _):
        status, body = post(
            base + "/predict", {"text": "Hey, I'd like to rent a vehicle from Nov 1st to Nov 15th in Paris"}
        )
        assert status == 200
        assert body["intent"] == "car_rental"
        assert get(base + "/health")[0] == 200
        status, text = get(base + "/metrics")
        assert status == 200
        assert b"intent_stage_duration_seconds_bucket" in text
        status, card = get(base + "/model")
        assert json.loads(card)["spec"]["labels"]["count"] == len(json.loads(card)["labels"]) == 151


def test_two_workers_share_metrics() -> None:
    with running_server(env={"INTENT_WORKERS": "2"}) as (base, _):
        for _ in range(20):
            assert post(base + "/predict", {"text": "what's my balance"})[0] == 200
        status, text = get(base + "/metrics")
        assert status == 200, text[-500:]
        line = next(
            x
            for x in text.decode().splitlines()
            if x.startswith("intent_requests_total{") and 'route="/predict"' in x and 'status="200"' in x
        )
        assert float(line.rsplit(" ", 1)[1]) == 20.0


def _rehash(model) -> None:
    from app.engine.artifact import sha256_file

    card = json.loads((model / "card.json").read_text())
    for name in card["files"]:
        card["files"][name]["sha256"] = sha256_file(model / name)
        card["files"][name]["bytes"] = (model / name).stat().st_size
    (model / "card.json").write_text(json.dumps(card))


def _damage(model, how: str) -> None:
    if how == "tampered":
        (model / "labels.json").write_text((model / "labels.json").read_text().replace("oos", "ooz"))
    elif how == "missing":
        (model / "model.onnx").unlink()
    elif how == "truncated":
        data = (model / "model.onnx").read_bytes()
        (model / "model.onnx").write_bytes(data[: len(data) // 3])
        _rehash(model)
    elif how == "labels_mismatch":
        labels = json.loads((model / "labels.json").read_text())
        (model / "labels.json").write_text(json.dumps([x for x in labels if x != "balance"]))
        _rehash(model)
    elif how == "bad_tokenizer":
        (model / "tokenizer.json").write_text("{not a tokenizer")
        _rehash(model)
    elif how == "unknown_spec_field":
        card = json.loads((model / "card.json").read_text())
        card["spec"]["tokenizer"]["lowercase"] = True
        (model / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("tampered", "sha256 mismatch"),
        ("missing", "missing model file"),
        ("truncated", "unloadable model.onnx"),
        ("labels_mismatch", "the spec says 151 labels but labels.json has 150"),
        ("bad_tokenizer", "unreadable tokenizer.json"),
        ("unknown_spec_field", "card.json: spec.tokenizer.lowercase: Extra inputs are not permitted"),
    ],
)
def test_bad_model_fails_fast_with_one_line(tmp_path, damage: str, message: str) -> None:
    """`python -m app` refuses a broken artifact before binding the port: one line, exit 1."""
    import shutil

    from tests.servers import free_port

    model = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "clinc150", model)
    _damage(model, damage)
    port = free_port()
    env = {**os.environ, "INTENT_MODEL_DIR": str(model), "INTENT_PORT": str(port)}
    r = subprocess.run(
        [str(SERVE_PYTHON), "-m", "app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in r.stderr


EMPTY_KEY = "unset it to run without a key, or give a key"


@pytest.mark.parametrize(
    ("setting", "value", "line"),
    [
        (
            "INTENT_OPEN_PATHS",
            "/health",
            'error: invalid setting INTENT_OPEN_PATHS: not JSON; write a list as ["a", "b"]',
        ),
        (
            "INTENT_CORS_ORIGINS",
            "https://a.example",
            'error: invalid setting INTENT_CORS_ORIGINS: not JSON; write a list as ["a", "b"]',
        ),
        # The HTTP limits the protocol applies before the app (app.http.protocol).
        (
            "INTENT_READ_TIMEOUT_S",
            "0",
            "error: invalid setting INTENT_READ_TIMEOUT_S: Input should be greater than 0",
        ),
        (
            "INTENT_MAX_HEAD_BYTES",
            "100",
            "error: invalid setting INTENT_MAX_HEAD_BYTES: Input should be greater than or equal to 1024",
        ),
        # An empty API key read as "no key" (auth off); an empty admin key could not be sent.
        (
            "INTENT_API_KEY",
            "",
            "error: invalid setting INTENT_API_KEY: is empty: " + EMPTY_KEY,
        ),
        (
            "INTENT_ADMIN_KEY",
            " ",
            "error: invalid setting INTENT_ADMIN_KEY: is empty: " + EMPTY_KEY,
        ),
    ],
)
def test_a_bad_setting_fails_fast_with_one_line(setting: str, value: str, line: str) -> None:
    env = {**os.environ, setting: value}
    r = subprocess.run(
        [str(SERVE_PYTHON), "-m", "app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [line]


def test_an_address_the_service_cannot_listen_on_fails_fast_with_one_line() -> None:
    """Before the model's check: uvicorn had said "address already in use" or "Name or service not known" without
    naming the setting, and with one worker only after the model had loaded and logged `ready`."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (
                {"INTENT_HOST": "127.0.0.1", "INTENT_PORT": str(port)},
                f"error: cannot listen on INTENT_HOST 127.0.0.1 INTENT_PORT {port}: ",
            ),
            (
                {"INTENT_HOST": "nohost.invalid"},
                "error: invalid setting INTENT_HOST: 'nohost.invalid' does not resolve (",
            ),
        ]
        for settings, start in cases:
            r = subprocess.run(
                [str(SERVE_PYTHON), "-m", "app"],
                cwd=ROOT,
                env={**os.environ, "INTENT_WORKERS": "1", **settings},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert r.returncode == 2
            [line] = r.stderr.strip().splitlines()
            assert line.startswith(start), line
            assert '"ready"' not in r.stderr  # no worker started
