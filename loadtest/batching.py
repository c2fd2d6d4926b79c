"""Does micro-batching pay on this CPU? Per-query time of N single calls against one padded batch of N,
with the committed int8 model on one thread (`python -m loadtest.batching`)."""

from __future__ import annotations

import argparse
import time

import numpy as np
from app.runtime import OnnxClassifier

from app.cpu import current
from app.engine.artifact import load_artifact
from loadtest.queries import load_queries
from loadtest.server import ROOT


def per_query_us(clf: OnnxClassifier, texts: list[str], batch: int, rounds: int) -> tuple[float, float]:
    session, out = clf.transformer.session, clf.transformer._output
    encoded = [clf.tokenizer.encode(t).ids for t in texts]
    singles, batched = [], []
    for r in range(rounds):
        group = encoded[(r * batch) % (len(encoded) - batch) :][:batch]
        t0 = time.perf_counter()
        for ids in group:
            session.run(out, clf.transformer.feed(ids))
        singles.append((time.perf_counter() - t0) / batch)
        width = max(len(x) for x in group)
        ids_arr = np.zeros((batch, width), dtype=np.int64)
        mask = np.zeros_like(ids_arr)
        for i, ids in enumerate(group):
            ids_arr[i, : len(ids)] = ids
            mask[i, : len(ids)] = 1
        t0 = time.perf_counter()
        session.run(out, {"input_ids": ids_arr, "attention_mask": mask})
        batched.append((time.perf_counter() - t0) / batch)
    return float(np.median(singles) * 1e6), float(np.median(batched) * 1e6)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=30)
    a = p.parse_args()
    print(f"CPU: {current().describe()}", flush=True)
    clf = OnnxClassifier(load_artifact(ROOT / "models" / "clinc150"), 1, 1)
    texts = load_queries()
    per_query_us(clf, texts, 8, 5)  # warm-up
    print("| batch size | single calls, µs/query | one padded batch, µs/query | batch / single |")
    print("|---|---|---|---|")
    for batch in (1, 2, 4, 8, 16, 32):
        single, batched = per_query_us(clf, texts, batch, a.rounds)
        print(f"| {batch} | {single:.0f} | {batched:.0f} | {batched / single:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
