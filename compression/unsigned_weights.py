"""int8 weights stored as uint8, so that every x86 CPU computes the same integer products.

ONNX Runtime multiplies uint8 activations by int8 weights with `vpdpbusd` where the CPU has AVX-512 VNNI (or
AVX-VNNI, or AMX), and with `vpmaddubsw` where it does not (AVX2, and AVX-512 without VNNI). `vpmaddubsw` adds
each pair of products into a saturating int16: a pair past 32,767 is clipped, so the same graph answers
differently by CPU. On an AVX2-only EPYC the served model changed 18 of 3,100 validation decisions that way
(docs/one-small-model.md, "On an AVX2-only CPU"). With uint8 weights ONNX Runtime widens both sides to int16
before it multiplies, which cannot overflow. Weight w with zero point z and weight w + 128 with zero point
z + 128 are the same number, so the rewrite changes no product: every CPU computes the products a VNNI CPU
computes for the int8 graph. (The floating-point steps between them still round by instruction set, which can
move a borderline answer: none of 5,350 between AVX2 and AVX-512 kernels.) Where a CPU multiplies int8 weights
exactly, the engine flips them back to int8 at load, for the faster kernel (app.engine.signed_weights)."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from app.engine.signed_weights import SHIFT, WEIGHT_INPUTS, read_roles


def unsigned_weights(path: Path) -> int:
    """Rewrite the ONNX file at `path` in place with every int8 weight as uint8; return how many were rewritten
    (0: the file is left as it was). Raises ValueError, writing nothing, where an int8 weight is also read by an
    op that would need it signed."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    signed = {name for name, t in initializers.items() if t.data_type == TensorProto.INT8}
    roles = read_roles(((node.op_type, node.input) for node in graph.node), signed)
    mixed = {name: sorted(r) for name, r in roles.items() if len(r) > 1}
    if mixed:
        raise ValueError(f"{path}: int8 initializers read both as weights and otherwise: {mixed}")

    def shift(name: str) -> None:
        tensor = initializers[name]
        values = numpy_helper.to_array(tensor).astype(np.int16) + SHIFT
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.uint8), name))

    rewritten = 0
    done: set[str] = set()
    for node in graph.node:
        weight_at, zero_at = WEIGHT_INPUTS.get(node.op_type, (-1, -1))
        if weight_at >= len(node.input) or node.input[weight_at] not in signed:
            continue
        weight = node.input[weight_at]
        zero = node.input[zero_at] if zero_at < len(node.input) else ""
        if zero and zero not in initializers:
            raise ValueError(f"{path}: {node.op_type} {node.name!r} reads its weight zero point at run time")
        if not zero:
            # An absent zero point is 0 for int8; for uint8 it must say 128.
            # DequantizeLinear wants it shaped as its scale (one per axis element); the others take a scalar.
            zero = f"{weight}_zero_point_uint8"
            scale = initializers.get(node.input[1]) if node.op_type == "DequantizeLinear" else None
            shape = tuple(scale.dims) if scale is not None else ()
            if zero not in initializers:
                initializers[zero] = numpy_helper.from_array(np.full(shape, SHIFT, dtype=np.uint8), zero)
                graph.initializer.append(initializers[zero])
            inputs = list(node.input) + [""] * (zero_at + 1 - len(node.input))
            inputs[zero_at] = zero
            del node.input[:]
            node.input.extend(inputs)
            done.add(zero)
        for name in (weight, zero):
            if name not in done:
                shift(name)
                done.add(name)
        rewritten += 1
    if rewritten:
        onnx.save(model, str(path))
    return rewritten


def rewrite_served(model_dir: Path) -> dict[str, int]:
    """Rewrite a served model directory built before the factory stored uint8 weights: each graph its spec
    names, then its card (file hashes, a new version, a line in the provenance history). The benchmark row is
    dropped, since it timed the old files; `make bench` measures the new ones. Returns the weights rewritten
    per file (empty, and nothing written, where there were none)."""
    from app.engine.artifact import load_artifact, sha256_file
    from compression.stages.artifact import version_digest, write_card

    card = load_artifact(model_dir).card
    # Each graph is rewritten in a copy, and the copies replace the served files only once all have succeeded.
    copies = {name: model_dir / f".{name}.uint8" for name in card.spec.files if name.endswith(".onnx")}
    try:
        rewritten = {}
        for name, copy in copies.items():
            shutil.copy(model_dir / name, copy)
            if n := unsigned_weights(copy):
                rewritten[name] = n
        for name in rewritten:
            copies[name].replace(model_dir / name)
    finally:
        for copy in copies.values():
            copy.unlink(missing_ok=True)
    if not rewritten:
        return rewritten
    files = {
        name: {"sha256": sha256_file(model_dir / name), "bytes": (model_dir / name).stat().st_size}
        for name in card.files
    }
    version = f"{time.strftime('%Y.%m.%d')}-{version_digest({n: str(e['sha256']) for n, e in files.items()})[:8]}"
    change = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "from_version": card.version,
        "change": "int8 weights stored as uint8 (compression.unsigned_weights): the same products on every CPU",
        "weights_rewritten": rewritten,
        "command": shlex.join(["python", "-m", "compression.unsigned_weights", str(model_dir)]),
    }
    updated = json.loads(card.model_dump_json())
    updated.update(version=version, files=files, benchmark={})
    updated["provenance"]["history"].append(change)
    write_card(model_dir, type(card).model_validate(updated))
    return rewritten


def main(argv: list[str] | None = None) -> int:
    import argparse

    from app.engine.errors import ModelLoadError

    parser = argparse.ArgumentParser(
        prog="python -m compression.unsigned_weights",
        description="Store a served model's int8 weights as uint8, in place: the same integer products on every CPU.",
    )
    parser.add_argument("model_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        rewritten = rewrite_served(args.model_dir)
    except (ModelLoadError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.model_dir}: " + (", ".join(f"{k} {v} weights" for k, v in rewritten.items()) or "nothing to rewrite"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
