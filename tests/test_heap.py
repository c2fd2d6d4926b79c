"""app.heap: the C heap's free pages go back to the kernel, and only once what held them is freed."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import platform
import weakref

import pytest
from fastapi.testclient import TestClient

from app import heap
from app.config import Settings
from app.engine import onnx
from app.engine.artifact import load_artifact
from app.engine.engine import Engine
from app.engine.signed_weights import signed_graph
from app.http.main import create_app
from tests.conftest import MODEL_DIR
from tests.fakes import FakeClassifier, fake_factory

BLOCK = 100_000  # under glibc's mmap threshold (128 KiB), so each block comes from the heap and stays there
BLOCKS = 2_000  # 200 MB


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_the_heap_that_glibc_kept_goes_back_to_the_kernel() -> None:
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, BLOCK)  # resident, not only reserved
    for b in blocks[:-1]:  # the last one stays, so glibc cannot give the rest back by shrinking the heap's top
        libc.free(b)
    kept = resident_mb()
    assert heap.return_free_memory() is True
    returned = kept - resident_mb()
    libc.free(blocks[-1])
    freed_mb = (BLOCKS - 1) * BLOCK / 2**20
    assert returned > 0.9 * freed_mb, (kept, returned, freed_mb)


class Held:
    """Stands for a model: what it holds is freed after the weak reference's callback has run."""


def test_the_memory_is_returned_after_the_object_is_freed_not_before(monkeypatch: pytest.MonkeyPatch) -> None:
    obj = Held()
    alive = weakref.ref(obj)
    seen: list[bool] = []
    monkeypatch.setattr(heap, "return_free_memory", lambda: seen.append(alive() is None) or True)

    async def main() -> None:
        nonlocal obj
        assert heap.when_freed(obj, asyncio.get_running_loop()) is True
        await asyncio.sleep(0)
        assert seen == []  # still referenced: nothing yet
        del obj
        assert seen == []  # scheduled, not run inside the code that freed it
        await asyncio.sleep(0)
        assert seen == [True]

    asyncio.run(main())


def test_an_object_freed_after_its_loop_closed_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    monkeypatch.setattr(heap, "return_free_memory", lambda: seen.append(1) or True)
    loop = asyncio.new_event_loop()
    obj = Held()
    assert heap.when_freed(obj, loop) is True
    loop.close()
    del obj  # no error, and nothing run: the worker has stopped
    gc.collect()
    assert seen == []


def test_an_object_without_weak_references_is_refused() -> None:
    loop = asyncio.new_event_loop()
    try:
        assert heap.when_freed(3, loop) is False
    finally:
        loop.close()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="M_ARENA_MAX is glibc's")
def test_the_arena_limit_is_accepted() -> None:
    assert heap.limit_arenas() is True


def test_without_the_c_library_calls_nothing_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_libc_function", lambda name, *argtypes: None)
    assert heap.limit_arenas() is False
    assert heap.return_free_memory() is False


def test_a_worker_limits_its_arenas_before_it_loads_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit holds for threads that allocate after it: the thread a reload loads in is one of them."""
    order: list[str] = []
    monkeypatch.setattr(heap, "limit_arenas", lambda: order.append("limit") or True)
    clf = FakeClassifier()
    load = fake_factory(clf)

    def factory(settings: Settings) -> tuple[FakeClassifier, dict[str, object]]:
        order.append("load")
        return load(settings)  # type: ignore[no-any-return]

    with TestClient(create_app(Settings(warmup_queries=0), factory)):
        pass
    assert order == ["limit", "load"]


def test_a_graph_load_that_tries_the_int8_swap_gives_the_released_session_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """app.engine.onnx: a load that tries the swap releases one session and trims once, whether the swap is kept (a
    CPU that multiplies int8 exactly) or refused (one whose int8 kernel saturates). Forced on, so that every CPU
    runs the path; a graph with nothing to flip tries no swap and trims nothing. The service's load
    (`give_back=False`) leaves it to the one trim after its whole load (tests/test_reload.py counts those)."""
    calls: list[int] = []
    monkeypatch.setattr(heap, "return_free_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(onnx, "signed_products_exact", lambda: True)
    engine = Engine.open(MODEL_DIR)
    files = [MODEL_DIR / stage.file for stage in engine.spec.stages]
    assert len(calls) == sum(signed_graph(path) is not None for path in files) > 0
    engine.close()
    calls.clear()
    Engine.from_artifact(load_artifact(MODEL_DIR), give_back=False).close()  # as app.http.serving loads
    assert calls == []
