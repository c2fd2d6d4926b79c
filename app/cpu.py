"""Which CPU this is: model and the instruction sets that decide int8 and fp32 speed. Stdlib only."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# In the order they matter for this model: AVX2/FMA for fp32, AVX-512 VNNI, AVX-VNNI and AMX for int8.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@dataclass(frozen=True)
class CpuInfo:
    model_name: str
    vendor: str
    family: int | None
    model: int | None
    flags: frozenset[str]

    @property
    def isa(self) -> list[str]:
        return [f for f in ISA_FLAGS if f in self.flags]

    def has_int8_dot(self) -> bool:
        return bool(self.flags & INT8_DOT_FLAGS)

    def describe(self) -> str:
        where = f"family {self.family} model {self.model}; " if self.family is not None else ""
        return f"{self.model_name} ({where}{' '.join(self.isa) or 'no AVX2'})"


def parse(text: str) -> CpuInfo:
    """The first processor block of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())

    def number(key: str) -> int | None:
        value = fields.get(key, "")
        return int(value) if value.isdigit() else None

    return CpuInfo(
        model_name=fields.get("model name", "unknown"),
        vendor=fields.get("vendor_id", "unknown"),
        family=number("cpu family"),
        model=number("model"),
        flags=frozenset(fields.get("flags", "").split()),
    )


def read(path: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    try:
        return parse(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return CpuInfo(platform.processor() or "unknown", "unknown", None, None, frozenset())


@functools.cache
def current() -> CpuInfo:
    return read()


def measurement_context() -> dict[str, Any]:
    """What every speed figure is recorded with: the CPU, its ISA, cores and runtime versions."""
    cpu = current()
    try:
        ort_version: str | None = metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        ort_version = None
    return {
        "cpu": cpu.describe(),
        "cpu_model": cpu.model_name,
        "isa": cpu.isa,
        "cores": os.cpu_count(),
        "onnxruntime": ort_version,
        "python": platform.python_version(),
    }
