"""Which CPU this is: model and the instruction sets that decide int8 and fp32 speed. Stdlib only (it ships in
the serving image).

The same model's transformer rows took 0.72-0.87 ms on an AVX-512 VNNI EPYC and 1.4-1.5 ms on an AVX2-only one
(docs/one-small-model.md), so every speed figure is recorded with `measurement_context()` and `GET /model` names
the CPU. Nothing here decides how a model runs: which int8 kernel multiplies exactly is asked of ONNX Runtime
itself (app.engine.signed_weights), never guessed from these flags.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
# In the order they matter for this model: AVX2/FMA for fp32, AVX-512 VNNI, AVX-VNNI and AMX for int8.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
UNKNOWN = "unknown"


@dataclass(frozen=True)
class CpuInfo:
    model_name: str
    vendor: str
    family: int | None
    model: int | None
    flags: frozenset[str]

    @property
    def isa(self) -> list[str]:
        """The instruction sets of ISA_FLAGS this CPU has, in that order."""
        return [f for f in ISA_FLAGS if f in self.flags]

    def describe(self) -> str:
        """One line for reports, e.g. 'AMD EPYC (family 25 model 17; avx2 fma avx512f avx512_vnni)'."""
        where = f"family {self.family} model {self.model}; " if self.family is not None else ""
        isa = " ".join(self.isa) or ("no AVX2" if self.flags else "flags unknown")
        return f"{self.model_name} ({where}{isa})"


def _number(value: str | None) -> int | None:
    """x86's decimal "17", or ARM's hexadecimal "0xd0c"."""
    for base in (10, 16):
        try:
            return int(value, base) if value else None
        except ValueError:
            continue
    return None


def parse(text: str) -> CpuInfo:
    """The first processor block of a /proc/cpuinfo text (every core of one machine reports the same flags)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    # x86 first; then what arm64 kernels write ("Features", "CPU implementer", "CPU part").
    name = fields.get("model name") or fields.get("hardware") or fields.get("processor", "")
    return CpuInfo(
        model_name=name if name and not name.isdigit() else UNKNOWN,
        vendor=fields.get("vendor_id") or fields.get("cpu implementer") or UNKNOWN,
        family=_number(fields.get("cpu family")),
        model=_number(fields.get("model") or fields.get("cpu part")),
        flags=frozenset((fields.get("flags") or fields.get("features") or "").split()),
    )


def read(path: Path = CPUINFO) -> CpuInfo:
    """Parse `path`; where it cannot be read (not Linux), model 'unknown' and no flags."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return CpuInfo(UNKNOWN, UNKNOWN, None, None, frozenset())
    return parse(text)


@functools.cache
def current() -> CpuInfo:
    """This machine's CPU, read once per process."""
    return read()


def onnxruntime_version() -> str | None:
    """Imported only when asked for, so that importing this module stays cheap; None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(onnxruntime.__version__)


def int8_products_exact() -> bool | None:
    """Whether this machine's ONNX Runtime multiplies int8 weights exactly, and so whether the engine runs the
    served weights as int8 or as stored (app.engine.signed_weights); None without onnxruntime."""
    if onnxruntime_version() is None:
        return None
    from app.engine.signed_weights import signed_products_exact

    return signed_products_exact()


def measurement_context() -> dict[str, Any]:
    """What every speed figure is recorded with: the CPU, its ISA, cores and runtime versions, and which weights
    the engine runs on it."""
    cpu = current()
    return {
        "cpu": cpu.describe(),
        "cpu_model": cpu.model_name,
        "isa": cpu.isa,
        "cores": os.cpu_count(),
        "onnxruntime": onnxruntime_version(),
        "python": platform.python_version(),
        "int8_products_exact": int8_products_exact(),
    }
