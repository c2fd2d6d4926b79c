"""Does micro-batching pay on this CPU? For the served model's transformer, the time per text of N single calls
against one padded batch of N, on the texts the first stage passes on, one thread (`python -m loadtest.batching`).

Only a stage whose graph takes an attention mask can be padded without changing its answers, so the static first
stage (mean-pooled embeddings with no mask) is not batched. Dynamic quantisation picks each activation's scale
from the whole batch, so a padded batch can still move a text's logits: the table says by how much, and how many
of the batched texts' top intents moved with them."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.cpu import current
from app.engine.engine import Engine
from app.engine.onnx import OnnxModel
from loadtest.cli_args import path_arg
from loadtest.queries import QueryError, load_queries
from loadtest.server import ROOT

SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class BatchTiming:
    size: int
    single_us: float  # median over rounds of the seconds per text, each text its own call
    batched_us: float  # median over rounds of the seconds per text, the N texts as one padded call
    max_logit_diff: float  # the largest |batched - single| over every logit of every round
    top_moved: int  # texts whose top logit moved to another label in the batched call, over every round
    texts: int  # texts timed in all, per way


def padded(ids: Sequence[list[int]]) -> dict[str, np.ndarray]:
    width = max(len(x) for x in ids)
    input_ids = np.zeros((len(ids), width), dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = x
        mask[row, : len(x)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def one_by_one(model: OnnxModel, group: Sequence[list[int]]) -> tuple[np.ndarray, float]:
    """The logits of each text in its own call, stacked, and the seconds the calls took."""
    session, logits = model.session, model.outputs[0]
    started = time.perf_counter()
    rows = [session.run([logits], model.feed(ids))[0] for ids in group]
    return np.concatenate(rows), time.perf_counter() - started


def as_batch(model: OnnxModel, group: Sequence[list[int]]) -> tuple[np.ndarray, float]:
    """The logits of the texts as one padded call, and the seconds it took (padding included)."""
    started = time.perf_counter()
    out: np.ndarray = model.session.run([model.outputs[0]], padded(group))[0]
    return out, time.perf_counter() - started


def time_batches(model: OnnxModel, encoded: Sequence[list[int]], size: int, rounds: int) -> BatchTiming:
    """Round r times texts r*size .. r*size+size-1 (wrapping) both ways, alternating which way runs first."""
    if not 1 <= size <= len(encoded):
        raise ValueError(f"batch size {size} needs 1 to {len(encoded)} texts")
    singles, batched, diff, moved = [], [], 0.0, 0
    for r in range(rounds):
        start = (r * size) % len(encoded)
        group = [encoded[(start + i) % len(encoded)] for i in range(size)]
        if r % 2 == 0:
            alone, t_alone = one_by_one(model, group)
            together, t_together = as_batch(model, group)
        else:
            together, t_together = as_batch(model, group)
            alone, t_alone = one_by_one(model, group)
        singles.append(t_alone / size)
        batched.append(t_together / size)
        diff = max(diff, float(np.abs(together - alone).max()))
        moved += int((together.argmax(axis=1) != alone.argmax(axis=1)).sum())
    return BatchTiming(
        size, float(np.median(singles) * 1e6), float(np.median(batched) * 1e6), diff, moved, rounds * size
    )


def passed_on(engine: Engine, texts: Sequence[str]) -> list[list[int]]:
    """The token ids of the texts the served cascade sends to its last stage."""
    last = len(engine.models) - 1
    stage = engine.run(texts).stage
    return [e.ids for e, s in zip(engine.encode(texts), stage, strict=True) if s == last]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models" / "clinc150")
    p.add_argument("--data", type=path_arg, default=None, help="CLINC150 JSON (default: loadtest.queries' path)")
    p.add_argument("--rounds", type=int, default=30, help="batches per size (default: %(default)s)")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="batch sizes (default: %(default)s)")
    a = p.parse_args(argv)
    try:
        sizes = [int(s) for s in a.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes takes whole numbers separated by commas, not {a.sizes!r}")
    if a.rounds < 1 or not sizes or min(sizes) < 1:
        p.error("--rounds and every batch size must be at least 1")
    try:
        texts = load_queries(a.data)
    except QueryError as exc:
        p.error(str(exc))
    engine = Engine.open(a.model_dir)
    model = engine.models[-1]
    if "attention_mask" not in {i.name for i in model.session.get_inputs()}:
        p.error(f"{model.name} takes no attention mask: padding would change its answers")
    encoded = passed_on(engine, texts)
    if max(sizes) > len(encoded):
        p.error(f"the largest batch ({max(sizes)}) exceeds the {len(encoded)} texts the last stage sees")
    print(f"CPU: {current().describe()}; {model.name}, {len(encoded)} texts passed on by the first stage", flush=True)
    time_batches(model, encoded, min(8, len(encoded)), 5)  # warm-up
    print("| batch size | single calls, µs/text | one padded batch, µs/text | batch / single | largest logit move |")
    print("|---|---|---|---|---|")
    for size in sizes:
        t = time_batches(model, encoded, size, a.rounds)
        print(
            f"| {t.size} | {t.single_us:.0f} | {t.batched_us:.0f} | {t.batched_us / t.single_us:.2f} "
            f"| {t.max_logit_diff:.3f} (top intent moved for {t.top_moved} of {t.texts}) |",
            flush=True,
        )
    engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
