"""Copy an onnxruntime package and replace every `cpuid` instruction in its native module by `ud2`, so that
cpuid_mask.so (LD_PRELOAD) answers them with AVX-512, AVX-VNNI and AMX hidden: ONNX Runtime then picks
the kernels it would pick on an AVX2-only CPU. An experiment tool for docs/compute-light.md, and how
tests/test_isa_answers.py checks the served model's answers with those kernels; not part of the product.

    python3 docs/avx2-emulation/patch_cpuid.py .venv-serve/lib/python3.11/site-packages/onnxruntime /tmp/avx2/ort
    gcc -O2 -shared -fPIC docs/avx2-emulation/cpuid_mask.c -o /tmp/avx2/cpuid_mask.so
    PYTHONPATH=/tmp/avx2/ort LD_PRELOAD=/tmp/avx2/cpuid_mask.so make loadtest
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

SECTION = re.compile(r"\s*\d+\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)")
CPUID = re.compile(r"^\s*([0-9a-f]+):\s+0f a2\s+cpuid", re.M)


def patch(library: Path) -> int:
    """Replace each cpuid (0f a2) that objdump finds in `library` by ud2 (0f 0b); returns how many."""
    headers = subprocess.run(["objdump", "-h", str(library)], capture_output=True, text=True, check=True).stdout
    sections = [
        (int(m.group(3), 16), int(m.group(2), 16), int(m.group(4), 16))  # address, size, file offset
        for m in map(SECTION.match, headers.splitlines())
        if m
    ]
    code = subprocess.run(["objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    data = bytearray(library.read_bytes())
    patched = 0
    for address in (int(m.group(1), 16) for m in CPUID.finditer(code)):
        for start, size, offset in sections:
            if start <= address < start + size:
                at = address - start + offset
                if data[at : at + 2] != b"\x0f\xa2":
                    raise SystemExit(f"no cpuid at {address:#x}")
                data[at : at + 2] = b"\x0f\x0b"
                patched += 1
                break
    library.write_bytes(bytes(data))
    return patched


def main() -> None:
    source, dest = Path(sys.argv[1]), Path(sys.argv[2]) / "onnxruntime"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(source, dest)
    for library in (dest / "capi").glob("onnxruntime_pybind11_state*.so"):
        print(f"{library}: {patch(library)} cpuid instructions patched")


if __name__ == "__main__":
    main()
