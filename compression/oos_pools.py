"""The pools out-of-scope detection is tuned and reported on, and their error bars.

With `--no-train-oos` (the default) no stage trains on CLINC's `oos_train`, so:
- `clinc_oos` is oos_train (250) + oos_val (100): 350 real CLINC out-of-scope queries that no model trained
  on and no threshold was tuned on. The served model's OOS recall is reported here.
- `wiki_heldout` is the 2,000 Wikipedia sentences no stage trains on (compression.data.WIKI_POOL_SIZE). They
  are easier than real queries; the cascade's threshold and the choice of rule are tuned on them.
- `validation` is CLINC's validation split as it stands (3,000 in-scope + the 100 oos_val): the in-scope
  accuracy and the test-weighted accuracy of the bar. The OOS threshold is tuned on its in-scope part only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from compression.data import OOS, Clinc, Split, load_wiki_pool
from compression.errors import FactoryError
from compression.metrics import score

REPORT_POOL = "clinc_oos"
TUNING_POOL = "wiki_heldout"
POOL_DOCS = {
    "validation": "CLINC150 validation: 3,000 in-scope queries and the 100 of oos_val",
    REPORT_POOL: "oos_train (250) + oos_val (100): real CLINC out-of-scope queries no stage trains on",
    "oos_train": "the 250 oos_train queries alone",
    "oos_val": "the 100 oos_val queries alone",
    TUNING_POOL: "2,000 held-out Wikipedia sentences: no stage trains on them; the cascade and rule are tuned here",
}


def evaluation_pools(data: Clinc, wiki: str) -> dict[str, Split]:
    """Every pool of POOL_DOCS, by name. Refuses to build `clinc_oos` from queries the model trained on."""
    if any(i == OOS for i in data.split("train").intents):
        raise FactoryError("the training split holds oos_train: OOS pools need --no-train-oos")
    return {
        "validation": data.split("val"),
        REPORT_POOL: data.split("oos_train") + data.split("oos_val"),
        "oos_train": data.split("oos_train"),
        "oos_val": data.split("oos_val"),
        TUNING_POOL: load_wiki_pool(wiki),
    }


def tuning_split(data: Clinc, wiki: str) -> Split:
    """In-scope validation plus the held-out Wikipedia sentences: what thresholds are chosen on, so that no
    real CLINC out-of-scope query is."""
    val = data.split("val")
    keep = [i for i, intent in enumerate(val.intents) if intent != OOS]
    in_scope = Split([val.texts[i] for i in keep], [val.intents[i] for i in keep])
    return in_scope + load_wiki_pool(wiki)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95% by default): unlike the normal approximation it
    stays inside [0, 1] and is honest near the ends, where OOS recall lives."""
    if n <= 0:
        raise ValueError("an interval needs n > 0")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def pool_scores(pred: np.ndarray, gold: np.ndarray, oos: int) -> dict[str, Any]:
    """A pool's figures: the usual scores where it has in-scope queries, and the OOS recall with its 95%
    interval where it has out-of-scope ones."""
    out: dict[str, Any] = {"n": len(gold)}
    if (gold != oos).any():
        out.update(score(pred, gold, oos).as_dict())
    is_oos = gold == oos
    if is_oos.any():
        caught = int((pred[is_oos] == oos).sum())
        low, high = wilson(caught, int(is_oos.sum()))
        out.update(oos_n=int(is_oos.sum()), oos_caught=caught, oos_recall=round(caught / int(is_oos.sum()), 4))
        out["oos_recall_95"] = [round(low, 4), round(high, 4)]
    return out
