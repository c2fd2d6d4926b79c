"""POST /admin/reload: a new model swapped in without a restart, in every worker, and a bad one refused."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app import heap
from app.config import Settings
from app.engine import onnx
from app.http.main import create_app
from app.http.reload import Pointer, read_pointer, write_pointer
from loadtest.driver import closed_loop
from loadtest.queries import BUILTIN
from tests.conftest import MODEL_DIR, ROOT, linked_copy, one_label_short
from tests.fakes import FakeClassifier, fake_factory
from tests.servers import get, post, running_server

KEY = "s3cret-admin"
AUTH = {"authorization": f"Bearer {KEY}"}


def new_version(tmp_path: Path, version: str = "2026.12.01-rollout") -> Path:
    """The committed model under another version: card.json is not hashed, the model files are the same."""
    dest = tmp_path / version
    shutil.copytree(MODEL_DIR, dest)
    card = json.loads((dest / "card.json").read_text())
    card["version"] = version
    (dest / "card.json").write_text(json.dumps(card))
    return dest


def tampered(tmp_path: Path) -> Path:
    dest = tmp_path / "tampered"
    shutil.copytree(MODEL_DIR, dest)
    with (dest / "static.onnx").open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    return dest


def settings(tmp_path: Path, **kw: object) -> Settings:
    kw = {"model_dir": MODEL_DIR, "model_pointer": tmp_path / "ptr.json", **kw}
    return Settings(warmup_queries=2, admin_key=KEY, **kw)  # type: ignore[arg-type]


def version_of(client: TestClient) -> str:
    r = client.post("/predict", json={"text": "what is my account balance"})
    assert r.status_code == 200
    return str(r.json()["model_version"])


def test_admin_routes_are_off_without_a_key() -> None:
    with TestClient(create_app(Settings(model_dir=MODEL_DIR, warmup_queries=0))) as client:
        r = client.post("/admin/reload", json={}, headers=AUTH)
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "not_found"


def test_reload_needs_the_admin_key(tmp_path: Path) -> None:
    with TestClient(create_app(settings(tmp_path, api_key="user-key"))) as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Bearer user-key"}):
            r = client.post("/admin/reload", json={}, headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "unauthorized"
        # The user key still guards /predict; the admin route takes only its own key.
        assert client.post("/predict", json={"text": "hi"}).status_code == 401
        # Checked before the body is read: without the key a client is told so, not about its body (it had got 415
        # or 413 first, and could make the service read up to INTENT_MAX_BODY_BYTES).
        for extra in ({"content-encoding": "gzip"}, {"content-length": str(10**9)}):
            r = client.post("/admin/reload", content=b"{}", headers={"content-type": "application/json", **extra})
            assert (r.status_code, r.json()["error"]) == (
                401,
                {"type": "unauthorized", "message": "admin routes need 'Authorization: Bearer <INTENT_ADMIN_KEY>'"},
            )
            assert r.headers["www-authenticate"] == "Bearer"


def test_reload_swaps_in_a_new_version_and_points_the_other_workers_at_it(tmp_path: Path) -> None:
    target = new_version(tmp_path)
    with TestClient(create_app(settings(tmp_path))) as client:
        old = version_of(client)
        r = client.post("/admin/reload", json={"model_dir": str(target)}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json() == {"model_version": "2026.12.01-rollout", "previous_version": old, "model_dir": str(target)}
        assert version_of(client) == "2026.12.01-rollout"
        batch = client.post("/predict/batch", json={"texts": ["book a flight", "tell me a joke"]})
        assert batch.json()["model_version"] == "2026.12.01-rollout"
        assert client.get("/model").json()["version"] == "2026.12.01-rollout"
        assert read_pointer(tmp_path / "ptr.json") == Pointer(str(target), "2026.12.01-rollout")
        metrics = client.get("/metrics").text
        assert re.search(r'intent_model_reloads_total\{result="ok"\} 1\.0', metrics)
        assert re.search(r'intent_model_info\{[^}]*version="2026\.12\.01-rollout"[^}]*\} 1\.0', metrics)
        assert f'version="{old}"' not in metrics  # an info metric's series goes with the version it names
        # No body: back to INTENT_MODEL_DIR.
        r = client.post("/admin/reload", headers=AUTH)
        assert r.status_code == 200
        assert r.json()["model_version"] == old


def test_a_replaced_model_is_freed_and_its_memory_given_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Until 2026-12-06 the lifespan held the model it loaded for the worker's whole life, so after a reload a
    worker held two models, and glibc kept what each later reload freed: `python -m app`'s two workers grew
    from 302 to 466 MB of PSS over eight reloads. The slot alone holds the model now, and the C heap is trimmed
    once after the start-up load and once after each replaced model is freed (app.heap)."""
    target = new_version(tmp_path)
    refs: list[weakref.ref[object]] = []
    calls: list[list[bool]] = []  # at each call: which of the models in `refs` were already freed
    monkeypatch.setattr(heap, "return_free_memory", lambda: calls.append([r() is None for r in refs]) or True)
    # The service's loads leave the int8 swap's released session to these trims (app.http.serving), where a load
    # outside it trims after each swap (tests/test_heap.py). Forced on, so that every CPU tries the swap here.
    monkeypatch.setattr(onnx, "signed_products_exact", lambda: True)
    with TestClient(create_app(settings(tmp_path))) as client:
        assert calls == [[]]  # after the start-up load
        refs.append(weakref.ref(client.app.state.slot.served.model))
        r = client.post("/admin/reload", json={"model_dir": str(target)}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert version_of(client) == "2026.12.01-rollout"  # the loop has run what the release scheduled
        assert calls == [[], [True]]
        refs.append(weakref.ref(client.app.state.slot.served.model))
        assert client.post("/admin/reload", headers=AUTH).status_code == 200
        assert version_of(client) != "2026.12.01-rollout"
        assert calls == [[], [True], [True, True]]
        # Reloading the directory served already still loads a new model, and frees the one it replaces.
        refs.append(weakref.ref(client.app.state.slot.served.model))
        assert client.post("/admin/reload", headers=AUTH).status_code == 200
        version_of(client)
        assert calls[-1] == [True, True, True]


def test_a_model_still_answering_a_request_is_freed_after_that_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch in flight keeps the model it started on (the queue reads the slot once per job): the memory is
    given back after its last text is answered, not at the swap."""
    models: list[weakref.ref[FakeClassifier]] = []  # weak: the test must not be what keeps a model alive

    def factory(s: Settings) -> tuple[FakeClassifier, dict[str, object]]:
        clf = FakeClassifier(delay_s=0.05)
        clf.version = f"fake-{len(models) + 1}"
        models.append(weakref.ref(clf))
        return fake_factory(clf)(s)

    def answered_by_first() -> int:
        first = models[0]()
        assert first is not None
        return first.calls

    calls: list[bool] = []  # at each call: whether the first model was already freed
    monkeypatch.setattr(heap, "return_free_memory", lambda: calls.append(models[0]() is None) or True)
    texts = [f"book a flight {i}" for i in range(60)]  # 3 s of answers: time enough for the reload
    with TestClient(create_app(settings(tmp_path, inference_mode="thread"), factory)) as client:
        assert calls == [False]  # after the start-up load
        warm_up = answered_by_first()  # its warm-up queries
        batch: dict[str, object] = {}

        def send_batch() -> None:
            batch.update(client.post("/predict/batch", json={"texts": texts}).json())

        worker = threading.Thread(target=send_batch)
        worker.start()
        deadline = time.monotonic() + 60
        while answered_by_first() == warm_up:  # the batch has started on the first model
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = client.post("/admin/reload", headers=AUTH)
        assert (r.status_code, r.json()["model_version"]) == (200, "fake-2")
        assert answered_by_first() < warm_up + len(texts)  # still answering
        assert calls == [False]  # so nothing is given back yet
        worker.join(60)
        assert batch["model_version"] == "fake-1"
        assert client.post("/predict", json={"text": "book a flight"}).json()["model_version"] == "fake-2"
        assert calls == [False, True]


@pytest.fixture
def no_garbage_collector() -> Iterator[None]:
    """Only reference counts free objects: what a reference cycle holds stays, as it may until the collector runs."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_garbage_collector")
def test_a_model_refused_after_loading_is_freed_and_its_memory_given_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model refused once its sessions are built used to leave them in glibc's free lists until the next trim
    (a later reload, or never): as much as a replaced model (app.heap). The refusal now trims, after they are freed.
    Freed by reference counts: the load error's traceback and the future that carried it formed a cycle, and the
    model went only when the garbage collector next ran (after the trim, in about half the runs of this file)."""
    target = one_label_short(tmp_path / "one-label-short")
    sessions: list[weakref.ref[onnx.OnnxModel]] = []
    built = onnx.OnnxModel.__init__

    def track(self: onnx.OnnxModel, *args: object, **kwargs: object) -> None:
        built(self, *args, **kwargs)  # type: ignore[arg-type]
        sessions.append(weakref.ref(self))

    calls: list[list[bool]] = []  # at each trim: which of the sessions built so far were already freed
    monkeypatch.setattr(heap, "return_free_memory", lambda: calls.append([r() is None for r in sessions]) or True)
    monkeypatch.setattr(onnx.OnnxModel, "__init__", track)
    with TestClient(create_app(settings(tmp_path))) as client:
        old = version_of(client)
        assert calls == [[False, False]]  # after the start-up load: the served model's two stages
        r = client.post("/admin/reload", json={"model_dir": str(target)}, headers=AUTH)
        assert r.status_code == 422
        assert r.json()["error"]["type"] == "model_rejected"
        assert "static.onnx outputs 151 logits but there are 150 labels" in r.json()["error"]["message"]
        # The refused model's two sessions were built, and both were freed before the one trim; the served ones live.
        assert calls == [[False, False], [False, False, True, True]]
        assert version_of(client) == old


@pytest.mark.parametrize("kind", ["tampered", "missing", "not a model"])
def test_a_bad_model_is_refused_and_the_old_one_keeps_serving(tmp_path: Path, kind: str) -> None:
    target = {
        "tampered": lambda: tampered(tmp_path),
        "missing": lambda: tmp_path / "nowhere",
        "not a model": lambda: tmp_path,
    }[kind]()
    with TestClient(create_app(settings(tmp_path))) as client:
        old = version_of(client)
        r = client.post("/admin/reload", json={"model_dir": str(target)}, headers=AUTH)
        assert r.status_code == 422
        body = r.json()["error"]
        assert body["type"] == "model_rejected"
        assert str(target) in body["message"]
        assert version_of(client) == old
        assert read_pointer(tmp_path / "ptr.json") is None
        assert re.search(r'intent_model_reloads_total\{result="rejected"\} 1\.0', client.get("/metrics").text)


def test_a_card_with_an_unknown_spec_field_is_refused_and_the_old_model_keeps_answering(tmp_path: Path) -> None:
    target = new_version(tmp_path)
    card = json.loads((target / "card.json").read_text())
    card["spec"]["rule"]["margin"] = 0.5  # one field the spec does not know
    (target / "card.json").write_text(json.dumps(card))
    with TestClient(create_app(settings(tmp_path))) as client:
        old = version_of(client)
        r = client.post("/admin/reload", json={"model_dir": str(target)}, headers=AUTH)
        assert r.status_code == 422
        assert r.json()["error"]["type"] == "model_rejected"
        assert "spec.rule.energy_knn.margin: Extra inputs are not permitted" in r.json()["error"]["message"]
        answer = client.post("/predict", json={"text": "what is my checking balance"})
        assert (answer.status_code, answer.json()["intent"], answer.json()["model_version"]) == (200, "balance", old)


def test_malformed_reload_bodies_get_clear_errors(tmp_path: Path) -> None:
    with TestClient(create_app(settings(tmp_path))) as client:
        r = client.post("/admin/reload", content=b"{nope", headers={**AUTH, "content-type": "application/json"})
        assert (r.status_code, r.json()["error"]["type"]) == (400, "invalid_json")
        r = client.post("/admin/reload", json={"model_dir": "x", "extra": 1}, headers=AUTH)
        assert (r.status_code, r.json()["error"]["type"]) == (422, "validation_error")


def test_a_worker_follows_the_pointer_another_worker_wrote(tmp_path: Path) -> None:
    target = new_version(tmp_path)
    with TestClient(create_app(settings(tmp_path, reload_poll_s=0.05))) as client:
        write_pointer(tmp_path / "ptr.json", Pointer(str(target), "2026.12.01-rollout"))
        deadline = time.monotonic() + 60  # only catches a hang: a loaded machine loads slowly
        while version_of(client) != "2026.12.01-rollout":
            assert time.monotonic() < deadline, "the worker did not follow the pointer"
            time.sleep(0.05)
    # A worker that starts after the reload serves the pointer's model, not INTENT_MODEL_DIR.
    with TestClient(create_app(settings(tmp_path))) as client:
        assert version_of(client) == "2026.12.01-rollout"


@pytest.mark.integration
@pytest.mark.slow
def test_rollout_under_load_in_every_worker(tmp_path: Path) -> None:
    """Two workers under continuous load: the reload answers 200, no request fails, and soon after every
    response carries the new version; a tampered copy is refused while the new model keeps answering."""
    target = new_version(tmp_path)
    env = {"INTENT_WORKERS": "2", "INTENT_ADMIN_KEY": KEY}
    with running_server(env=env) as (base, _):
        old = json.loads(get(base + "/model")[1])["version"]
        result: dict[str, object] = {}

        def call_reload() -> None:
            req = urllib.request.Request(
                base + "/admin/reload",
                json.dumps({"model_dir": str(target)}).encode(),
                {"content-type": "application/json", **AUTH},
            )
            with urllib.request.urlopen(req, timeout=60) as r:
                result["status"], result["body"] = r.status, json.loads(r.read())

        async def scenario() -> object:
            load = asyncio.create_task(closed_loop(base, 6.0, list(BUILTIN), connections=4))
            await asyncio.sleep(1.0)
            await asyncio.to_thread(call_reload)
            return await load

        report = asyncio.run(scenario())
        assert result["status"] == 200
        assert result["body"] == {
            "model_version": "2026.12.01-rollout",
            "previous_version": old,
            "model_dir": str(target),
        }
        assert report.lost == 0
        assert report.connect_errors == 0
        assert report.classes() == {"200": len(report.results)}
        # The other worker follows within a poll and a load (about a second on a quiet machine); the deadline
        # only catches one that never does. Fresh connections, so both workers answer some of them.
        deadline = time.monotonic() + 60
        while True:
            versions = {
                post(base + "/predict", {"text": f"what is my balance {i}"})[1]["model_version"] for i in range(40)
            }
            if versions == {"2026.12.01-rollout"}:
                break
            assert time.monotonic() < deadline, f"still serving {versions} after 60 s"
            time.sleep(0.2)
        assert post(base + "/admin/reload", {"model_dir": str(tampered(tmp_path))})[0] == 401  # no key
        req = urllib.request.Request(
            base + "/admin/reload",
            json.dumps({"model_dir": str(tmp_path / "tampered")}).encode(),
            {"content-type": "application/json", **AUTH},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=60)
        assert refused.value.code == 422
        assert json.loads(refused.value.read())["error"]["type"] == "model_rejected"
        assert post(base + "/predict", {"text": "book a flight"})[1]["model_version"] == "2026.12.01-rollout"


def test_concurrent_reloads_in_one_worker_run_one_at_a_time(tmp_path: Path) -> None:
    a, b = new_version(tmp_path, "va"), new_version(tmp_path, "vb")
    with TestClient(create_app(settings(tmp_path))) as client:
        codes: list[int] = []

        def call(target: Path) -> None:
            codes.append(client.post("/admin/reload", json={"model_dir": str(target)}, headers=AUTH).status_code)

        threads = [threading.Thread(target=call, args=(t,)) for t in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == [200, 200]
        final = version_of(client)
        assert final in {"va", "vb"}
        assert read_pointer(tmp_path / "ptr.json") == Pointer(str(tmp_path / final), final)


# INTENT_MODEL_ROOT: reloads only from under one directory.


def rooted(tmp_path: Path, **kw: object) -> Settings:
    """A service serving a copy of the committed model from under tmp_path/models, with that as the root."""
    root = tmp_path / "models"
    current = root / "current"
    if not current.exists():
        linked_copy(current)
    return settings(tmp_path, model_dir=current, model_root=root, **kw)


@pytest.mark.parametrize("where", ["dotdot", "absolute", "symlink"])
def test_a_model_dir_outside_the_root_is_forbidden(tmp_path: Path, where: str) -> None:
    outside = linked_copy(tmp_path / "outside", "9999.outside")  # a good model: only the root refuses it
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "link").symlink_to(outside, target_is_directory=True)
    target = {
        "dotdot": str(tmp_path / "models" / ".." / "outside"),
        "absolute": "/etc",
        "symlink": str(tmp_path / "models" / "link"),
    }[where]
    with TestClient(create_app(rooted(tmp_path))) as client:
        old = version_of(client)
        r = client.post("/admin/reload", json={"model_dir": target}, headers=AUTH)
        assert r.status_code == 403, r.text
        assert r.json() == {
            "error": {"type": "forbidden", "message": f"model_dir {target} is outside INTENT_MODEL_ROOT"}
        }
        assert version_of(client) == old
        assert client.get("/model").json()["version"] == old
        assert read_pointer(tmp_path / "ptr.json") is None
        assert re.search(r'intent_model_reloads_total\{result="rejected"\} 1\.0', client.get("/metrics").text)


def test_a_symlink_loop_is_rejected_not_an_internal_error(tmp_path: Path) -> None:
    """Resolving it raises (RuntimeError before Python 3.13); that was a 500, and is a 422 that names it."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "loop1").symlink_to(tmp_path / "models" / "loop2")
    (tmp_path / "models" / "loop2").symlink_to(tmp_path / "models" / "loop1")
    target = str(tmp_path / "models" / "loop1")
    with TestClient(create_app(rooted(tmp_path))) as client:
        old = version_of(client)
        r = client.post("/admin/reload", json={"model_dir": target}, headers=AUTH)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["type"] == "model_rejected"
        assert r.json()["error"]["message"].startswith(f"{target} cannot be resolved: ")
        assert version_of(client) == old
        assert re.search(r'intent_model_reloads_total\{result="rejected"\} 1\.0', client.get("/metrics").text)
    with pytest.raises(ValidationError, match=r"cannot be resolved"):
        Settings(model_dir=tmp_path / "models" / "loop1", model_root=tmp_path / "models")


def test_a_model_dir_inside_the_root_reloads(tmp_path: Path) -> None:
    target = linked_copy(tmp_path / "models" / "releases" / ".." / "v2", "2026.12.01-rooted")
    with TestClient(create_app(rooted(tmp_path))) as client:
        r = client.post("/admin/reload", json={"model_dir": str(target)}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "2026.12.01-rooted"
        assert version_of(client) == "2026.12.01-rooted"


def test_without_a_root_any_directory_reloads(tmp_path: Path) -> None:
    target = linked_copy(tmp_path / "anywhere" / "else", "2026.12.01-unrooted")
    assert settings(tmp_path).model_root is None  # the default
    with TestClient(create_app(settings(tmp_path))) as client:
        r = client.post("/admin/reload", json={"model_dir": str(target)}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert version_of(client) == "2026.12.01-unrooted"


def test_start_up_refuses_a_model_dir_outside_the_root(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"INTENT_MODEL_DIR \S+ is outside INTENT_MODEL_ROOT"):
        Settings(model_dir=MODEL_DIR, model_root=tmp_path)
    # Symlinks are resolved at start-up too: a link under the root to the committed model is outside.
    (tmp_path / "link").symlink_to(MODEL_DIR, target_is_directory=True)
    with pytest.raises(ValidationError, match="outside INTENT_MODEL_ROOT"):
        Settings(model_dir=tmp_path / "link", model_root=tmp_path)
    assert Settings(model_dir=MODEL_DIR, model_root=MODEL_DIR.parent).model_root == MODEL_DIR.parent
    # `python -m app`: one line on stderr, before anything is loaded or bound.
    env = {**os.environ, "INTENT_MODEL_DIR": str(MODEL_DIR), "INTENT_MODEL_ROOT": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-m", "app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: invalid setting INTENT_MODEL_ROOT: INTENT_MODEL_DIR {MODEL_DIR} is outside "
        f"INTENT_MODEL_ROOT {tmp_path}"
    ]


def test_a_worker_does_not_follow_a_pointer_outside_the_root(tmp_path: Path) -> None:
    outside = linked_copy(tmp_path / "outside", "9999.outside")
    inside = linked_copy(tmp_path / "models" / "v2", "2026.12.01-rooted")
    with TestClient(create_app(rooted(tmp_path, reload_poll_s=0.05))) as client:
        old = version_of(client)
        write_pointer(tmp_path / "ptr.json", Pointer(str(outside), "9999.outside"))
        # Then a good one: once the worker serves it, it has certainly seen (and refused) the first.
        deadline = time.monotonic() + 60
        while not re.search(r'intent_model_reloads_total\{result="rejected"\} 1\.0', client.get("/metrics").text):
            assert time.monotonic() < deadline, "the worker never looked at the pointer"
            time.sleep(0.05)
        assert version_of(client) == old
        write_pointer(tmp_path / "ptr.json", Pointer(str(inside), "2026.12.01-rooted"))
        while version_of(client) != "2026.12.01-rooted":
            assert time.monotonic() < deadline, "the worker did not follow the good pointer"
            time.sleep(0.05)
    # A worker that starts with a pointer outside the root serves INTENT_MODEL_DIR instead.
    write_pointer(tmp_path / "ptr.json", Pointer(str(outside), "9999.outside"))
    with TestClient(create_app(rooted(tmp_path))) as client:
        assert version_of(client) == old


def test_a_worker_ends_on_the_pointers_model_when_two_reloads_pass_between_its_polls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This worker reloads B and publishes it, and another worker's reload of A lands before this one next looks:
    the pointer reads A, as it did when this worker started. Compared with the pointer it saw last, the worker had
    stayed on B for good while every other served A."""
    import app.http.reload as reload_module

    first = version_of_dir(MODEL_DIR)
    write_pointer(tmp_path / "ptr.json", Pointer(str(MODEL_DIR), first))
    target = new_version(tmp_path)
    published = reload_module.write_pointer

    def and_then_another_workers(path: Path, pointer: Pointer) -> None:
        published(path, pointer)
        published(path, Pointer(str(MODEL_DIR), first))

    monkeypatch.setattr(reload_module, "write_pointer", and_then_another_workers)
    with TestClient(create_app(settings(tmp_path, reload_poll_s=0.05))) as client:
        r = client.post("/admin/reload", json={"model_dir": str(target)}, headers=AUTH)
        assert (r.status_code, r.json()["model_version"]) == (200, "2026.12.01-rollout")
        deadline = time.monotonic() + 60  # only catches a hang: a loaded machine loads slowly
        while version_of(client) != first:
            assert time.monotonic() < deadline, "the worker stayed on the model the pointer no longer names"
            time.sleep(0.05)


def version_of_dir(directory: Path) -> str:
    return str(json.loads((directory / "card.json").read_text())["version"])


def test_a_reload_that_cannot_tell_the_other_workers_changes_nothing(tmp_path: Path) -> None:
    """The pointer's directory is gone (a /tmp cleaner, say): the reload had swapped this worker's model and then
    answered 500, leaving it on a model no other worker served."""
    target = new_version(tmp_path)
    pointer = tmp_path / "gone" / "ptr.json"
    with TestClient(create_app(settings(tmp_path, model_pointer=pointer))) as client:
        old = version_of(client)
        r = client.post("/admin/reload", json={"model_dir": str(target)}, headers=AUTH)
        assert (r.status_code, r.json()["error"]) == (
            500,
            {
                "type": "reload_not_published",
                "message": "the other workers cannot be told of it (No such file or directory): nothing changed",
            },
        )
        assert version_of(client) == old
        assert 'intent_model_reloads_total{result="rejected"} 1.0' in client.get("/metrics").text
    assert not (tmp_path / "gone").exists()


def test_a_worker_that_starts_after_its_pointers_directory_went_serves_intent_model_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload's directory removed, then a worker restarted (killed, say): it had failed to start, and uvicorn
    then stopped every worker, the healthy ones too."""
    target = new_version(tmp_path)
    write_pointer(tmp_path / "ptr.json", Pointer(str(target), "2026.12.01-rollout"))
    shutil.rmtree(target)
    with caplog.at_level(logging.WARNING), TestClient(create_app(settings(tmp_path))) as client:
        assert version_of(client) == version_of_dir(MODEL_DIR)
    assert "the model pointer names a directory that does not load; serving INTENT_MODEL_DIR" in caplog.messages


def by_directory(loads: list[str], broken: str = "broken", unloadable: str = "unloadable") -> Any:
    """A factory whose model's version is its directory's name; `broken`'s warm-up fails (ONNX Runtime's untyped
    run-time errors), and `unloadable`'s load fails with an error the factory does not map to ModelLoadError."""

    def factory(s: Settings) -> tuple[FakeClassifier, dict[str, Any]]:
        loads.append(s.model_dir.name)
        if s.model_dir.name == unloadable:
            raise RuntimeError("the factory broke")
        clf = FakeClassifier(fail=s.model_dir.name == broken)
        clf.version = s.model_dir.name
        return clf, {"version": clf.version, "labels": clf.labels}

    return factory


def test_a_pointer_whose_directory_holds_another_version_is_loaded_once_not_at_every_poll(tmp_path: Path) -> None:
    """The directory was rewritten in place after the pointer named it: the worker reloaded it at every poll, for
    ever (a full load each time, and intent_model_reloads_total{result="ok"} counting up). Not a failure that may
    pass, either: not tried again after INTENT_RELOAD_RETRY_S."""
    loads: list[str] = []
    app = create_app(settings(tmp_path, reload_poll_s=0.05, reload_retry_s=0.05), by_directory(loads))
    with TestClient(app) as client:
        write_pointer(tmp_path / "ptr.json", Pointer(str(tmp_path / "v2"), "v2-as-it-was"))
        deadline = time.monotonic() + 60  # only catches a hang
        while version_of(client) != "v2":
            assert time.monotonic() < deadline, "the worker did not follow the pointer"
            time.sleep(0.05)
        time.sleep(0.3)  # six polls, each of which had loaded v2 again
        write_pointer(tmp_path / "ptr.json", Pointer(str(tmp_path / "v3"), "v3"))
        while version_of(client) != "v3":  # then a pointer that changes is followed
            assert time.monotonic() < deadline, "the worker did not follow the next pointer"
            time.sleep(0.05)
        assert 'intent_model_reloads_total{result="ok"} 2.0' in client.get("/metrics").text
    assert loads == [MODEL_DIR.name, "v2", "v3"]


def test_a_model_whose_warm_up_fails_is_refused_and_the_worker_keeps_following(tmp_path: Path) -> None:
    """A warm-up that raised (ONNX Runtime out of memory, say) had answered /admin/reload 500, counted no reload,
    and ended the task that follows the pointer: that worker stayed on its old model for good."""
    loads: list[str] = []
    app = create_app(settings(tmp_path, reload_poll_s=0.05), by_directory(loads))
    with TestClient(app) as client:
        r = client.post("/admin/reload", json={"model_dir": str(tmp_path / "broken")}, headers=AUTH)
        assert (r.status_code, r.json()["error"]) == (
            422,
            {"type": "model_rejected", "message": f"{tmp_path / 'broken'}: the warm-up failed: classifier broke"},
        )
        assert version_of(client) == MODEL_DIR.name
        assert client.get("/model").json()["version"] == MODEL_DIR.name
        for name in ("broken", "unloadable", "v2"):  # each after the last was refused
            tried = len(loads)
            write_pointer(tmp_path / "ptr.json", Pointer(str(tmp_path / name), name))
            deadline = time.monotonic() + 60  # only catches a hang
            while len(loads) == tried:
                assert time.monotonic() < deadline, f"the worker did not look at the pointer to {name}"
                time.sleep(0.05)
        while version_of(client) != "v2":
            assert time.monotonic() < deadline, "the worker stopped following the pointer"
            time.sleep(0.05)
        metrics = client.get("/metrics").text
        assert 'intent_model_reloads_total{result="rejected"} 3.0' in metrics
        assert 'intent_model_reloads_total{result="ok"} 1.0' in metrics
    assert loads == [MODEL_DIR.name, "broken", "broken", "unloadable", "v2"]


def test_a_worker_that_starts_on_a_pointer_whose_model_fails_its_warm_up_serves_intent_model_dir(
    tmp_path: Path,
) -> None:
    """A warm-up that raised was not a load error to the lifespan: the worker failed to start, and uvicorn then
    stopped every worker."""
    loads: list[str] = []
    write_pointer(tmp_path / "ptr.json", Pointer(str(tmp_path / "broken"), "broken"))
    with TestClient(create_app(settings(tmp_path), by_directory(loads))) as client:
        assert version_of(client) == MODEL_DIR.name
    assert loads == ["broken", MODEL_DIR.name]


def test_a_pointer_that_failed_to_load_is_tried_again_after_a_back_off(tmp_path: Path) -> None:
    """A full disk while the worker loaded, say: it did not try the pointer again until it changed, and stayed on
    its old model until it restarted. It tries again after INTENT_RELOAD_RETRY_S, twice as long after each further
    failure."""
    loads: list[str] = []
    healthy = by_directory(loads)
    failed_at: list[float] = []
    disk_full = threading.Event()
    disk_full.set()

    def factory(s: Settings) -> tuple[FakeClassifier, dict[str, Any]]:
        if s.model_dir.name == "v2" and disk_full.is_set():
            failed_at.append(time.monotonic())
            raise OSError(28, "No space left on device")
        return healthy(s)

    app = create_app(settings(tmp_path, reload_poll_s=0.05, reload_retry_s=0.05), factory)
    with TestClient(app) as client:
        write_pointer(tmp_path / "ptr.json", Pointer(str(tmp_path / "v2"), "v2"))
        deadline = time.monotonic() + 60  # only catches a hang
        while len(failed_at) < 4:
            assert time.monotonic() < deadline, "the worker did not try the pointer again"
            time.sleep(0.05)
        assert version_of(client) == MODEL_DIR.name
        disk_full.clear()
        while version_of(client) != "v2":
            assert time.monotonic() < deadline, "the worker did not follow the pointer once it loaded"
            time.sleep(0.05)
        metrics = client.get("/metrics").text
    # Never sooner than the back-off: 0.05 s, then 0.1 and 0.2.
    gaps = [later - earlier for earlier, later in itertools.pairwise(failed_at)]
    assert all(gap >= 0.05 * 2**i for i, gap in enumerate(gaps[:3])), gaps
    assert f'intent_model_reloads_total{{result="rejected"}} {len(failed_at)}.0' in metrics
    assert 'intent_model_reloads_total{result="ok"} 1.0' in metrics
    assert loads == [MODEL_DIR.name, "v2"]


def test_a_removed_pointer_sends_every_worker_back_to_intent_model_dir(tmp_path: Path) -> None:
    """A worker that starts with no pointer file serves INTENT_MODEL_DIR; those already running had kept the
    reloaded model when the file was removed, so a replica answered with two versions after a worker restarted. A
    file that cannot be parsed (a hand edit under way) is passed over, and no pointer ever written loads nothing."""
    loads: list[str] = []
    pointer = tmp_path / "ptr.json"
    app = create_app(settings(tmp_path, reload_poll_s=0.05), by_directory(loads))
    with TestClient(app) as client:
        time.sleep(0.3)  # six polls with no pointer file: nothing to load
        assert loads == [MODEL_DIR.name]
        write_pointer(pointer, Pointer(str(tmp_path / "v2"), "v2"))
        deadline = time.monotonic() + 60  # only catches a hang
        while version_of(client) != "v2":
            assert time.monotonic() < deadline, "the worker did not follow the pointer"
            time.sleep(0.05)
        pointer.write_text('{"model_dir": ')
        time.sleep(0.3)
        assert version_of(client) == "v2"
        pointer.unlink()
        while version_of(client) != MODEL_DIR.name:
            assert time.monotonic() < deadline, "the worker did not go back to INTENT_MODEL_DIR"
            time.sleep(0.05)
        assert client.get("/model").json()["version"] == MODEL_DIR.name
        time.sleep(0.3)  # and stays there, loaded once
        metrics = client.get("/metrics").text
    assert loads == [MODEL_DIR.name, "v2", MODEL_DIR.name]
    assert 'intent_model_reloads_total{result="ok"} 2.0' in metrics
    # A worker that starts now begins where the running one went back to.
    with TestClient(create_app(settings(tmp_path), by_directory(loads))) as client:
        assert version_of(client) == MODEL_DIR.name
