"""Serving footprint: the serving venv's size and torch-freeness, and the serve process's peak RSS."""

from __future__ import annotations

import argparse
import json
import subprocess
import urllib.request
from pathlib import Path

from app.cpu import current, measurement_context
from loadtest.queries import load_queries
from loadtest.server import ROOT, free_port, our_server, serve


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6


def has_module(python: Path, module: str) -> bool:
    r = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, check=False)
    return r.returncode == 0


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def serve_peak_rss(python: Path, requests: int = 2000) -> float:
    port = free_port()
    cmd, env = our_server(port, workers=1, python=python)
    texts = load_queries()
    with serve(cmd, env, port, cpus=None) as base:
        for i in range(requests):
            body = json.dumps({"text": texts[i % len(texts)], "top_k": 3}).encode()
            req = urllib.request.Request(base + "/predict", body, {"content-type": "application/json"})  # noqa: S310 - loopback only
            urllib.request.urlopen(req, timeout=5).read()  # noqa: S310 - loopback only
        pids = subprocess.run(
            ["pgrep", "-f", f"INTENT_PORT={port}|-m app"], capture_output=True, text=True, check=False
        ).stdout.split()
        own = [
            int(p)
            for p in pids
            if Path(f"/proc/{p}/environ").exists()
            and f"INTENT_PORT={port}".encode() in Path(f"/proc/{p}/environ").read_bytes()
        ]
        return max(peak_rss_mb(p) for p in own)


def model_files_mb(directory: Path) -> float:
    """Every file the served spec names (card.json's `files`), in MB."""
    card: dict[str, dict[str, object]] = json.loads((directory / "card.json").read_text())
    return sum((directory / name).stat().st_size for name in card["files"]) / 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--serve-venv", type=Path, default=ROOT / ".venv-serve")
    a = p.parse_args()
    print(f"CPU: {current().describe()}", flush=True)
    python = a.serve_venv / "bin" / "python"
    result = {
        "serve_venv_mb": round(dir_mb(a.serve_venv), 1),
        "serve_venv_has_torch": has_module(python, "torch"),
        "serve_venv_has_transformers": has_module(python, "transformers"),
        "serve_peak_rss_mb": round(serve_peak_rss(python), 1),
        "model_files_mb": round(model_files_mb(ROOT / "models" / "clinc150"), 2),
    }
    out = ROOT / "reports" / "footprint.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "context": measurement_context()}, indent=2) + "\n")
    print("serving footprint")
    for k, v in result.items():
        print(f"  {k}: {v}")
    ok = (
        result["serve_venv_mb"] < 400
        and not result["serve_venv_has_torch"]
        and result["serve_peak_rss_mb"] < 300
        and result["model_files_mb"] <= 35
    )
    print(f"  bar (venv < 400 MB, no torch, peak RSS < 300 MB, model files <= 35 MB): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
