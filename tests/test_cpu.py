"""app.cpu reads the CPU model and the instruction sets that decide int8 speed from /proc/cpuinfo."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from app import cpu

COMMON = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov sse sse2 ht syscall nx lm pni ssse3 sse4_1"


def block(processor: int, vendor: str, family: int, model: int, name: str, flags: str) -> str:
    return (
        f"processor\t: {processor}\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
        f"model name\t: {name}\nstepping\t: 1\ncpu MHz\t\t: 2595.124\ncache size\t: 512 KB\n"
        f"flags\t\t: {flags}\nbugs\t\t: sysret_ss_attrs spectre_v1\nbogomips\t: 4990.00\n"
        "power management:\n\n"
    )


# Zen 1 (Naples): AVX2 and FMA, no AVX-512, no VNNI.
EPYC_AVX2 = "".join(
    block(i, "AuthenticAMD", 23, 1, "AMD EPYC 7601 32-Core Processor", f"{COMMON} fma avx2") for i in (0, 1)
)
# Zen 4 (Genoa) under a hypervisor that shows only "AMD EPYC": AVX-512 with VNNI.
EPYC_VNNI = "".join(
    block(i, "AuthenticAMD", 25, 17, "AMD EPYC", f"{COMMON} fma avx2 avx512f avx512bw avx512_bf16 avx512_vnni")
    for i in (0, 1)
)
SAPPHIRE_RAPIDS = block(
    0,
    "GenuineIntel",
    6,
    143,
    "Intel(R) Xeon(R) Platinum 8480+",
    f"{COMMON} fma avx2 avx512f avx512_vnni avx_vnni avx512_fp16 amx_bf16 amx_tile amx_int8",
)


def from_text(tmp_path: Path, text: str) -> cpu.CpuInfo:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return cpu.read(path)


def test_avx2_only_epyc(tmp_path: Path) -> None:
    info = from_text(tmp_path, EPYC_AVX2)
    assert (info.model_name, info.vendor, info.family, info.model) == (
        "AMD EPYC 7601 32-Core Processor",
        "AuthenticAMD",
        23,
        1,
    )
    assert {"avx2", "fma", "sse4_1"} <= info.flags
    assert info.isa == ["avx2", "fma"]
    assert info.describe() == "AMD EPYC 7601 32-Core Processor (family 23 model 1; avx2 fma)"


def test_vnni_epyc(tmp_path: Path) -> None:
    info = from_text(tmp_path, EPYC_VNNI)
    assert (info.model_name, info.vendor, info.family, info.model) == ("AMD EPYC", "AuthenticAMD", 25, 17)
    assert info.isa == ["avx2", "fma", "avx512f", "avx512_vnni"]
    assert info.describe() == "AMD EPYC (family 25 model 17; avx2 fma avx512f avx512_vnni)"


def test_sapphire_rapids_has_every_int8_path(tmp_path: Path) -> None:
    info = from_text(tmp_path, SAPPHIRE_RAPIDS)
    assert (info.vendor, info.family, info.model) == ("GenuineIntel", 6, 143)
    assert info.isa == ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8"]
    assert "amx_bf16" in info.flags  # every flag is kept; `isa` lists only those that decide speed here
    assert info.describe().startswith("Intel(R) Xeon(R) Platinum 8480+ (family 6 model 143; avx2 fma")


def test_no_cpuinfo_means_unknown(tmp_path: Path) -> None:
    info = cpu.read(tmp_path / "missing")
    assert info == cpu.CpuInfo("unknown", "unknown", None, None, frozenset())
    assert info.isa == []
    assert info.describe() == "unknown (flags unknown)"


def test_arm64_cpuinfo(tmp_path: Path) -> None:
    text = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd aes sha1 asimddp\nCPU implementer\t: 0x41\n"
    text += "CPU part\t: 0xd0c\n\n"
    info = from_text(tmp_path, text)
    assert (info.model_name, info.vendor, info.model) == ("unknown", "0x41", 0xD0C)
    assert "asimddp" in info.flags
    assert info.describe() == "unknown (no AVX2)"


def test_current_is_read_once() -> None:
    assert cpu.current() is cpu.current()


def test_measurement_context(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = from_text(tmp_path, EPYC_VNNI)
    monkeypatch.setattr(cpu, "current", lambda: fake)
    context = cpu.measurement_context()
    assert set(context) == {"cpu", "cpu_model", "isa", "cores", "onnxruntime", "python", "int8_products_exact"}
    assert context["cpu"] == "AMD EPYC (family 25 model 17; avx2 fma avx512f avx512_vnni)"
    assert context["cpu_model"] == "AMD EPYC"
    assert context["isa"] == ["avx2", "fma", "avx512f", "avx512_vnni"]
    assert context["python"] == platform.python_version()
    assert isinstance(context["cores"], int)
    import onnxruntime

    assert context["onnxruntime"] == onnxruntime.__version__
    from app.engine.signed_weights import signed_products_exact

    assert context["int8_products_exact"] is signed_products_exact()  # the kernel's answer, not the fake CPU's flags


def test_measurement_context_without_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    context = cpu.measurement_context()
    assert (context["onnxruntime"], context["int8_products_exact"]) == (None, None)
