"""The stored uint8 weights flipped back to int8 at load where this CPU multiplies int8 weights exactly
(app.engine.signed_weights): the flip gives the factory's int8 graph, the probe decides from the kernel itself,
the engine reports what it loaded, and anything the flip does not recognise loads as stored."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

import app.engine.onnx as onnx_module
from app import heap
from app.engine.engine import WEIGHTS_SIGNED, WEIGHTS_STORED, Engine
from app.engine.errors import ModelLoadError
from app.engine.onnx import OnnxModel, session_options
from app.engine.signed_weights import INT8, PROBE, UINT8, probe_graph, signed_graph, signed_products_exact
from compression.unsigned_weights import unsigned_weights
from tests.conftest import MODEL_DIR
from tests.onnx_graphs import matmul_integer, run_graph, shared_table, signed_weights

GRAPHS = ("model.onnx", "static.onnx")


@pytest.mark.parametrize("name", GRAPHS)
def test_the_flip_of_a_committed_graph_is_the_factorys_int8_graph(name: str) -> None:
    """Parsed with the onnx package, the flipped bytes equal the committed graph made signed with it: every
    weight and zero point the rewrite shifted, and nothing else, field for field."""
    flipped = onnx.load_from_string(signed_graph(MODEL_DIR / name))
    expected = signed_weights(onnx.load(str(MODEL_DIR / name)))
    assert flipped == expected
    int8 = {t.name for t in flipped.graph.initializer if t.data_type == TensorProto.INT8}
    stored = {t.name for t in onnx.load(str(MODEL_DIR / name)).graph.initializer if t.data_type == TensorProto.INT8}
    # The weights and their zero points (the first stage also keeps its int8 embedding table, which it only looks up).
    assert len(int8 - stored) == {"model.onnx": 54, "static.onnx": 4}[name]


def test_the_committed_probe_is_the_one_probe_graph_writes() -> None:
    """Regenerate with: python -c "from app.engine.signed_weights import *; PROBE.write_bytes(probe_graph(INT8))"."""
    assert PROBE.read_bytes() == probe_graph(INT8)
    checked = onnx.load(str(PROBE))
    onnx.checker.check_model(checked)
    assert [n.op_type for n in checked.graph.node] == ["MatMulInteger"]


def test_the_probe_is_exact_for_uint8_weights_and_matches_the_int8_kernel_on_this_cpu() -> None:
    a = np.full((3, 64), 255, dtype=np.uint8)
    exact = np.full((3, 4), 255 * 127 * 64, dtype=np.int32)
    for weight_type in (UINT8, INT8):
        session = ort.InferenceSession(probe_graph(weight_type), providers=["CPUExecutionProvider"])
        got = session.run(None, {"a": a})[0]
        if weight_type == UINT8:
            assert np.array_equal(got, exact)
        else:
            assert np.array_equal(got, exact) is signed_products_exact()


def test_the_int8_graphs_give_the_stored_outputs_exactly_where_the_probe_says_so() -> None:
    """On this CPU: the committed transformer flipped to int8 gives the stored graph's outputs bit for bit on
    every text if and only if the probe found int8 products exact (on an AVX2-only CPU every text's logits move;
    on a VNNI CPU none does). So the probe never lets the engine load a graph that answers otherwise."""
    engine = Engine.open(MODEL_DIR)
    stage = engine.spec.transformer
    options = {"disabled_optimizers": stage.ort_disabled_optimizers, "providers": ["CPUExecutionProvider"]}
    stored = ort.InferenceSession(str(MODEL_DIR / stage.file), session_options(1, 1), **options)
    flipped = ort.InferenceSession(signed_graph(MODEL_DIR / stage.file), session_options(1, 1), **options)
    model = engine.models[-1]
    texts = ["what is my balance", "book a table for four at noon tomorrow", "how do I say thanks in german", "wow"]
    same = [
        all(
            np.array_equal(x, y)
            for x, y in zip(stored.run(model.outputs, f), flipped.run(model.outputs, f), strict=True)
        )
        for f in (model.feed(e.ids) for e in engine.encode(texts))
    ]
    assert same == [signed_products_exact()] * len(texts)
    assert engine.weights == (WEIGHTS_SIGNED if signed_products_exact() else WEIGHTS_STORED)


def _weights_graph(tmp_path: Path) -> Path:
    """A MatMulInteger over int8 weights with a zero point, rewritten to uint8 by the factory."""
    weights = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    path = matmul_integer(tmp_path / "w.onnx", weights, np.array(1, dtype=np.int8))
    assert unsigned_weights(path) == 1
    return path


def test_a_flipped_graph_holds_the_int8_numbers_and_runs(tmp_path: Path) -> None:
    path = _weights_graph(tmp_path)
    flipped = onnx.load_from_string(signed_graph(path))
    values = {t.name: numpy_helper.to_array(t) for t in flipped.graph.initializer}
    assert values["w"].dtype == np.int8
    assert np.array_equal(values["w"], np.arange(-8, 8).reshape(4, 4))
    assert values["wz"].dtype == np.int8
    assert int(values["wz"]) == 1
    a = np.arange(8, dtype=np.uint8).reshape(2, 4)
    flipped_bytes = signed_graph(path)
    assert flipped_bytes is not None
    (tmp_path / "flipped.onnx").write_bytes(flipped_bytes)
    assert np.array_equal(run_graph(tmp_path / "flipped.onnx", a=a), run_graph(path, a=a))


def test_what_the_flip_does_not_recognise_loads_as_stored(tmp_path: Path) -> None:
    # int8 weights (a graph from before the rewrite): nothing to flip.
    assert signed_graph(matmul_integer(tmp_path / "int8.onnx", np.ones((4, 4), dtype=np.int8))) is None
    # A uint8 weight without a zero point means zero point 0, not the rewrite's 128.
    bare = matmul_integer(tmp_path / "bare.onnx", np.ones((4, 4), dtype=np.int8))
    model = onnx.load(str(bare))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((4, 4), dtype=np.uint8), "w"))
    onnx.save(model, str(bare))
    assert signed_graph(bare) is None
    # A uint8 table another op also reads.
    shared = shared_table(tmp_path / "shared.onnx", np.ones((4, 4), np.uint8), np.array(128, np.uint8))
    assert signed_graph(shared) is None
    # Weights in an external data file.
    external = _weights_graph(tmp_path)
    onnx.save(onnx.load(str(external)), str(external), save_as_external_data=True, size_threshold=0, location="w.bin")
    assert signed_graph(external) is None


def test_the_engine_loads_flipped_graphs_without_keeping_their_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a CPU whose int8 products are exact, with a flip that the graph's own check passes (the stored bytes
    themselves): both graphs swapped, and every session made from a path, so that ONNX Runtime keeps no graph
    bytes (it keeps those it is given for re-creating a session: 29 MB for these two)."""
    monkeypatch.setattr(onnx_module, "signed_products_exact", lambda: True)
    monkeypatch.setattr(onnx_module, "signed_graph", lambda path: path.read_bytes())
    trims: list[int] = []
    monkeypatch.setattr(heap, "return_free_memory", lambda: trims.append(1) or True)
    sources: list[object] = []
    session_class = ort.InferenceSession

    def recording_session(source: object, *args: object, **kwargs: object) -> ort.InferenceSession:
        sources.append(source)
        return session_class(source, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_module.ort, "InferenceSession", recording_session)
    engine = Engine.open(MODEL_DIR)
    monkeypatch.undo()
    assert [m.signed_at_load for m in engine.models] == [True, True]
    assert engine.weights == WEIGHTS_SIGNED
    # Per graph, the stored file and then the flipped graph's in-memory file, gone once loaded.
    assert [type(s) for s in sources] == [str] * 4
    assert [Path(s).name for s in sources[::2]] == list(reversed(GRAPHS))
    assert all(s.startswith("/proc/self/fd/") for s in sources[1::2])  # type: ignore[attr-defined]
    assert len(trims) == 2  # the stored sessions' freed pages handed back, once per graph


class _NoFile:
    """As a sandbox that refuses memfd_create and has no writable temporary directory would."""

    def __init__(self, graph: bytes) -> None:
        raise OSError(1, "Operation not permitted")


class _OtherGraph:
    """A file that loads but does not run on the graph's inputs: the engine's probe, whose inputs are others."""

    def __init__(self, graph: bytes) -> None:
        pass

    def __enter__(self) -> str:
        return str(PROBE)

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.mark.parametrize(
    ("graph_file", "why"),
    [(_NoFile, "[Errno 1] Operation not permitted"), (_OtherGraph, "Required inputs (['a']) are missing")],
    ids=["no-file", "does-not-run"],
)
def test_an_int8_form_that_does_not_load_or_run_is_not_served(
    graph_file: type, why: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The stored graph was released before its int8 form loaded: it is loaded again and served, with a
    warning, where the error had ended the load."""
    monkeypatch.setattr(onnx_module, "signed_products_exact", lambda: True)
    monkeypatch.setattr(onnx_module, "GraphFile", graph_file)
    with caplog.at_level(logging.WARNING, logger="app.engine.onnx"):
        engine = Engine.open(MODEL_DIR)
    assert [m.signed_at_load for m in engine.models] == [False, False]
    assert engine.weights == WEIGHTS_STORED
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" (", 1)[0] for m in messages] == [
        f"{name}: its int8 form did not load or run" for name in ("static.onnx", "model.onnx")
    ]
    assert all(m.split(" (", 1)[1].startswith(why) and m.endswith("); serving it as stored") for m in messages)
    stored = Engine.open(MODEL_DIR)
    texts = ["what is my balance", "tell me about the roman empire"]
    served, expected = engine.run(texts), stored.run(texts)
    assert served.stage.tolist() == [0, 1]  # one text per stage
    assert np.array_equal(served.probs, expected.probs)


@pytest.mark.parametrize("memfd", [True, False], ids=["memfd", "temporary-file"])
def test_a_graph_file_that_cannot_be_written_leaves_nothing_open(memfd: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not memfd:
        monkeypatch.delattr(onnx_module.os, "memfd_create")
    opened: list[int] = []
    fdopen = os.fdopen

    def full_disk(fd: int, *args: object, **kwargs: object) -> object:
        opened.append(fd)
        file = fdopen(fd, *args, **kwargs)  # type: ignore[call-overload]

        def no_space(data: bytes) -> int:
            raise OSError(28, "No space left on device")

        file.write = no_space
        return file

    monkeypatch.setattr(onnx_module.os, "fdopen", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        onnx_module.GraphFile(b"graph bytes")
    (fd,) = opened
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)


@pytest.mark.parametrize("memfd", [True, False], ids=["memfd", "temporary-file"])
def test_a_graph_file_holds_the_bytes_for_the_block_and_is_gone_after(
    memfd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    graph = (MODEL_DIR / "static.onnx").read_bytes()
    if not memfd:
        monkeypatch.delattr(onnx_module.os, "memfd_create")  # as on macOS
    file = onnx_module.GraphFile(graph)
    with file as path:
        assert Path(path).read_bytes() == graph
        assert path.startswith("/proc/self/fd/") is memfd
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(file._fd)  # closed: a memfd's memory goes with its last descriptor
    if not memfd:
        assert not Path(path).parent.exists()


def test_a_flip_whose_outputs_differ_is_not_served(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A probe that says exact on a CPU whose graph kernels are not: each graph's own check on VERIFY_IDS finds
    other outputs, and the engine serves the stored graphs. On a CPU whose int8 products
    do saturate (AVX2, AVX-512 without VNNI) the real flip is that case; elsewhere a flip that moves one weight by
    one step stands in for it."""
    if signed_products_exact():

        def off_by_one(path: Path) -> bytes | None:
            model = onnx.load_from_string(signed_graph(path))
            weight = next(n.input[1] for n in model.graph.node if n.op_type in ("MatMulInteger", "QAttention"))
            table = next(t for t in model.graph.initializer if t.name == weight)
            values = numpy_helper.to_array(table).copy()
            values.flat[0] = values.flat[0] + 1 if values.flat[0] < 127 else 126
            table.CopyFrom(numpy_helper.from_array(values, table.name))
            return model.SerializeToString()

        monkeypatch.setattr(onnx_module, "signed_graph", off_by_one)
    monkeypatch.setattr(onnx_module, "signed_products_exact", lambda: True)
    with caplog.at_level(logging.WARNING, logger="app.engine.onnx"):
        engine = Engine.open(MODEL_DIR)
    assert [m.signed_at_load for m in engine.models] == [False, False]
    assert engine.weights == WEIGHTS_STORED
    assert sorted(r.getMessage() for r in caplog.records) == [
        f"{name}: its int8 form gives other outputs on this CPU; serving it as stored"
        for name in ("model.onnx", "static.onnx")
    ]


def test_a_file_that_is_not_onnx_is_a_load_error_on_the_flip_path_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_module, "signed_products_exact", lambda: True)
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(b"\xff" * 100)
    with pytest.raises(ModelLoadError, match="^unloadable model.onnx: "):
        OnnxModel(garbage, [None])
