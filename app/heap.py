"""Give the C heap's free pages back to the kernel after a model is loaded, and after a replaced model is freed.

ONNX Runtime, the tokenizer and numpy allocate through the C library's malloc, and glibc keeps what they free in
its arenas for reuse instead of returning it. A load leaves its scratch there (the graph's bytes, the weights
before ONNX Runtime packs them), and a hot reload leaves the whole replaced model. Measured on AMD EPYC (avx2),
VmRSS of one process that loads the committed model and then reloads it: 130 MB after the load, then 154, 176
and 187 MB after three reloads; across `python -m app`'s two workers, 164 MB more PSS after eight reloads. With
glibc's `malloc_trim(0)`, which releases every free run of pages and not only the heap's top, the same process
held 119 MB after the load and 121-124 MB after each reload. A call took 1-4.5 ms there, so the service makes it
only at those moments, and after a refused reload, whose sessions may have been built before the refusal. A
worker also limits its malloc arenas (`limit_arenas`), so that a reload's loading thread does not leave a model's
scraps in an arena of its own. Where the C library has neither call (musl, macOS) nothing is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import weakref
from collections.abc import Callable
from typing import Any

M_ARENA_MAX = -8  # glibc's malloc.h
ARENAS = 2


@functools.cache
def _libc_function(name: str, *argtypes: Any) -> Callable[..., int] | None:
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError, TypeError):  # TypeError: a platform whose CDLL needs a library name
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Let the threads that first allocate from now on share `arenas` malloc arenas. glibc gives each new thread
    its own arena, up to eight per core; the thread a reload loads in built the new model in one of them, and what
    a model left there could not be given back while anything else lived on the same pages. Over 16 reloads, two
    workers' PSS rose by 27-38 MB with the default and by about 10 MB with one or two arenas (three runs each, AMD
    EPYC, avx2). The event loop is the only thread that allocates on the request path, so sharing costs nothing
    there. False where the C library has no `mallopt`."""
    mallopt = _libc_function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


def return_free_memory() -> bool:
    """Ask the C library to give its free heap pages back. False where it cannot be asked."""
    trim = _libc_function("malloc_trim", ctypes.c_size_t)
    if trim is None:
        return False
    trim(0)
    return True


def when_freed(obj: object, loop: asyncio.AbstractEventLoop) -> bool:
    """Return the free heap once `obj` is freed, on `loop`. False if `obj` cannot be weakly referenced.

    Python calls a weak reference's callback when the object starts to be freed, before what it holds (a model's
    ONNX Runtime sessions) is; the callback only schedules the call, which the loop makes after the code that
    dropped the last reference has finished freeing it. A loop that has closed meanwhile (the worker stopped)
    is skipped."""

    def schedule() -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(return_free_memory)

    try:
        finalizer = weakref.finalize(obj, schedule)
    except TypeError:
        return False
    finalizer.atexit = False  # at interpreter exit the memory goes back anyway
    return True
