"""One ONNX Runtime session per model file, run one text at a time: dynamic int8 quantisation computes its
activation scales per call, so a text gets the same answer alone as in any batch only when it is its own batch."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import onnxruntime as ort

from app import heap
from app.engine.errors import ModelLoadError
from app.engine.signed_weights import signed_graph, signed_products_exact

INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})
# What a graph's int8 form is checked on before it replaces the stored one: 8 texts of 3 to 38 token ids, fixed,
# from the middle of a BERT vocabulary (30,522), where saturation moved every text's logits on an AVX2 CPU.
VERIFY_IDS = [[101, *range(1000 + 997 * k, 1000 + 997 * k + 5 * k + 1), 102] for k in range(8)]
log = logging.getLogger(__name__)


def session_options(intra: int, inter: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra
    opts.inter_op_num_threads = inter
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the cores that other workers need; with one intra thread it changes nothing.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


class GraphFile:
    """Graph bytes as a path to load them from, for as long as the `with` block lasts. A session made from bytes
    keeps them for its whole life, to re-create itself (ONNX Runtime's "TODO: This is bad as we're holding the
    memory indefinitely"): 29 MB for the served graphs. Made from a path, it keeps nothing. An anonymous in-memory
    file where the kernel has them (Linux's memfd), else a temporary file. The bytes are written at once and not
    referenced after, so the caller can drop its own copy before the load."""

    def __init__(self, graph: bytes) -> None:
        self._directory: tempfile.TemporaryDirectory[str] | None = None
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):  # the file's path is through /proc
            self._fd = os.memfd_create("intent-graph", os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{self._fd}"
        else:
            self._directory = tempfile.TemporaryDirectory(prefix="intent-graph-")
            self.path = os.path.join(self._directory.name, "graph.onnx")
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(self._fd, "wb", closefd=False) as file:
                file.write(graph)
        except BaseException:  # no space, say: the caller serves the stored graph, and nothing of this may stay
            self.__exit__(None, None, None)
            raise

    def __enter__(self) -> str:
        return self.path

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        os.close(self._fd)
        if self._directory is not None:
            self._directory.cleanup()


class OnnxModel:
    """Token ids of one text -> the named output rows, in the order asked (None names the graph's first output).

    `give_back`: whether a load that swaps sessions (the int8 form below) returns the released session's pages to
    the kernel at once. The service passes False: its lifespan returns the free heap once after the whole load
    and warm-up, and a reload once the model it replaces is freed (app.heap), so a trim per graph was the same
    work done again at start-up. Whatever loads outside the service (the factory, `check()`) keeps it."""

    def __init__(
        self,
        path: Path,
        outputs: Sequence[str | None],
        intra: int = 1,
        inter: int = 1,
        disabled: Sequence[str] = (),
        give_back: bool = True,
    ) -> None:
        def load(source: str) -> ort.InferenceSession:
            return ort.InferenceSession(
                source,  # a path: from bytes, ONNX Runtime would keep them as long as the session (GraphFile)
                session_options(intra, inter),
                providers=["CPUExecutionProvider"],
                disabled_optimizers=list(disabled),
                enable_fallback=0,  # CPU only: nothing to fall back to
            )

        try:
            self.session = load(str(path))
        except Exception as exc:  # noqa: BLE001 - ORT raises its own untyped errors for a bad model file
            raise ModelLoadError(f"unloadable {path.name}: {str(exc).splitlines()[0][:200]}") from None
        inputs = {i.name for i in self.session.get_inputs()}
        if "input_ids" not in inputs or not inputs <= INPUTS:
            raise ModelLoadError(f"{path.name} inputs are {sorted(inputs)}, expected input_ids and attention_mask")
        available = [o.name for o in self.session.get_outputs()]
        names = [available[0] if name is None else name for name in outputs]
        for name in names:
            if name not in available:
                raise ModelLoadError(f"{path.name} has no output {name!r} (its outputs: {available})")
        self.name = path.name
        self.outputs = names
        self._mask = "attention_mask" in inputs
        self._types = "token_type_ids" in inputs
        self.signed_at_load = signed_products_exact() and self._load_signed(path, load, give_back)

    def _load_signed(self, path: Path, load: Callable[[str], ort.InferenceSession], give_back: bool) -> bool:
        """Swap the stored graph for its int8 form (app.engine.signed_weights) if that gives the stored graph's
        every output bit for bit on VERIFY_IDS, on this CPU: the probe asked the kernel one product, and this asks
        the graph's own kernels. The stored session is released first, so that one set of weights is in memory
        at a time. Whether swapped."""
        try:
            signed = signed_graph(path)
            if signed is None:
                return False
            expected = [self.session.run(None, self.feed(ids)) for ids in VERIFY_IDS]
        except Exception:  # noqa: BLE001 - a graph the flip cannot read, or ids it cannot take: serve it as stored
            return False
        del self.session
        flipped: ort.InferenceSession | None = None
        try:
            with GraphFile(signed) as source:
                del signed
                flipped = load(source)
            same = all(
                all(np.array_equal(a, b) for a, b in zip(flipped.run(None, self.feed(ids)), want, strict=True))
                for ids, want in zip(VERIFY_IDS, expected, strict=True)
            )
        except Exception as exc:  # noqa: BLE001 - no file to load it from, or ORT refused it: serve it as stored
            log.warning("%s: its int8 form did not load or run (%s); serving it as stored", path.name, str(exc)[:200])
            same = False
        else:
            if not same:
                log.warning("%s: its int8 form gives other outputs on this CPU; serving it as stored", path.name)
        if same and flipped is not None:
            self.session = flipped
        else:
            del flipped  # before the stored graph loads again, so that one set of weights is in memory at a time
            self.session = load(str(path))
        if give_back:  # glibc kept up to 35 MB of the released session's pages resident in some runs, none in others
            heap.return_free_memory()
        return same

    def feed(self, ids: list[int]) -> dict[str, np.ndarray]:
        input_ids = np.array([ids], dtype=np.int64)
        feed = {"input_ids": input_ids}
        if self._mask:
            feed["attention_mask"] = np.ones_like(input_ids)
        if self._types:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        return feed

    def run(self, ids: list[int]) -> list[np.ndarray]:
        """Each named output's row for one text."""
        return [out[0] for out in self.row(ids)]

    def row(self, ids: list[int]) -> list[np.ndarray]:
        """Each named output for one text, as a batch of one: [1, ...]."""
        outputs: list[np.ndarray] = self.session.run(self.outputs, self.feed(ids))
        return outputs

    def rows(self, ids: Sequence[list[int]]) -> list[np.ndarray]:
        """Each named output for many texts, stacked: [n, ...], each text its own call."""
        if len(ids) == 1:
            return self.row(ids[0])
        rows = [self.row(x) for x in ids]
        return [np.concatenate([row[k] for row in rows]) for k in range(len(self.outputs))]
